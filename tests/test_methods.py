"""naive, PAI and LocoRE against plain references; composition order; parameter errors."""

import pytest
import torch
from conftest import make_images
from reference_methods import ReferenceMethods
from transformers import AutoModelForImageTextToText

import neverfade
from neverfade.methods import ParameterError, build_methods

STEPS = 24
GREEDY = dict(
    max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_scores=True, return_dict_in_generate=True
)
CASES = {  # strong enough to change a random model's output within STEPS tokens
    "naive": {"alpha": 3.0, "start": 1, "end": 3},
    "pai": {"alpha": 1.0, "start": 1, "end": 3},
    "locore": {"beta": 2.0, "window": 3, "start": 0, "end": 2},
}


def inputs_for(c, images, prompts):
    return c.processor(text=[c.prompt_text(p) for p in prompts], images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", CASES)
def test_fast_path_equals_reference(tiny_models, family, method):
    c = neverfade.load(tiny_models[family], device="cpu")
    inputs = inputs_for(c, make_images()[2:], [neverfade.DEFAULT_PROMPT])
    baseline = c.model.generate(**inputs, **GREEDY)
    c.use([method], {method: CASES[method]})
    fast = c.model.generate(**inputs, **GREEDY)
    ref_model = AutoModelForImageTextToText.from_pretrained(tiny_models[family]).eval()
    ReferenceMethods(**{method: CASES[method]}).attach(ref_model, inputs["input_ids"], c.engine.info.image_token_id)
    reference = ref_model.generate(**inputs, **GREEDY)
    assert not torch.equal(fast.sequences, baseline.sequences), f"{method} must change the output here"
    assert torch.equal(fast.sequences, reference.sequences)
    for ours, theirs in zip(fast.scores, reference.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_composition_order_does_not_matter(tiny_models, family):
    """Pre-softmax edits all run before any reweighting and reweightings are products, so order cannot matter."""
    c = neverfade.load(tiny_models[family], device="cpu")
    inputs = inputs_for(c, make_images(), ["Describe it.", neverfade.DEFAULT_PROMPT, "Hi"])
    params = {"sparc": {"tau": 0.05, "alpha": 1.5}, **CASES}
    results = []
    for order in (["sparc", "locore", "pai"], ["pai", "locore", "sparc"], ["locore", "sparc", "pai"]):
        c.use(order, {m: params[m] for m in order})
        results.append(c.model.generate(**inputs, **GREEDY))
    c.use(["sparc"], {"sparc": params["sparc"]})
    alone = c.model.generate(**inputs, **GREEDY)
    assert not torch.equal(results[0].sequences, alone.sequences), "the composition must differ from SPARC alone"
    for other in results[1:]:
        assert torch.equal(results[0].sequences, other.sequences)
        for a, b in zip(results[0].scores, other.scores):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_locore_with_sparc_equals_both_references_chained(tiny_models):
    """SPARC + LocoRE on a batch equals, row by row, the same pair on one image at a time."""
    c = neverfade.load(
        tiny_models["llava"],
        device="cpu",
        methods=["sparc", "locore"],
        method_params={"sparc": {"tau": 0.05, "alpha": 1.5}, "locore": CASES["locore"]},
    )
    images, prompts = make_images(), ["Describe it.", neverfade.DEFAULT_PROMPT, "What is in this picture?"]
    together = c.model.generate(**inputs_for(c, images, prompts), **GREEDY)
    for i in range(3):
        alone = c.model.generate(**inputs_for(c, images[i : i + 1], prompts[i : i + 1]), **GREEDY)
        assert torch.equal(together.sequences[i, -STEPS:], alone.sequences[0, -STEPS:])


@pytest.mark.parametrize(
    "methods,params,message",
    [
        (["naive"], {"naive": {"alpha": -1}}, "alpha must be >= 0.0"),
        (["locore"], {"locore": {"window": 0}}, "window must be >= 1"),
        (["locore"], {"locore": {"gamma": 1.0}}, "locore has no parameter gamma"),
        (["pai"], {"pai": {"cfg": "maybe"}}, "cfg must be true or false"),
        (["sparc", "sparc"], None, "listed twice"),
    ],
)
def test_impossible_parameters_are_refused(methods, params, message):
    with pytest.raises(ParameterError, match=message):
        build_methods(methods, params)


def test_layer_range_is_checked_against_the_model(tiny_models):
    with pytest.raises(ParameterError, match="end 9 is beyond the model's depth"):
        neverfade.load(tiny_models["llava"], device="cpu", methods=["locore"], method_params={"locore": {"end": 9}})
    with pytest.raises(ParameterError, match="start .3. is after end .1."):
        neverfade.load(
            tiny_models["llava"], device="cpu", methods=["pai"], method_params={"pai": {"start": 3, "end": 1}}
        )


def reference_pai_cfg(model, inputs, image_token_id, eos_id, alpha, gamma, cfg_cutoff, start, end):
    """Batch size 1, no cache: the boosted branch with the image and the plain branch without it, every step whole."""
    import math

    from conftest import full_forward_inputs

    ids = inputs["input_ids"]
    plain_ids = ids[ids != image_token_id][None]
    chosen = []
    for _ in range(STEPS):
        ReferenceMethods(pai={"alpha": alpha, "start": start, "end": end}).attach(model, ids, image_token_id)
        cond = torch.log_softmax(model(**full_forward_inputs(inputs, ids)).logits[0, -1], -1)
        ReferenceMethods().attach(model, plain_ids, image_token_id)
        uncond = torch.log_softmax(model(input_ids=plain_ids, use_cache=False).logits[0, -1], -1)
        guided = gamma * (cond - uncond) + uncond
        guided[cond < math.log(cfg_cutoff) + cond.max()] = float("-inf")
        guided[eos_id] = float("-inf")
        chosen.append(int(guided.argmax()))
        ids = torch.cat([ids, torch.tensor([[chosen[-1]]])], 1)
        plain_ids = torch.cat([plain_ids, torch.tensor([[chosen[-1]]])], 1)
    return chosen


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pai_guidance_equals_plain_reference(tiny_models, family):
    """Without the boost (alpha = 0), so that recomputing without a cache is exact; the boost in the guided branch
    is checked by the next test."""
    params = {"alpha": 0.0, "start": 1, "end": 3, "cfg": True, "gamma": 2.0, "cfg_cutoff": 0.05}
    c = neverfade.load(tiny_models[family], device="cpu")
    inputs = inputs_for(c, make_images()[1:2], [neverfade.DEFAULT_PROMPT])
    baseline = c.model.generate(**inputs, **GREEDY).sequences[0, -STEPS:].tolist()
    c.use(["pai"], {"pai": params})
    fast = c.generate(**inputs, **GREEDY).sequences[0, -STEPS:].tolist()
    ref_model = AutoModelForImageTextToText.from_pretrained(tiny_models[family]).eval()
    with torch.no_grad():
        reference = reference_pai_cfg(
            ref_model,
            inputs,
            c.engine.info.image_token_id,
            c.model.generation_config.eos_token_id,
            **{k: v for k, v in params.items() if k != "cfg"},
        )
    assert fast != baseline, "the guidance must change the output here"
    assert fast == reference


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_pai_guidance_at_gamma_one_is_the_boost_alone(tiny_models, family):
    """gamma = 1 leaves cond: the guided loop must then give exactly what the boost gives under generate."""
    boost = {"alpha": 1.0, "start": 1, "end": 3}
    c = neverfade.load(tiny_models[family], device="cpu")
    inputs = inputs_for(c, make_images(), ["Describe it.", neverfade.DEFAULT_PROMPT, "Hi"])
    baseline = c.model.generate(**inputs, **GREEDY).sequences
    c.use(["pai"], {"pai": boost})
    boosted = c.generate(**inputs, **GREEDY).sequences
    c.use(["pai"], {"pai": {**boost, "cfg": True, "gamma": 1.0, "cfg_cutoff": 0.0}})
    guided = c.generate(**inputs, **GREEDY).sequences
    assert not torch.equal(boosted, baseline)
    assert torch.equal(guided, boosted)


def test_two_methods_that_choose_tokens_are_refused_before_a_model_loads(capsys):
    """PAI with cfg has a decoding loop of its own, known from its parameters: with VCD's, one line, exit 2."""
    from neverfade.cli import main
    from neverfade.methods import ParameterError, build_methods

    with pytest.raises(ParameterError, match="vcd and pai each choose tokens"):
        build_methods(["vcd", "pai"], {"pai": {"cfg": True}})
    assert len(build_methods(["vcd", "pai"])) == 2  # PAI without cfg only boosts attention
    status = main(
        [
            "caption",
            "--samples",
            "1",
            "--method",
            "vcd",
            "--method",
            "pai",
            "--pai-cfg",
            "--model",
            "/nonexistent-model-folder",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "each choose tokens their own way" in err[0]
