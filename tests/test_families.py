"""Per-family defaults against the paper's values (typed in from the paper, not produced by the code), the family
adapters (every family keeps the contract, a family is found from its one module), and every method, alone and
composed, on every family: a left-padded batch of mixed-size images captions each image as it does alone. What one
family does its own way (Gemma 3's token types, SmolVLM's padding crops, InternVL's tiles, Qwen3-VL's deepstack
features) is tested in that family's file; the plain references and the static loop run for every family in
test_sparc.py, test_captured.py and test_methods.py."""

import json
import sys
from types import SimpleNamespace

import pytest
from conftest import make_images

import neverfade
from neverfade.cli import main
from neverfade.models import families as family_package
from neverfade.models.families import FAMILIES, ModelInfo, check_supported, families
from neverfade.models.family import Family, register
from neverfade.models.random import FAMILIES as RANDOM_NAMES

PAPER = {  # SPARC paper, section 5.1
    "LlavaForConditionalGeneration": (20, 1.5, 32),
    "LlavaNextForConditionalGeneration": (20, 4.0, 32),
    "Qwen2VLForConditionalGeneration": (18, 3.0, 28),
}


@pytest.mark.parametrize("cls", PAPER)
def test_paper_depth_gets_paper_values(cls):
    layer, tau, depth = PAPER[cls]
    info = ModelInfo(FAMILIES[cls], depth, 0)
    assert info.default("sparc", "layer") == layer
    assert info.default("sparc", "tau") == tau


def test_other_depths_keep_the_relative_layer():
    llava = FAMILIES["LlavaForConditionalGeneration"]
    assert ModelInfo(llava, 40, 0).default("sparc", "layer") == 25  # LLaVA-1.5-13B: 20/32 of 40
    assert ModelInfo(llava, 8, 0).default("sparc", "layer") == 5
    assert ModelInfo(llava, 1, 0).default("sparc", "layer") == 0


def test_qwen25_is_marked_unvalidated_and_listed(capsys):
    assert FAMILIES["Qwen2_5_VLForConditionalGeneration"].unvalidated == {"sparc", "locore"}
    assert main(["methods", "--json"]) == 0
    sparc = {m["name"]: m for m in json.loads(capsys.readouterr().out)}["sparc"]
    params = {p["name"]: p for p in sparc["params"]}
    paper = {"llava-1.5": 1.5, "llava-next": 4.0, "qwen2-vl": 3.0, "qwen2.5-vl": 3.0}
    assert params["tau"]["per_family"].items() >= paper.items()  # newer families come after these
    assert params["alpha"]["default"] == 1.1 and params["beta"]["default"] == 0.1
    assert "unvalidated" in params["tau"]["source"]


def test_every_family_keeps_the_adapter_contract():
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from neverfade.methods import METHODS

    found = families()
    assert len({f.name for f in found}) == len({f.random_name for f in found}) == len(found) >= 4
    for family in found:
        assert family.architectures and all(hasattr(transformers, a) for a in family.architectures), family.name
        assert family.paper_layers > 0 and "pixel_values" in family.image_inputs
        for method, defaults in family.method_defaults.items():
            assert set(defaults) <= {p.name for p in METHODS[method].params}, (family.name, method)
        assert family.unvalidated <= set(family.method_defaults)
        config, processor = family.random_parts("tiny")
        assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[config.model_type] in family.architectures
        image = make_images()[1]
        inputs = processor(
            text=[
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
                    add_generation_prompt=True,
                )
            ],
            images=[image],
            return_tensors="pt",
        )
        count = int((inputs["input_ids"] == config.image_token_id).sum())
        grid = family.token_grid(config, inputs, count)
        assert grid is not None and grid.index.max() < count and grid.rows * grid.cols <= count, family.name
        assert sum(family.pixel_split(inputs)) == inputs["pixel_values"].shape[0]
        assert family.model_view(image, processor).size[0] <= image.size[0]


FAKE = """
import numpy as np

from neverfade.models.family import Family, TokenGrid, register


@register
class FakeVL(Family):
    architectures = ("FakeVLForConditionalGeneration",)
    name = "fake-vl"
    random_name = "fake_vl"
    paper_layers = 16
    method_defaults = {"sparc": {"layer": 8, "tau": 2.5}}

    def token_grid(self, config, inputs, count):
        return TokenGrid(1, count, np.arange(count), "fake-vl: one row")

    def random_parts(self, size):
        raise NotImplementedError("fake-vl has no random model")
"""


@pytest.fixture
def registry_restored():
    kept = dict(FAMILIES)
    yield
    FAMILIES.clear()
    FAMILIES.update(kept)
    sys.modules.pop(f"{family_package.__name__}.fake_vl", None)


