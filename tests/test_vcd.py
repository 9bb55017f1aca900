"""VCD's two-branch loop against a plain reference that recomputes both branches from scratch each step."""

import math

import pytest
import torch
from conftest import full_forward_inputs, make_images

import neverfade
from neverfade.engine.contract import Flags

STEPS = 16
VCD = {"alpha": 3.0, "beta": 0.05, "noise_step": 999, "seed": 3}


def reference_noise(pixels, step, seed):
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, 0)[step]
    eps = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
    return abar.sqrt() * pixels + (1 - abar).sqrt() * eps


def reference_vcd(model, inputs, eos_id, alpha, beta, noise_step, seed):
    """Batch size 1, no KV cache: both branches run on the whole sequence at every step; greedy."""
    noised = reference_noise(inputs["pixel_values"], noise_step, seed)  # one image: its noise is the first draw
    ids, chosen = inputs["input_ids"], []
    for _ in range(STEPS):
        full = full_forward_inputs(inputs, ids)
        clean = model(**full).logits[0, -1]
        noisy = model(**{**full, "pixel_values": noised}).logits[0, -1]
        combined = (1 + alpha) * clean - alpha * noisy
        combined[clean < math.log(beta) + clean.max()] = float("-inf")
        combined[eos_id] = float("-inf")  # min_new_tokens keeps the fast path from stopping
        chosen.append(int(combined.argmax()))
        ids = torch.cat([ids, torch.tensor([[chosen[-1]]])], dim=1)
    return chosen


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vcd_equals_plain_reference(tiny_models, family):
    c = neverfade.load(tiny_models[family], device="cpu")
    inputs = c.processor(text=[c.prompt_text("Describe.")], images=make_images()[1:2], return_tensors="pt")
    greedy = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    baseline = c.model.generate(**inputs, **greedy)[0, -STEPS:].tolist()
    c.use(["vcd"], {"vcd": VCD})
    fast = c.generate(**inputs, **greedy)[0, -STEPS:].tolist()
    with torch.no_grad():
        reference = reference_vcd(c.model, inputs, c.model.generation_config.eos_token_id, **VCD)
    assert fast != baseline, "VCD must change the output here"
    assert fast == reference


def test_vcd_batch_equals_alone_and_samples(tiny_models):
    c = neverfade.load(tiny_models["llava_next"], device="cpu", methods=["vcd"], method_params={"vcd": VCD})
    images = make_images()
    together = [r.text for r in c.caption(images, max_new_tokens=10)]
    alone = [c.caption([im], max_new_tokens=10)[0].text for im in images]
    assert together == alone
    torch.manual_seed(1)
    sampled = [r.text for r in c.caption(images, max_new_tokens=10, do_sample=True)]
    torch.manual_seed(1)
    assert sampled == [r.text for r in c.caption(images, max_new_tokens=10, do_sample=True)]
    assert sampled != together


def test_vcd_without_contrast_is_the_baseline(tiny_models):
    c = neverfade.load(tiny_models["qwen2_5_vl"], device="cpu")
    images = make_images()
    baseline = [r.text for r in c.caption(images, max_new_tokens=12)]
    c.use(["vcd"], {"vcd": {"alpha": 0.0, "beta": 0.0}})
    assert [r.text for r in c.caption(images, max_new_tokens=12)] == baseline


def test_two_decoding_strategies_are_refused():
    from neverfade.methods import ParameterError, build_methods

    class Other(neverfade.Method):
        name, summary = "other", "x"

        def flags(self):
            return Flags(strategy="rejection")

    with pytest.raises(ParameterError, match="vcd and other each choose tokens their own way"):
        build_methods(["vcd", Other()])
