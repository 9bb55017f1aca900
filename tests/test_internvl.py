"""InternVL3's pixel shuffle and tiles: its extrapolated defaults, the token grid against where the model's pixel
shuffle puts each patch, the image-token mask over every tile and the thumbnail, VCD's split of the flat tile list per
image and PAI's image-free prompt (every method on a padded batch of mixed-size images against each image alone, parity
with the plain SPARC reference and the static loop run for every family in test_families.py, test_sparc.py and
test_captured.py)."""

import json

import numpy as np
import pytest
import torch
from conftest import make_images

import neverfade
from neverfade.cli import main
from neverfade.models.families import FAMILIES, ModelInfo
from neverfade.models.processors import load_processor
from neverfade.models.random import random_model

FAMILY = FAMILIES["InternVLForConditionalGeneration"]
K = 4  # tokens along a tile's side in the tiny model: 32 px, patch 4, shuffled 2x2
# (width, height) -> (rows, cols) of tiles (at most 4 in the tiny model); a thumbnail follows more than one
SIZES = {(40, 30): (1, 1), (64, 100): (2, 1), (90, 56): (1, 2), (64, 64): (2, 2), (30, 100): (3, 1), (100, 30): (1, 3)}


def test_defaults_are_llava_next_values_at_the_relative_depth_and_unvalidated(capsys):
    assert ModelInfo(FAMILY, 28, 0).default("sparc", "layer") == 18  # InternVL3-8B (Qwen2.5-7B)
    assert ModelInfo(FAMILY, 24, 0).default("sparc", "layer") == 15  # InternVL3-1B (Qwen2.5-0.5B)
    assert ModelInfo(FAMILY, 28, 0).default("sparc", "tau") == 4.0
    assert ModelInfo(FAMILY, 28, 0).default("locore", "beta") == 0.15
    assert FAMILY.unvalidated == {"sparc", "locore"}
    assert main(["methods", "--json"]) == 0
    sparc = {m["name"]: m for m in json.loads(capsys.readouterr().out)}["sparc"]
    assert {p["name"]: p for p in sparc["params"]}["tau"]["per_family"]["internvl3"] == 4.0


@pytest.fixture(scope="module")
def tiny():
    model, processor = random_model("internvl")
    return model.eval(), processor


def prompt(processor, images):
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        add_generation_prompt=True,
    )
    return processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("size", SIZES)
def test_token_grid_is_where_the_pixel_shuffle_puts_each_patch(tiny, size):
    """The vision tower's output replaced by each patch's (tile, row, col): the projector's input then says which
    patches each image token holds (the top left one of its 2x2 in its first channels)."""
    model, processor = tiny
    inputs = prompt(processor, [make_images()[2].resize(size)])
    rows, cols = SIZES[size]
    tiles = rows * cols + (rows * cols > 1)
    assert inputs["pixel_values"].shape[0] == tiles
    side = 2 * K  # patches along a tile's side

    def where(module, args, output):
        h = output.last_hidden_state
        h[:] = 0
        patch = torch.arange(side * side)
        h[:, 1:, 0] = torch.arange(tiles)[:, None].float()
        h[:, 1:, 1], h[:, 1:, 2] = (patch // side).float(), (patch % side).float()

    seen = {}
    hooks = [
        model.model.vision_tower.register_forward_hook(where),
        model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: seen.update(x=args[0])),
    ]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    tile, row, col = (seen["x"][..., c].reshape(-1).numpy() for c in range(3))  # per image token, in prompt order
    count = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert count == tiles * K * K
    grid = FAMILY.token_grid(model.config, inputs, count)
    assert (grid.rows, grid.cols) == (rows * K, cols * K)
    r, c = np.mgrid[: rows * K, : cols * K]
    np.testing.assert_array_equal(grid.place(tile), (r // K) * cols + c // K)  # tiles row by row, no thumbnail
    np.testing.assert_array_equal(grid.place(row), 2 * (r % K))
    np.testing.assert_array_equal(grid.place(col), 2 * (c % K))
    assert FAMILY.token_grid(model.config, inputs, count - 1) is None


@pytest.fixture(scope="module")
def captioner(tiny_models):
    return neverfade.load(tiny_models["internvl"], device="cpu")


def test_saved_as_the_real_processor_and_loaded_without_torchvision(tiny_models):
    path = tiny_models["internvl"]
    with open(f"{path}/processor_config.json") as f:
        assert json.load(f)["processor_class"] == "InternVLProcessor"
    processor = load_processor(path, "InternVLProcessor")
    assert processor.tokenizer.padding_side == "left" and processor.image_seq_length == K * K


def test_the_image_mask_covers_every_tile_and_the_thumbnail(captioner):
    c = captioner
    c.use(["sparc"], {"sparc": {"tau": 0.05, "alpha": 1.5}})
    inputs = c.inputs(make_images(), ["Describe it.", "Hi", "What is in this picture?"])
    c.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    mask = c.engine.batch.image_mask
    c.use([])
    assert torch.equal(mask, (inputs["input_ids"] == c.model.config.image_token_id) & inputs["attention_mask"].bool())
    assert mask.sum(1).tolist() == [16, 48, 48]  # 1 tile; 2 tiles and the thumbnail, twice


def test_vcd_splits_the_flat_tiles_per_image(captioner):
    c = captioner
    inputs = c.inputs(make_images(), ["Describe it.", "Hi", "What is in this picture?"])
    assert inputs["pixel_values"].shape[0] == 7 and FAMILY.pixel_split(inputs) == [1, 3, 3]
    alone = c.inputs(make_images()[1:2], ["Hi"])
    assert FAMILY.pixel_split(alone) == [3]
    with pytest.raises(ValueError, match="do not split"):
        FAMILY.pixel_split({**inputs, "pixel_values": inputs["pixel_values"][:6]})
    c.use(["vcd"], {"vcd": {"alpha": 3.0, "beta": 0.05, "noise_step": 500, "seed": 3}})
    vcd = c.engine.methods[0]
    together = vcd.contrast_inputs(c.model, inputs["input_ids"], dict(inputs), {})[1]["pixel_values"]
    one = vcd.contrast_inputs(c.model, alone["input_ids"], dict(alone), {})[1]["pixel_values"]
    c.use([])
    torch.testing.assert_close(together[1:4], one)  # the second image's tiles noised as when alone


def test_pai_image_free_prompt_keeps_the_markers(captioner):
    c = captioner
    inputs = c.inputs(make_images()[:2], ["Describe it.", "Hi"])
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    ids, other = FAMILY.image_free_inputs(c.model, inputs["input_ids"], kwargs, c.model.config.image_token_id)
    assert not (ids == c.model.config.image_token_id).any() and "pixel_values" not in other
    text = c.processor.tokenizer.decode(ids[1][other["attention_mask"][1].bool()])
    assert "<img></img>" in text and text.endswith("assistant\n")
