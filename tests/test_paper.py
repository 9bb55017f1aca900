"""Paper mode: the SPARC authors' dtype, prompt format and image padding for the families they ran."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import neverfade
from neverfade.models.families import VICUNA_V1

PROMPT = "Please describe this image in detail."


def test_llava_runs_in_float16_with_the_vicuna_conversation(tiny_models):
    c = neverfade.load(tiny_models["llava"], device="cpu", paper=True)
    assert c.model.dtype == torch.float16
    assert c.prompt_text(PROMPT) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nPlease describe this image in detail. "
        "ASSISTANT:"
    )
    assert neverfade.load(tiny_models["llava"], device="cpu").prompt_text(PROMPT).startswith("USER:")


def test_llava_pads_the_image_to_a_square_of_the_mean_colour(tiny_models):
    """As LLaVA-1.5's image_aspect_ratio "pad" does: against padding by hand, then the checkpoint's own processor."""
    plain = neverfade.load(tiny_models["llava"], device="cpu")
    paper = neverfade.load(tiny_models["llava"], device="cpu", paper=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 70, 3), dtype=np.uint8))
    mean = tuple(int(x * 255) for x in plain.processor.image_processor.image_mean)
    square = Image.new("RGB", (70, 70), mean)
    square.paste(image, (0, 20))
    ours = paper.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    by_hand = plain.processor.image_processor(images=[square], return_tensors="pt")["pixel_values"]
    cropped = plain.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, by_hand)
    assert not torch.allclose(ours, cropped)


def test_sparc_acts_in_paper_mode(tiny_models):
    c = neverfade.load(
        tiny_models["llava_next"],
        device="cpu",
        paper=True,
        methods=["sparc"],
        method_params={"sparc": {"tau": 0.05, "alpha": 1.5, "layer": 2}},
    )
    images = [Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))]
    with_sparc = c.caption(images, max_new_tokens=16, min_new_tokens=16)[0].text
    assert (c.engine.batch.state(c.methods[0]).weight > 1).any()
    c.use([])
    assert c.caption(images, max_new_tokens=16, min_new_tokens=16)[0].text != with_sparc


def test_qwen2_vl_keeps_its_chat_template_and_dtype(tiny_models):
    plain = neverfade.load(tiny_models["qwen2_vl"], device="cpu")
    paper = neverfade.load(tiny_models["qwen2_vl"], device="cpu", paper=True)
    assert paper.prompt_text(PROMPT) == plain.prompt_text(PROMPT)
    assert paper.model.dtype == plain.model.dtype


def test_families_the_authors_did_not_run_and_other_dtypes_are_refused(tiny_models):
    with pytest.raises(ValueError, match="did not run qwen2.5-vl"):
        neverfade.load(tiny_models["qwen2_5_vl"], device="cpu", paper=True)
    with pytest.raises(ValueError, match="in float16, as the authors did; got bfloat16"):
        neverfade.load(tiny_models["llava"], device="cpu", paper=True, dtype="bfloat16")
    c = neverfade.load(tiny_models["llava"], device="cpu")
    with pytest.raises(ValueError, match="in float16"):
        neverfade.Captioner(c.model, c.processor, paper=True)
    assert "{image}" in VICUNA_V1 and "{prompt}" in VICUNA_V1


def test_paper_mode_and_dtype_are_part_of_the_resume_key(tiny_models):
    """A rerun in paper mode, or in another dtype, must not take the earlier run's captions as its own."""
    from neverfade.runner import prepare_runs

    def run_id(**load):
        c = neverfade.load(tiny_models["llava"], device="cpu", **load)
        return prepare_runs(c, [(["sparc"], None)], PROMPT, {"max_new_tokens": 8})[0].id

    ids = {run_id(), run_id(paper=True), run_id(dtype="bfloat16")}
    assert len(ids) == 3
