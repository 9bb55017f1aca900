"""Qwen3-VL: its defaults (Qwen2-VL's, unvalidated), its token grid against the model's own M-RoPE positions, the
deepstack features in VCD's noised branch and PAI's image-free branch, and every method against its plain reference
(the parity, padded-batch, every-method-batched and static-loop tests run on it through FAMILIES)."""

import json

import pytest
import torch
from conftest import make_images
from test_methods import CASES
from test_methods import test_composition_order_does_not_matter as composition_check
from test_methods import test_fast_path_equals_reference as methods_check
from test_methods import test_pai_guidance_at_gamma_one_is_the_boost_alone as pai_gamma_one_check
from test_methods import test_pai_guidance_equals_plain_reference as pai_guidance_check
from test_opera import one_thread  # noqa: F401  (the fixture)
from test_opera import test_penalty_equals_reference as opera_check
from test_sgrs import sgrs_reference_check as sgrs_check
from test_sparc import test_no_method_and_identity_method_equal_stock_generate as stock_check
from test_vcd import VCD
from test_vcd import test_vcd_equals_plain_reference as vcd_check

import neverfade
from neverfade import compat
from neverfade.cli import main
from neverfade.models.families import FAMILIES, ModelInfo

FAMILY = "qwen3_vl"
QWEN3 = FAMILIES["Qwen3VLForConditionalGeneration"]


def test_defaults_are_qwen2_vl_values_at_the_same_depth_and_unvalidated(capsys):
    assert QWEN3.unvalidated == {"sparc", "locore"}
    for depth, layer in ((36, 23), (28, 18)):  # Qwen3-VL-8B, Qwen3-VL-2B
        info = ModelInfo(QWEN3, depth, 0)
        assert (info.default("sparc", "layer"), info.default("sparc", "tau")) == (layer, 3.0)
        assert info.default("locore", "beta") == 0.20
    assert main(["methods", "--json"]) == 0
    params = {p["name"]: p for m in json.loads(capsys.readouterr().out) if m["name"] == "sparc" for p in m["params"]}
    assert "qwen3-vl" in params["tau"]["unvalidated"] and "qwen2-vl" not in params["tau"]["unvalidated"]
    assert params["alpha"]["unvalidated"] == []
    assert main(["methods"]) == 0
    tau = next(line for line in capsys.readouterr().out.splitlines() if "--sparc-tau" in line)
    assert "unvalidated:" in tau and "qwen3-vl" in tau.split("unvalidated:")[1] and "neverfade tune" in tau


def test_token_grid_follows_the_models_rope_positions(tiny_models):
    """Each grid cell's token sits at that cell's height and width in the model's own 3-D rope positions."""
    c = neverfade.load(tiny_models[FAMILY], device="cpu")
    shapes = set()
    for image in make_images():
        inputs = c.inputs([image])
        ids = inputs["input_ids"]
        image_tokens = ids[0] == c.model.config.image_token_id
        grid = QWEN3.token_grid(c.model.config, inputs, int(image_tokens.sum()))
        positions = compat.position_ids(c.model, ids, dict(inputs))[-3:, 0, image_tokens]  # (t, h, w) per token
        rows, cols = positions[1] - positions[1].min(), positions[2] - positions[2].min()
        cells = grid.place(torch.arange(int(image_tokens.sum())).numpy()).tolist()
        assert [[(int(rows[i]), int(cols[i])) for i in row] for row in cells] == [
            [(r, k) for k in range(grid.cols)] for r in range(grid.rows)
        ]
        shapes.add((grid.rows, grid.cols))
    assert len(shapes) > 1, "the images must give different grids"


def language_model_calls(model):
    """Record, for each call of the language model, its length and the deepstack features it is given."""
    calls = []

    def record(module, args, kwargs):
        embeds, deepstack = kwargs["inputs_embeds"], kwargs.get("deepstack_visual_embeds")
        calls.append((embeds.shape[1], None if deepstack is None else [d.clone() for d in deepstack]))

    return calls, model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)


def test_vcd_noises_the_deepstack_features(tiny_models):
    c = neverfade.load(tiny_models[FAMILY], device="cpu", methods=["vcd"], method_params={"vcd": VCD})
    inputs = c.inputs(make_images()[1:2])
    calls, hook = language_model_calls(c.model)
    with torch.no_grad():
        c.generate(**inputs, max_new_tokens=3, do_sample=False)
        hook.remove()
        clean = c.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        noised = c.methods[0].noised(inputs["pixel_values"], QWEN3.pixel_split(inputs))
        noisy = c.model.model.get_image_features(noised, inputs["image_grid_thw"])
    prefills = [deepstack for length, deepstack in calls if length > 1]
    assert len(prefills) == 2 and all(d is not None and len(d) == 2 for d in prefills), "both branches, 2 layers"
    assert all(d is None for length, d in calls if length == 1), "no deepstack features after the prefill"
    for features, expected in zip(prefills, (clean, noisy)):
        for got, want in zip(features, expected.deepstack_features):
            torch.testing.assert_close(got, want if torch.is_tensor(want) else torch.cat(want))  # 5.24: per image
    assert not torch.allclose(prefills[0][0], prefills[1][0])


def test_pai_image_free_branch_has_no_visual_features(tiny_models):
    pai = {"alpha": 0.5, "cfg": True, "gamma": 2.0}
    c = neverfade.load(tiny_models[FAMILY], device="cpu", methods=["pai"], method_params={"pai": pai})
    inputs = c.inputs(make_images()[:2], ["Describe it.", neverfade.DEFAULT_PROMPT])
    free_ids, free = QWEN3.image_free_inputs(c.model, inputs["input_ids"], dict(inputs), c.engine.info.image_token_id)
    assert not {"pixel_values", "image_grid_thw", "mm_token_type_ids"} & set(free)
    assert not (free_ids == c.engine.info.image_token_id).any()
    calls, hook = language_model_calls(c.model)
    with torch.no_grad():
        c.generate(**inputs, max_new_tokens=3, do_sample=False)
    hook.remove()
    prefills = [(length, deepstack) for length, deepstack in calls if length > 1]
    assert [length for length, _ in prefills] == [inputs["input_ids"].shape[1], free_ids.shape[1]]
    assert prefills[0][1] is not None and prefills[1][1] is None


@pytest.mark.parametrize("method", CASES)
def test_attention_methods_equal_their_references(tiny_models, method):
    methods_check(tiny_models, FAMILY, method)


@pytest.mark.parametrize(
    "check",
    [stock_check, composition_check, vcd_check, pai_guidance_check, pai_gamma_one_check, sgrs_check],
    ids=["stock", "composition", "vcd", "pai-guidance", "pai-gamma-one", "sgrs"],
)
def test_method_equals_its_reference(tiny_models, check):
    check(tiny_models, FAMILY)


def test_opera_penalty_equals_reference(tiny_models, monkeypatch):
    import test_opera

    monkeypatch.setitem(test_opera.PENALTY_CASES, FAMILY, test_opera.PENALTY_CASES["qwen2_vl"])
    opera_check(tiny_models, FAMILY)