def test_a_family_is_one_module_in_the_families_package(tmp_path, monkeypatch, capsys, registry_restored):
    from neverfade.analysis.grid import token_grid
    from neverfade.models.random import random_model

    assert "FakeVLForConditionalGeneration" not in FAMILIES
    (tmp_path / "fake_vl.py").write_text(FAKE)
    monkeypatch.setattr(family_package, "__path__", [*family_package.__path__, str(tmp_path)])
    family_package.discover()
    fake = check_supported(SimpleNamespace(architectures=["FakeVLForConditionalGeneration"]))
    assert fake.name == "fake-vl" and fake in families()
    assert ModelInfo(fake, 32, 0).default("sparc", "layer") == 16
    model = type("FakeVLForConditionalGeneration", (), {"config": None})()
    assert token_grid(model, {}, 6).note == "fake-vl: one row"
    with pytest.raises(NotImplementedError, match="fake-vl has no random model"):
        random_model("fake_vl")
    assert main(["methods", "--json"]) == 0
    sparc = {m["name"]: m for m in json.loads(capsys.readouterr().out)}["sparc"]
    assert {p["name"]: p for p in sparc["params"]}["tau"]["per_family"]["fake-vl"] == 2.5
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # --model's help, unwrapped
    listed = shown.split("tiny random-weight model of ")[1].split(";")[0]
    assert listed.replace(" or ", ", ").split(", ") == [f.random_name for f in families()]
    assert listed.endswith(" or fake_vl")


def test_register_refuses_an_incomplete_or_taken_family(registry_restored):
    class NoGrid(Family):
        architectures, name, random_name, paper_layers = ("NoGridModel",), "no-grid", "no_grid", 8

        def random_parts(self, size):
            return None, None

    class Unnamed(Family):
        architectures, random_name, paper_layers = ("UnnamedModel",), "unnamed", 8
        token_grid = random_parts = NoGrid.random_parts

    class Taken(Unnamed):
        architectures, name = ("LlavaForConditionalGeneration",), "taken"

    with pytest.raises(TypeError, match="token_grid"):
        register(NoGrid)
    with pytest.raises(TypeError, match="does not declare name"):
        register(Unnamed)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration already belongs to llava-1.5"):
        register(Taken)
    assert {"NoGridModel", "UnnamedModel"}.isdisjoint(FAMILIES) and FAMILIES[
        "LlavaForConditionalGeneration"
    ].name == "llava-1.5"


SMALL = {
    "sparc": {"tau": 0.05, "alpha": 1.5},
    "locore": {"beta": 2.0, "window": 3},
    "naive": {"alpha": 2.0},
    "pai": {"alpha": 0.5},
    "vcd": {"alpha": 3.0, "beta": 0.05, "noise_step": 999, "seed": 3},
    "sgrs": {"alpha": 1.1, "k": 4, "tries": 3, "window": 5, "start": 2, "end": 3},
    "opera": {"num_beams": 3, "candidates": 4, "early": 2, "scale": 100.0, "threshold": 2},
}
GUIDED_PAI = {"alpha": 1.0, "start": 1, "end": 3, "cfg": True, "gamma": 2.0, "cfg_cutoff": 0.05}  # its own loop
RUNS = {
    **{m: {m: SMALL[m]} for m in SMALL},
    "pai-guidance": {"pai": GUIDED_PAI},
    "sparc+locore+vcd": {m: SMALL[m] for m in ("sparc", "locore", "vcd")},
    "naive+pai+sgrs": {m: SMALL[m] for m in ("naive", "pai", "sgrs")},
}
PROMPTS = ["Describe it.", "Hi", "What is in this picture?"]  # prompts of different lengths: the batch is padded
TOKENS = 8


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """family -> (its captioner, the baseline's captions of the batch), each made once."""
    cache = {}

    def get(family):
        if family not in cache:
            c = neverfade.load(tiny_models[family], device="cpu")
            assert not c.inputs(make_images(), PROMPTS)["attention_mask"].all(), "the batch must be padded"
            cache[family] = c, [r.text for r in c.caption(make_images(), PROMPTS, max_new_tokens=TOKENS)]
        return cache[family]

    return get


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("family", RANDOM_NAMES)
def test_every_method_batched_equals_each_image_alone(loaded, family, run):
    """Each method's per-sequence state, its own loop (VCD's and guided PAI's contrast, SGRS's rejection, OPERA's
    beams) and the family's per-image inputs (tiles, crops, token types, image sizes) follow each image in a batch."""
    c, baseline = loaded(family)
    images = make_images()
    c.use(list(RUNS[run]), RUNS[run])
    try:
        together = [r.text for r in c.caption(images, PROMPTS, max_new_tokens=TOKENS)]
        alone = [c.caption([im], p, max_new_tokens=TOKENS)[0].text for im, p in zip(images, PROMPTS)]
    finally:
        c.use([])
    assert together == alone
    assert together != baseline, "the methods must act here"
