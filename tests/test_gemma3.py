"""Gemma 3: the token grid against the model's own pooling, sliding-window layers under neverfade (every key kept,
the window still masked, in generate's loop and in the static loop), VCD's noised branch keeping token_type_ids and
PAI's image-free prompt without them, and the processor neverfade loads (every method batched against each image
alone, OPERA's beams following token_type_ids included, runs for every family in test_families.py)."""

import json

import numpy as np
import pytest
import torch
from conftest import make_images

import neverfade
from neverfade.decoding.captured import StaticLoop
from neverfade.models.families import FAMILIES, ModelInfo
from neverfade.models.processors import load_processor

ARCH = "Gemma3ForConditionalGeneration"


@pytest.fixture(scope="module")
def gemma(tiny_models):
    return neverfade.load(tiny_models["gemma3"], device="cpu")


def test_defaults_sit_at_the_relative_depth_and_are_unvalidated():
    family = FAMILIES[ARCH]
    assert family.unvalidated == {"sparc", "locore"}
    assert ModelInfo(family, 34, 0).default("sparc", "layer") == 21  # Gemma 3 4B
    assert ModelInfo(family, 34, 0).default("sparc", "tau") == 1.5


def test_the_grid_is_the_models_pooling_row_major(gemma):
    config, model = gemma.model.config, gemma.model
    inputs = gemma.processor(text=[gemma.prompt_text("Hi")], images=[make_images()[0]], return_tensors="pt")
    count = int((inputs["input_ids"] == config.image_token_id).sum())
    assert count == config.mm_tokens_per_image == 16
    grid = FAMILIES[ARCH].token_grid(config, inputs, count)
    assert (grid.rows, grid.cols) == (4, 4)
    assert FAMILIES[ARCH].token_grid(config, inputs, count - 1) is None
    patches = config.vision_config.image_size // config.vision_config.patch_size  # 8 x 8, pooled 2 x 2
    rows, cols = np.divmod(np.arange(patches * patches), patches)
    features = torch.zeros(1, patches * patches, config.vision_config.hidden_size)
    features[0, :, 0], features[0, :, 1] = torch.tensor(rows), torch.tensor(cols)
    seen = {}
    projector = model.model.multi_modal_projector
    hook = projector.mm_soft_emb_norm.register_forward_hook(lambda m, a, o: seen.setdefault("pooled", a[0]))
    with torch.no_grad():
        projector(features)
    hook.remove()
    pooled = grid.place(seen["pooled"][0, :, :2].T.numpy())  # (2, rows, cols): mean patch row and column
    k = patches // grid.rows
    centre = np.arange(grid.rows) * k + (k - 1) / 2
    assert np.allclose(pooled[0], centre[:, None]) and np.allclose(pooled[1], centre[None, :])


CAPTURABLE = {
    "baseline": {},
    "sparc": {"sparc": {"tau": 0.05, "alpha": 1.5}},
    "naive": {"naive": {"alpha": 2.0}},
    "locore": {"locore": {"beta": 2.0, "window": 3}},
    "pai": {"pai": {"alpha": 0.5}},
    "sparc+locore": {"sparc": {"tau": 0.05, "alpha": 1.5}, "locore": {"beta": 2.0, "window": 3}},
}


@pytest.mark.parametrize("run", CAPTURABLE)
def test_the_static_loop_masks_each_layer_kind_as_generate_does(gemma, run, monkeypatch):
    """A mask per layer kind: the sliding layers' hides the keys that left the window (8, shorter than the prompts),
    though under neverfade their cache keeps every key. The static loop gives generate's own loop's tokens, and
    other tokens where its sliding mask ignores the window (the full mask in its place)."""
    text = gemma.model.config.text_config
    assert {"sliding_attention", "full_attention"} == set(text.layer_types)
    inputs = gemma.inputs(make_images(), ["Describe it.", "Hi", "What is in this picture?"])
    assert not inputs["attention_mask"].all(), "a padded batch"
    assert text.sliding_window < inputs["attention_mask"].sum(1).min()  # the window cuts every prompt
    gemma.use(list(CAPTURABLE[run]), CAPTURABLE[run])
    forced = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    tokens = {}
    try:
        for decode in ("eager", "static", "windowless"):
            if decode == "windowless":
                monkeypatch.setattr(StaticLoop, "_slide", lambda loop: loop.sliding.copy_(loop.full))
            gemma.decode = "eager" if decode == "eager" else "static"
            with torch.no_grad():
                tokens[decode] = gemma.generate(**inputs, **forced)[:, -12:]
            if decode != "eager":
                assert isinstance(gemma.model._neverfade_last_loop, StaticLoop)
    finally:
        gemma.decode = "auto"
        gemma.use([])
    assert torch.equal(tokens["eager"], tokens["static"])
    assert not torch.equal(tokens["static"], tokens["windowless"]), "the sliding mask must matter here"


def test_auto_decodes_on_the_static_loop(gemma):
    """On a CPU: static where asked (captured asks for a CUDA graph, which needs CUDA); on CUDA auto captures."""
    assert gemma.decode_path() == "eager"
    for path in ("static", "captured"):
        gemma.decode = path
        assert gemma.decode_path() == "static"
    gemma.decode = "auto"


def test_sliding_layers_keep_every_key_under_neverfade(gemma):
    gemma.use(["sparc"], {"sparc": {"tau": 0.05, "alpha": 1.5}})
    inputs = gemma.inputs(make_images()[:1])
    out = gemma.model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    gemma.use([])
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    assert {type(layer).__name__ for layer in cache.layers} == {"DynamicLayer"}
    assert cache.layers[0].keys.shape[2] == out.sequences.shape[1] - 1  # every position but the last token's


def test_saved_as_the_real_processor_and_loaded_as_neverfades(tiny_models):
    path = tiny_models["gemma3"]
    with open(f"{path}/processor_config.json") as f:
        assert json.load(f)["processor_class"] == "Gemma3Processor"
    processor = load_processor(path, "Gemma3Processor")
    assert type(processor).__name__ == "Gemma3ImageOnly" and processor.tokenizer.padding_side == "left"


def test_vcd_keeps_token_type_ids(gemma):
    inputs = gemma.inputs(make_images(), ["Describe it.", "Hi", "What is in this picture?"])
    assert torch.equal(inputs["token_type_ids"].bool(), inputs["input_ids"] == gemma.model.config.image_token_id)
    gemma.use(["vcd"], {"vcd": {"alpha": 3.0, "beta": 0.05, "noise_step": 999, "seed": 3}})
    _, other = gemma.engine.methods[0].contrast_inputs(gemma.model, inputs["input_ids"], dict(inputs), {})
    assert torch.equal(other["token_type_ids"], inputs["token_type_ids"])
    assert not torch.equal(other["pixel_values"], inputs["pixel_values"])
    gemma.use([])


def test_pai_image_free_prompt_drops_token_type_ids(gemma):
    tok, config = gemma.processor.tokenizer, gemma.model.config
    inputs = gemma.inputs(make_images()[:2], ["Describe it.", "Hi"])
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    ids, other = FAMILIES[ARCH].image_free_inputs(gemma.model, inputs["input_ids"], kwargs, config.image_token_id)
    assert not (ids == config.image_token_id).any() and not {"pixel_values", "token_type_ids"} & set(other)
    text = tok.decode(ids[0][other["attention_mask"][0].bool()])
    assert "<start_of_image><end_of_image>" in text
