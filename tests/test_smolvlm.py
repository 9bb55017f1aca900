"""SmolVLM's image splitting: the token grid of split images, the image-token mask over every crop, VCD's noise
kept off the all-zero crops that pad a batch, PAI's image-free prompt, and the processor neverfade loads (every method
batched against each image alone runs for every family in test_families.py)."""

import json

import numpy as np
import pytest
import torch
from conftest import make_images

import neverfade
from neverfade.models.families import FAMILIES, ModelInfo
from neverfade.models.processors import load_processor

ARCH = "SmolVLMForConditionalGeneration"
CROPS = [(3, 3), (3, 2), (2, 3)]  # rows x cols of crops of make_images()' 40x30, 64x100 and 90x56 in the tiny model


@pytest.fixture(scope="module")
def smol(tiny_models):
    return neverfade.load(tiny_models["smolvlm"], device="cpu")


def one(c, image, prompt="Describe."):
    return c.processor(text=[c.prompt_text(prompt)], images=[image], return_tensors="pt")


def test_defaults_sit_at_the_relative_depth_and_are_unvalidated():
    family = FAMILIES[ARCH]
    assert family.unvalidated == {"sparc", "locore"}
    assert ModelInfo(family, 30, 0).default("sparc", "layer") == 19  # SmolVLM-256M
    assert ModelInfo(family, 24, 0).default("sparc", "layer") == 15  # SmolVLM-2.2B: 20/32 of 24
    assert ModelInfo(family, 30, 0).default("sparc", "tau") == 4.0


def test_split_images_are_tiled_in_the_grid_without_the_global_view(smol):
    config, family = smol.model.config, FAMILIES[ARCH]
    k = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
    for image, (rows, cols) in zip(make_images(), CROPS):
        inputs = one(smol, image)
        count = int((inputs["input_ids"] == config.image_token_id).sum())
        assert count == (rows * cols + 1) * k * k  # the crops and the global view
        assert inputs["pixel_values"].shape[1] == rows * cols + 1
        grid = family.token_grid(config, inputs, count)
        assert (grid.rows, grid.cols) == (rows * k, cols * k)
        placed = grid.place(np.arange(count))
        assert sorted(placed.ravel()) == list(range(rows * cols * k * k))  # each crop token once, no global one
        crop = np.arange(k * k).reshape(k, k)
        assert (placed[:k, :k] == crop).all()  # crop (1, 1) top left
        assert (placed[:k, k : 2 * k] == crop + k * k).all()  # crop (1, 2) to its right
        assert (placed[k : 2 * k, :k] == crop + cols * k * k).all()  # crop (2, 1) below
    assert family.token_grid(config, inputs, count - 1) is None


def test_an_unsplit_image_is_one_crop(smol):
    config = smol.model.config
    processor = load_processor(smol.model.name_or_path, "SmolVLMProcessor")
    processor.image_processor.do_image_splitting = False
    inputs = processor(text=[smol.prompt_text("Hi")], images=[make_images()[1]], return_tensors="pt")
    count = int((inputs["input_ids"] == config.image_token_id).sum())
    grid = FAMILIES[ARCH].token_grid(config, inputs, count)
    assert (grid.rows, grid.cols, count) == (4, 4, 16) and grid.note.startswith("SmolVLM one crop")


def test_saved_as_the_real_processor_and_loaded_as_neverfades(tiny_models):
    path = tiny_models["smolvlm"]
    with open(f"{path}/processor_config.json") as f:
        assert json.load(f)["processor_class"] == "SmolVLMProcessor"
    processor = load_processor(path, "SmolVLMProcessor")
    assert type(processor).__name__ == "SmolVLMImageOnly" and processor.tokenizer.padding_side == "left"


def test_the_image_mask_covers_every_crop_and_the_global_view(smol):
    smol.use(["sparc"], {"sparc": {"tau": 0.05, "alpha": 1.5}})
    inputs = smol.inputs(make_images(), ["Describe it.", "Hi", "What is in this picture?"])
    assert inputs["pixel_values"].shape[:2] == (3, 10)  # 7-crop prompts padded with 3 all-zero crops
    smol.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    mask = smol.engine.batch.image_mask
    assert torch.equal(
        mask, (inputs["input_ids"] == smol.model.config.image_token_id) & inputs["attention_mask"].bool()
    )
    assert mask.sum(1).tolist() == [160, 112, 112]
    smol.use([])


def test_vcd_leaves_padding_crops_zero(smol):
    family = FAMILIES[ARCH]
    inputs = smol.inputs(make_images(), ["Describe it.", "Hi", "What is in this picture?"])
    padding = family.pixel_padding(inputs).flatten(1)
    assert padding.sum(1).tolist() == [0, 3, 3] and not padding[:, :7].any()
    smol.use(["vcd"], {"vcd": {"alpha": 3.0, "beta": 0.05, "noise_step": 999, "seed": 3}})
    vcd = smol.engine.methods[0]
    _, other = vcd.contrast_inputs(smol.model, inputs["input_ids"], dict(inputs), {})
    noised = other["pixel_values"]
    assert (noised[padding] == 0).all() and (noised[~padding] != inputs["pixel_values"][~padding]).any()
    smol.use([])


def test_pai_image_free_prompt_keeps_the_markers(smol):
    tok = smol.processor.tokenizer
    inputs = smol.inputs(make_images()[:2], ["Describe it.", "Hi"])
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    ids, other = FAMILIES[ARCH].image_free_inputs(
        smol.model, inputs["input_ids"], kwargs, smol.model.config.image_token_id
    )
    assert not (ids == smol.model.config.image_token_id).any() and not {"pixel_values", "pixel_attention_mask"} & set(
        other
    )
    text = tok.decode(ids[0][other["attention_mask"][0].bool()])
    assert text.count("<fake_token_around_image>") == 11 and "<row_3_col_3>" in text and "<global-img>" in text
