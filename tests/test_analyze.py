"""neverfade analyze: each number against a plain recomputation (eager attention, plain autograd, the plain SPARC
reference), and the command end to end on the embedded model."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import full_forward_inputs, make_images
from PIL import Image
from reference_sparc import ReferenceSPARC
from transformers import AutoModelForImageTextToText

import neverfade
from neverfade import compat
from neverfade.analysis.grid import token_grid
from neverfade.analysis.run import analyze_setting
from neverfade.cli import main
from neverfade.data.items import Item

LAYER = 2
SPARC = dict(tau=0.05, alpha=1.5, layer=LAYER)


@pytest.fixture(scope="module")
def image_item(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "image.png"
    make_images()[1].save(path)
    return Item(id="image", image=str(path))


def prompt_inputs(c, image_path):
    image = Image.open(image_path).convert("RGB")
    return c.processor(text=[c.prompt_text(neverfade.DEFAULT_PROMPT)], images=[image], return_tensors="pt")


@torch.no_grad()
def eager_attentions(model_path, inputs, new_ids):
    model = AutoModelForImageTextToText.from_pretrained(model_path, attn_implementation="eager").eval()
    ids = torch.cat([inputs["input_ids"], torch.tensor([new_ids])], dim=1)
    return model(**full_forward_inputs(inputs, ids), output_attentions=True)


def test_share_and_maps_equal_eager_attention(tiny_models, image_item):
    c = neverfade.load(tiny_models["llava"], device="cpu")
    [a] = analyze_setting(c, [image_item], neverfade.DEFAULT_PROMPT, 12, layer=LAYER, saliency_tokens=["none"])
    inputs = prompt_inputs(c, image_item.image)
    out = c.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new_ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    ref = eager_attentions(tiny_models["llava"], inputs, new_ids[:-1])
    prompt_len = inputs["input_ids"].shape[1]
    image = inputs["input_ids"][0] == c.model.config.image_token_id
    rows = ref.attentions[LAYER][0, :, prompt_len - 1 :, :].mean(0)  # (n, T): the row that wrote each new token
    assert len(a.share) == len(new_ids) == 12
    expected_share = rows[:, :prompt_len][:, image].sum(-1)
    np.testing.assert_allclose(a.share, expected_share.numpy(), atol=1e-5)
    assert a.grid.rows == a.grid.cols == 4  # 32 px / 8 px patches
    np.testing.assert_allclose(a.maps, rows[:, :prompt_len][:, image].reshape(-1, 4, 4).numpy(), atol=1e-5)
    assert a.share.std() > 0, "the share must vary for the test to mean something"


def test_selection_counts_equal_the_plain_sparc_reference(tiny_models, image_item):
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sparc"], method_params={"sparc": SPARC})
    [a] = analyze_setting(c, [image_item], neverfade.DEFAULT_PROMPT, 16, saliency_tokens=["none"])
    n = len(a.tokens)
    inputs = prompt_inputs(c, image_item.image)
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava"]).eval()
    ref = ReferenceSPARC(c.engine.info.image_token_id, **SPARC)
    ref.attach(model, inputs["input_ids"])
    model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    order = {pos: i for i, pos in enumerate(ref.image_positions)}  # prompt position -> image token index
    counts = Counter(order[j] for step in range(1, n) for j in ref.selections.get(step, []))
    expected = np.zeros(len(order), dtype=int)
    for i, times in counts.items():
        expected[i] = times
    assert ref.total_selected > 0, "tau must be low enough for selections to happen"
    np.testing.assert_array_equal(a.selection_counts, a.grid.place(expected))
    for step in range(1, n):
        chosen = np.zeros(len(order), dtype=bool)
        chosen[[order[j] for j in ref.selections.get(step, [])]] = True
        np.testing.assert_array_equal(a.selections[step], a.grid.place(chosen))
    assert not a.selections[0].any(), "the first token is written before any selection"


@pytest.mark.parametrize("methods", [[], ["sparc"]])
def test_saliency_equals_plain_autograd(tiny_models, image_item, methods):
    """With SPARC attached too: its reweighting is a product, so the saliency read before it equals the one after
    (the reference then weights the value cache as the authors do)."""
    c = neverfade.load(
        tiny_models["llava"], device="cpu", methods=methods, method_params={"sparc": SPARC} if methods else None
    )
    [a] = analyze_setting(c, [image_item], neverfade.DEFAULT_PROMPT, 10, saliency_tokens=[1, 4, 7])
    inputs = prompt_inputs(c, image_item.image)
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["llava"], attn_implementation="eager").eval()
    if methods:
        ref = ReferenceSPARC(c.engine.info.image_token_id, **SPARC)
        ref.attach(model, inputs["input_ids"])
    out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    new_ids = out[0, prompt_len:].tolist()
    assert [e["position"] for e in a.saliency] == [1, 4, 7]
    if methods:
        assert ref.total_selected > 0, "SPARC must select before the later tokens for the test to mean something"
    for entry in a.saliency:
        k = entry["position"] - 1
        ids = out[:, : prompt_len + k]
        if methods:  # the reference's cache holds the scaled values: replay the run up to this token
            ref.attach(model, inputs["input_ids"])
            fwd = _reference_forward_with_sparc(model, inputs, ids)
        else:
            fwd = model(**full_forward_inputs(inputs, ids), output_attentions=True)
        loss = torch.nn.functional.cross_entropy(fwd.logits[:, -1].float(), torch.tensor([new_ids[k]]))
        grads = torch.autograd.grad(loss, fwd.attentions)
        sal = torch.stack([(att[0, :, -1] * g[0, :, -1]).abs().mean(0) for att, g in zip(fwd.attentions, grads)])
        sal = sal / sal.norm(dim=-1, keepdim=True)
        np.testing.assert_allclose(entry["output"], sal[:, prompt_len:].detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(
            entry["image"].reshape(len(sal), -1),
            sal[:, :prompt_len][:, inputs["input_ids"][0] == c.model.config.image_token_id].detach().numpy(),
            atol=1e-5,
        )
        assert entry["image"].max() > 0


def _reference_forward_with_sparc(model, inputs, ids):
    """Feed `ids` one token at a time through the reference (its value cache scaled in place, as the authors do),
    then the last token with gradients."""
    from transformers import DynamicCache

    cache = DynamicCache()
    prompt_len = inputs["input_ids"].shape[1]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        model(input_ids=ids[:, :prompt_len], use_cache=True, **compat.with_cache(extra, cache))
        for j in range(prompt_len, ids.shape[1] - 1):
            model(input_ids=ids[:, j : j + 1], use_cache=True, **compat.with_cache({}, cache))
    last = ids[:, -1:] if ids.shape[1] > prompt_len else None
    if last is None:
        return model(input_ids=ids, output_attentions=True, **extra)
    return model(input_ids=last, use_cache=True, output_attentions=True, **compat.with_cache({}, cache))


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_token_grids_cover_the_image_tokens(tiny_models, family):
    c = neverfade.load(tiny_models[family], device="cpu")
    for w, h in [(40, 90), (100, 40)]:
        image = make_images()[0].resize((w, h))
        inputs = c.processor(text=[c.prompt_text("Describe.")], images=[image], return_tensors="pt")
        count = int((inputs["input_ids"][0] == c.model.config.image_token_id).sum())
        grid = token_grid(c.model, inputs, count)
        assert "unknown" not in grid.note
        assert len(set(grid.index.tolist())) == grid.rows * grid.cols and grid.index.max() < count
        assert (grid.rows > grid.cols) == (h > w), "the grid has the image's orientation"
        if family == "qwen2_vl":
            assert grid.rows * grid.cols == count
        else:
            side = c.model.config.vision_config.image_size // c.model.config.vision_config.patch_size
            assert side * side + grid.rows * (grid.cols + 1) == count


def test_analyze_command_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "analysis"
    code = main(
        ["analyze", "--samples", "1", "--method", "sparc", "--vs-baseline", "--max-new-tokens", "48", "--out", str(out)]
    )
    assert code == 0
    report = json.loads((out / "analysis.json").read_text())
    assert [s["label"] for s in report["settings"]] == ["sparc", "baseline"]
    assert report["layer"] == 5
    for setting in report["settings"]:
        [image] = setting["images"]
        assert len(image["attention_share"]) == len(image["tokens"]) <= 48
        assert "".join(image["tokens"]).replace(" ", "") == image["caption"].replace(" ", "")
        assert len(image["diversity"]) == len(image["tokens"]) - 1
        assert image["grid"]["rows"] == image["grid"]["cols"] == 12
        assert image["saliency"], "the caption names objects, so saliency maps are drawn for them"
        for entry in image["saliency"]:
            assert entry["present"] in (True, False)
            assert len(entry["to_output"]) == 8 and len(entry["to_output"][0]) == entry["position"] - 1
        if setting["label"] == "sparc":
            assert sum(map(sum, image["selection_counts"])) == sum(image["selections_per_step"]) > 0
        else:
            assert image["selection_counts"] is None
    for name in report["plots"]:
        with Image.open(out / name) as png:
            pixels = np.asarray(png.convert("L"))
            assert pixels.std() > 0, f"{name} is blank"
    assert {"attention_share.png", "diversity.png", "selections_sparc_scene-00000.png"} <= set(report["plots"])


def test_analyze_refuses_opera_and_bad_input(tmp_path, capsys):
    assert main(["analyze", "--samples", "1", "--method", "opera", "--out", str(tmp_path)]) == 2
    assert "beam search" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing.png"), "--out", str(tmp_path)]) == 2
    assert main(["analyze", "--samples", "1", "--layer", "99", "--out", str(tmp_path)]) == 2
    assert "beyond the model's depth" in capsys.readouterr().err
