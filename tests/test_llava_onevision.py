"""LLaVA-OneVision: its extrapolated defaults and its any-resolution token grid against where the model puts each
token (every method on a padded batch of mixed-size images against each image alone, parity with the plain SPARC
reference and the static loop run for every family in test_families.py, test_sparc.py and test_captured.py)."""

import json

import numpy as np
import pytest
import torch
from conftest import make_images

from neverfade.cli import main
from neverfade.models.families import FAMILIES, ModelInfo
from neverfade.models.random import random_model

FAMILY = FAMILIES["LlavaOnevisionForConditionalGeneration"]


def test_defaults_are_llava_next_values_at_the_relative_depth_and_unvalidated(capsys):
    assert ModelInfo(FAMILY, 28, 0).default("sparc", "layer") == 18  # LLaVA-OneVision-7B (Qwen2-7B)
    assert ModelInfo(FAMILY, 24, 0).default("sparc", "layer") == 15  # LLaVA-OneVision-0.5B (Qwen2-0.5B)
    assert ModelInfo(FAMILY, 28, 0).default("sparc", "tau") == 4.0
    assert ModelInfo(FAMILY, 28, 0).default("locore", "beta") == 0.15
    assert FAMILY.unvalidated == {"sparc", "locore"}
    assert main(["methods", "--json"]) == 0
    sparc = {m["name"]: m for m in json.loads(capsys.readouterr().out)}["sparc"]
    assert {p["name"]: p for p in sparc["params"]}["tau"]["per_family"]["llava-onevision"] == 4.0


@pytest.fixture(scope="module")
def tiny():
    model, processor = random_model("llava_onevision")
    return model.eval(), processor


# (width, height) -> the grid (rows, cols): one crop of 4x4 patches, kept; two crops (4x8) unpadded to 4x6, shrunk to
# 3x4; the same, tall; four crops (8x8) shrunk to 4x4; four crops unpadded to 4x8 and 8x6, shrunk to 2x5 and 4x3
SIZES = {(32, 32): (4, 4), (40, 30): (3, 4), (30, 40): (4, 3), (64, 64): (4, 4), (90, 56): (2, 5), (64, 100): (4, 3)}


@pytest.mark.parametrize("size", SIZES)
def test_token_grid_is_where_the_model_puts_the_grid(tiny, size):
    """The model's own input embeddings: the base square, then each grid row ending in the image_newline vector."""
    model, processor = tiny
    image = make_images()[2].resize(size)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    seen = {}
    model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    is_image = inputs["input_ids"][0] == model.config.image_token_id
    embeds = seen["embeds"][0, is_image]
    newline = (embeds == model.model.image_newline).all(-1).nonzero().ravel().tolist()
    count = len(embeds)
    grid = FAMILY.token_grid(model.config, inputs, count)
    assert grid is not None and (grid.rows, grid.cols) == SIZES[size]
    base = 4 * 4
    assert newline == [base + (r + 1) * (grid.cols + 1) - 1 for r in range(grid.rows)]
    assert sorted([*range(base), *newline, *grid.index.tolist()]) == list(range(count))
    np.testing.assert_array_equal(grid.place(np.arange(count))[:, 0], base + np.arange(grid.rows) * (grid.cols + 1))
