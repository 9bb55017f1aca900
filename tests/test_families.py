"""Per-family defaults against the paper's values (typed in from the paper, not produced by the code)."""

import json

import pytest

from neverfade.cli import main
from neverfade.models.families import FAMILIES, ModelInfo

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
    assert params["tau"]["per_family"] == {"llava-1.5": 1.5, "llava-next": 4.0, "qwen2-vl": 3.0, "qwen2.5-vl": 3.0}
    assert params["alpha"]["default"] == 1.1 and params["beta"]["default"] == 0.1
    assert "unvalidated" in params["tau"]["source"]
