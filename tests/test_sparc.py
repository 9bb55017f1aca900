"""SPARC's fast path against the plain reference, on every family; batching against one image at a time."""

import pytest
import torch
from conftest import make_images
from reference_sparc import ReferenceSPARC
from transformers import AutoModelForImageTextToText, DynamicCache

import neverfade
from neverfade import compat
from neverfade.methods import ParameterError
from neverfade.models.random import FAMILIES

STEPS = 24
GREEDY = dict(
    max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_scores=True, return_dict_in_generate=True
)
SPARC = dict(tau=0.05, alpha=1.5, layer=2)


def inputs_for(captioner, images, prompts):
    texts = [captioner.prompt_text(p) for p in prompts]
    return captioner.processor(text=texts, images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_equals_reference(tiny_models, family):
    c = neverfade.load(tiny_models[family], device="cpu")
    inputs = inputs_for(c, make_images()[1:2], [neverfade.DEFAULT_PROMPT])
    baseline = c.model.generate(**inputs, **GREEDY)
    c.use(["sparc"], {"sparc": SPARC})
    fast = c.model.generate(**inputs, **GREEDY)

    ref_model = AutoModelForImageTextToText.from_pretrained(tiny_models[family]).eval()
    ref = ReferenceSPARC(c.engine.info.image_token_id, **SPARC)
    ref.attach(ref_model, inputs["input_ids"])
    # a cache without the config keeps every key in every layer (sliding-window ones too, masked as the model masks
    # them), so the reference's key index is the position, as neverfade's is
    reference = ref_model.generate(**inputs, past_key_values=DynamicCache(), **GREEDY)

    assert ref.total_selected > 0, "tau must be low enough for selections to happen"
    assert (c.engine.batch.state(c.methods[0]).weight > 1).sum().item() > 0
    assert len(set(baseline.sequences[0, -STEPS:].tolist())) > 3, "the random model must not repeat one token"
    assert not torch.equal(fast.sequences, baseline.sequences), "SPARC must change the output here"
    assert torch.equal(fast.sequences, reference.sequences)
    for ours, theirs in zip(fast.scores, reference.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_image_alone(tiny_models, family):
    c = neverfade.load(tiny_models[family], device="cpu", methods=["sparc"], method_params={"sparc": SPARC})
    images = make_images()
    prompts = [neverfade.DEFAULT_PROMPT, "Describe it.", "What is in this picture? Describe every object."]
    batch = inputs_for(c, images, prompts)
    assert (batch["attention_mask"] == 0).any(), "the batch must need left padding"
    together = c.model.generate(**batch, **GREEDY)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        alone = c.model.generate(**inputs_for(c, [image], [prompt]), **GREEDY)
        assert torch.equal(together.sequences[i, -STEPS:], alone.sequences[0, -STEPS:])
        for ours, theirs in zip(together.scores, alone.scores):
            torch.testing.assert_close(ours[i], theirs[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_no_method_and_identity_method_equal_stock_generate(tiny_models, family):
    """No method attached runs stock SDPA; SPARC with alpha = 1 runs the explicit attention row in every layer and
    changes nothing, so both must equal stock `generate` on a padded batch."""
    c = neverfade.load(tiny_models[family], device="cpu")
    batch = inputs_for(c, make_images(), ["Describe it.", neverfade.DEFAULT_PROMPT, "Hi"])
    stock = c.model.generate(**batch, **GREEDY)
    from neverfade.engine.engine import Engine

    engine = Engine(c.model, []).attach()
    empty = c.model.generate(**batch, **GREEDY)
    engine.detach()
    c.use(["sparc"], {"sparc": {"alpha": 1.0, "tau": 0.0}})
    assert all(c.engine.decode_layers), "every layer must take the explicit path"
    identity = c.model.generate(**batch, **GREEDY)
    assert torch.equal(stock.sequences, empty.sequences)
    assert torch.equal(stock.sequences, identity.sequences)
    for s, i in zip(stock.scores, identity.scores):
        torch.testing.assert_close(s, i, atol=1e-4, rtol=1e-4)


def test_sampling_is_batched_and_seeded(tiny_models):
    c = neverfade.load(tiny_models["qwen2_vl"], device="cpu", methods=["sparc"], method_params={"sparc": SPARC})
    images = make_images()
    torch.manual_seed(7)
    first = [r.text for r in c.caption(images, max_new_tokens=12, do_sample=True)]
    torch.manual_seed(7)
    second = [r.text for r in c.caption(images, max_new_tokens=12, do_sample=True)]
    greedy = [r.text for r in c.caption(images, max_new_tokens=12)]
    assert first == second
    assert first != greedy


def test_beam_search_is_refused_with_methods(tiny_models):
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sparc"])
    with pytest.raises(ValueError, match="beam search"):
        c.caption(make_images()[:1], max_new_tokens=4, num_beams=2)
    c.use([])
    assert len(c.caption(make_images()[:1], max_new_tokens=4, num_beams=2)) == 1


CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the captured decode path needs CUDA"),
]


@pytest.mark.parametrize("decode", ["eager", "static", pytest.param("captured", marks=CUDA)])
@pytest.mark.parametrize("family", FAMILIES)
def test_sparc_changes_the_output_on_every_family_and_path(tiny_models, family, decode):
    """What transformers 5.24 broke silently (the cache under a new name: every step looked like a new prompt)."""
    c = neverfade.load(tiny_models[family], device="cuda" if decode == "captured" else "cpu", dtype="float32")
    c.decode = decode
    inputs = c.inputs(make_images()[1:2])
    with torch.no_grad():
        baseline = c.generate(**inputs, **GREEDY)
        c.use(["sparc"], {"sparc": SPARC})
        assert c.decode_path() == decode
        sparc = c.generate(**inputs, **GREEDY)
    if decode == "captured":
        assert c.model._neverfade_last_loop.captured
    else:
        assert c.engine.batch.step == STEPS - 1  # every decode step reached the engine
    assert (c.engine.batch.state(c.methods[0]).weight > 1).any()
    assert not torch.equal(sparc.sequences, baseline.sequences)


def test_methods_that_never_see_a_decode_step_are_an_error(tiny_models):
    """Without the KV cache each step is a whole new prompt, and no method could act: refused, never the baseline."""
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sparc"])
    with pytest.raises(compat.UnsupportedTransformers, match="saw no decode step"):
        c.caption(make_images()[:1], max_new_tokens=4, min_new_tokens=4, use_cache=False)


def test_a_cache_under_an_unknown_name_is_an_error(tiny_models, monkeypatch):
    """A release that passes the cache under a name neverfade does not know fails at the first decode step."""
    c = neverfade.load(tiny_models["qwen2_vl"], device="cpu", methods=["sparc"])
    monkeypatch.setattr(compat, "_CACHE_NAMES", ("renamed_cache",))
    with pytest.raises(compat.UnsupportedTransformers, match="without the KV cache"):
        c.caption(make_images()[:1], max_new_tokens=4)


def test_attach_passes_keyword_parameters_and_refuses_unknown_ones(tiny_models):
    c = neverfade.load(tiny_models["llava"], device="cpu")
    attached = neverfade.attach(c.model, c.processor, "sparc", tau=2.0, alpha=1.3)
    assert (attached.methods[0].tau, attached.methods[0].alpha) == (2.0, 1.3)
    attached.use([])
    with pytest.raises(ParameterError, match="has no parameter tua"):
        neverfade.attach(c.model, c.processor, "sparc", tua=2.0)
    with pytest.raises(ValueError, match="exactly one method"):
        neverfade.attach(c.model, c.processor, "sparc", "locore", tau=2.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_is_one_float32_and_one_int16_per_image_token(tiny_models, family):
    """SPARC's state, measured from its tensors after a padded batch: an EMA (float32) and a selection count (int16)
    per sequence and per position from the batch's first to its last image token, and nothing else; the bench
    reports the same size, in 4-byte floats per image token per sequence."""
    from neverfade.commands.bench import state_floats_per_image_token

    c = neverfade.load(tiny_models[family], device="cpu", methods=["sparc"], method_params={"sparc": SPARC})
    for images, prompts in [(make_images()[1:2], ["Describe it."]), (make_images(), ["Describe it.", "Hi", "What?"])]:
        inputs = inputs_for(c, images, prompts)
        c.model.generate(**inputs, **GREEDY)
        state = c.engine.batch.state(c.methods[0])
        tensors = [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
        state_bytes = sum(t.numel() * t.element_size() for t in tensors)
        image = inputs["input_ids"] == c.engine.info.image_token_id
        positions = image.any(0).nonzero().flatten()
        span = int(positions[-1] - positions[0] + 1)
        assert state_bytes == (4 + 2) * span * len(prompts)
        per_token = state_bytes / int(image.sum())  # bytes per image token per sequence
        if span * len(prompts) == int(image.sum()):  # one prompt, its image tokens in one run: exactly 6 bytes
            assert per_token == 6
        assert state_floats_per_image_token(c) == {"sparc": round(per_token / 4, 3)}
        assert (state.weight > 1).any()


def test_an_attention_the_rows_do_not_compute_is_refused(tiny_models):
    """Logit soft-capping or attention sinks in a layer where a method acts: the rows would drop them, so the run
    stops, naming them; in a layer no method touches they go to SDPA as before."""
    from neverfade.errors import CannotAct

    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sparc"], method_params={"sparc": {"start": 1}})
    attentions = [m for m in c.model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    q = k = v = torch.randn(1, attentions[0].config.num_attention_heads, 3, attentions[0].head_dim)
    with pytest.raises(CannotAct, match="softcap"):
        c.engine.attend(attentions[1], q, k, v, None, None, 0.0, softcap=30.0)
    out, _ = c.engine.attend(attentions[1], q, k, v, None, None, 0.0, softcap=None, s_aux=None)
    assert out.shape == (1, 3, q.shape[1], q.shape[-1])
    assert not c.engine.decode_layers[0] and not c.engine.prefill_layers[0]  # layer 0: no method acts
    try:  # SDPA's own answer, as without neverfade: transformers 5.24 refuses softcap, 5.17 ignores it
        c.engine.attend(attentions[0], q, k, v, None, None, 0.0, softcap=30.0)
    except CannotAct:
        pytest.fail("a layer no method touches must be left to SDPA")
    except ValueError as err:
        assert "softcap" in str(err)
