"""SGRS against a plain reference; the batched saliency backward against one backward per candidate; composition."""

import pytest
import torch
from conftest import make_images
from reference_sgrs import reference_sgrs
from transformers import AutoModelForImageTextToText

import neverfade
from neverfade.decoding.rejection import saliencies

STEPS = 12
SGRS = {"alpha": 1.1, "k": 4, "tries": 3, "window": 5, "start": 2, "end": 3}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sgrs_equals_plain_reference(tiny_models, family):
    c = neverfade.load(tiny_models[family], device="cpu")
    inputs = c.processor(text=[c.prompt_text("Describe.")], images=make_images()[:1], return_tensors="pt")
    greedy = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    baseline = c.model.generate(**inputs, **greedy)[0, -STEPS:].tolist()
    c.use(["sgrs"], {"sgrs": SGRS})
    fast = c.generate(**inputs, **greedy)[0, -STEPS:].tolist()
    fast_rejected = c.methods[0].last_rejected
    ref_model = AutoModelForImageTextToText.from_pretrained(tiny_models[family]).eval()
    reference, ref_rejected = reference_sgrs(
        ref_model, inputs, c.engine.info.image_token_id, c.model.generation_config.eos_token_id, STEPS, **SGRS
    )
    assert ref_rejected > 0, "the threshold must turn candidates down"
    assert fast != baseline
    assert fast == reference
    assert fast_rejected == ref_rejected


def test_batched_backward_equals_one_backward_per_candidate():
    torch.manual_seed(0)
    rows = [torch.rand(2, 2, 3, 7, requires_grad=True) for _ in range(2)]  # (B, KVH, G, T) per layer
    mix = torch.randn(2 * 3 * 7, 11)
    h = torch.tanh(rows[0].reshape(2, -1) @ mix) + (rows[1].reshape(2, -1) ** 2) @ mix
    logits = h @ torch.randn(11, 13)
    candidates = torch.tensor([[0, 5, 7], [12, 3, 1]])
    keys = torch.tensor([[False] * 3 + [True] * 4, [False] * 5 + [True] * 2])
    batched = saliencies(logits, candidates, rows, keys, batched=True)
    looped = saliencies(logits, candidates, rows, keys, batched=False)
    assert batched.shape == (2, 3) and not torch.allclose(batched[:, 0], batched[:, 1])
    torch.testing.assert_close(batched, looped)


def test_sgrs_with_locore_batched_equals_alone(tiny_models):
    c = neverfade.load(
        tiny_models["llava_next"],
        device="cpu",
        methods=["locore", "sgrs"],
        method_params={"sgrs": SGRS, "locore": {"beta": 2.0, "window": 3}},
    )
    images = make_images()
    together = [r.text for r in c.caption(images, max_new_tokens=10)]
    alone = [c.caption([im], max_new_tokens=10)[0].text for im in images]
    assert together == alone
    c.use(["sgrs"], {"sgrs": SGRS})
    assert [r.text for r in c.caption(images, max_new_tokens=10)] != together


def test_state_kept_across_steps_holds_no_graph(tiny_models):
    """Under SGRS the step's forward keeps a graph from the first target layer (2) on; what observers keep at a later
    layer (SPARC's EMA, the attention probe) must not hold it, or every step's graph would stay alive."""
    c = neverfade.load(
        tiny_models["llava"],
        device="cpu",
        methods=["sparc", "sgrs"],
        method_params={"sgrs": SGRS, "sparc": {"tau": 0.05, "layer": 3}},
    )
    c.record_attention(layer=3)
    captions = c.caption(make_images(), max_new_tokens=6)
    assert all(len(cap.image_attention) == 6 for cap in captions)
    batch = c.engine.batch
    sparc = batch.state(c.engine.methods[0])
    assert not sparc.ema.requires_grad and not sparc.weight.requires_grad
    shares = batch.state(c.attention_probe).rows
    assert len(shares) == 6 and not any(s.requires_grad for s in shares)
