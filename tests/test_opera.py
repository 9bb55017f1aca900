"""OPERA's beam search against a plain cache-free reference; without its penalty against transformers' beam search;
batches; composition with attention methods; refused parameters."""

from types import SimpleNamespace

import pytest
import torch
from conftest import make_images
from reference_opera import ReferenceOPERA
from transformers import AutoModelForImageTextToText, LogitsProcessor

import neverfade
from neverfade.methods import Method, ParameterError, build_methods

STEPS = 20
GREEDY = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
SMALL = dict(num_beams=3, candidates=4, early=2)
NO_ROLLBACK = 10_000  # a threshold no location reaches
PENALTY_CASES = {
    "llava": dict(SMALL, scale=1000.0, threshold=NO_ROLLBACK),
    "qwen2_vl": dict(SMALL, scale=200.0, threshold=NO_ROLLBACK),
}
ROLLBACK_CASES = [
    ("llava", dict(SMALL, scale=100.0, threshold=2), True),
    ("llava", dict(SMALL, num_beams=2, candidates=2, scale=70.0, threshold=2), True),  # 2 to one place
    ("qwen2_vl", dict(SMALL, scale=100.0, threshold=2), False),
]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run many small forwards: one thread is much faster, above all beside other CPU work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_image(c):
    return c.processor(text=[c.prompt_text("Describe.")], images=make_images()[1:2], return_tensors="pt")


def opera(c, inputs, params, **generate):
    c.use(["opera"], {"opera": params})
    out = c.generate(**inputs, **{**GREEDY, **generate})
    return out[0, -STEPS:].tolist(), c.methods[0].last_rollbacks[0]


def reference(path, c, inputs, params):
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    ref = ReferenceOPERA(model, inputs, c.engine.info.image_token_id, c.model.generation_config.eos_token_id, **params)
    with torch.no_grad():
        tokens = ref.run(STEPS)
    return tokens, ref.rollbacks


@pytest.mark.parametrize("family", PENALTY_CASES)
def test_penalty_equals_reference(tiny_models, family):
    params = PENALTY_CASES[family]
    c = neverfade.load(tiny_models[family], device="cpu")
    inputs = one_image(c)
    beam_search = c.model.generate(**inputs, num_beams=3, **GREEDY)[0, -STEPS:].tolist()
    without_penalty, _ = opera(c, inputs, dict(params, penalty=0.0))
    fast, rollbacks = opera(c, inputs, params)
    expected, expected_rollbacks = reference(tiny_models[family], c, inputs, params)
    assert fast != without_penalty, "the penalty must change the output here"
    assert fast != beam_search
    assert rollbacks == expected_rollbacks == []
    assert fast == expected


@pytest.mark.parametrize("family,params,changes", ROLLBACK_CASES)
def test_rollback_equals_reference(tiny_models, family, params, changes):
    c = neverfade.load(tiny_models[family], device="cpu")
    inputs = one_image(c)
    fast, rollbacks = opera(c, inputs, params)
    expected, expected_rollbacks = reference(tiny_models[family], c, inputs, params)
    assert rollbacks, "the search must roll back here"
    assert rollbacks == expected_rollbacks
    assert fast == expected
    if changes:
        assert fast != opera(c, inputs, dict(params, threshold=NO_ROLLBACK))[0], "the roll-backs must change the output"


class KeepTop(LogitsProcessor):
    """Beam search over each beam's top-k tokens, their log-probabilities renormalised among them."""

    def __init__(self, k):
        self.k = k

    def __call__(self, input_ids, scores):
        top = scores.topk(self.k, dim=-1)
        return torch.full_like(scores, float("-inf")).scatter(1, top.indices, torch.log_softmax(top.values, -1))


@pytest.mark.parametrize("family,candidates", [("llava", None), ("qwen2_vl", 3)])
def test_without_penalty_is_transformers_beam_search(tiny_models, family, candidates):
    """With no penalty and no roll-back, OPERA is beam search over each beam's candidates, their probabilities
    renormalised among them (the paper's softmax over the candidate set): with the whole vocabulary as candidates,
    transformers' own beam search. An end-of-sequence token that turns up early and a length penalty exercise the
    finished hypotheses."""
    c = neverfade.load(tiny_models[family], device="cpu")
    inputs = one_image(c)
    vocab = c.model.config.get_text_config().vocab_size
    plain = c.model.generate(**inputs, num_beams=3, max_new_tokens=12, do_sample=False)[0, -12:].tolist()
    settings = dict(
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=plain[3],
        length_penalty=0.7,
        return_dict_in_generate=True,
        output_scores=True,
    )
    processors = [KeepTop(candidates)] if candidates else []
    theirs = c.model.generate(**inputs, num_beams=3, logits_processor=processors, **settings)
    c.use(["opera"], {"opera": dict(num_beams=3, candidates=candidates or vocab, penalty=0.0, threshold=NO_ROLLBACK)})
    ours = c.generate(**inputs, **settings)
    assert theirs.sequences.shape[1] < inputs["input_ids"].shape[1] + 12, "a hypothesis must finish early here"
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores)


def test_batch_equals_alone(tiny_models):
    """Images of different sizes (different prompt lengths, left padding) through caption(), with roll-backs."""
    c = neverfade.load(
        tiny_models["llava_next"],
        device="cpu",
        methods=["opera"],
        method_params={"opera": dict(SMALL, scale=100.0, threshold=2)},
    )
    images = make_images()
    together = [r.text for r in c.caption(images, max_new_tokens=STEPS)]
    rollbacks = c.methods[0].last_rollbacks
    alone = [c.caption([im], max_new_tokens=STEPS)[0].text for im in images]
    assert len(rollbacks) == 3 and any(rollbacks), "some image must roll back here"
    assert together == alone


class Force(LogitsProcessor):
    def __init__(self, tokens, start):
        self.tokens, self.start = tokens, start

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.start]] = 0.0
        return forced


def forced_score(c, inputs, tokens, candidates, redone=()):
    """The sum over `tokens` of their log-probabilities when forced through c's methods: renormalised among each
    step's top `candidates` logits, or over the whole vocabulary at the positions in `redone`."""
    steps = len(tokens)
    forced = c.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        logits_processor=[Force(tokens, inputs["input_ids"].shape[1])],
        return_dict_in_generate=True,
    )
    assert forced.sequences[0, -steps:].tolist() == tokens
    total = 0.0
    for q, (logits, token) in enumerate(zip(forced.logits, tokens)):
        among = logits[0] if q in redone else logits[0].topk(candidates).values
        total += logits[0, token] - torch.logsumexp(among, 0)
    return total


def test_attention_methods_follow_the_beams(tiny_models):
    """Without penalty, a beam's score is the sum over its tokens of their log-probabilities under the other methods'
    own dynamics: renormalised among the candidates, or over the whole vocabulary at a step redone after a roll-back.
    So SPARC's and LocoRE's state must follow every beam through candidates, reordering and roll-backs."""
    c = neverfade.load(tiny_models["qwen2_vl"], device="cpu")
    inputs = one_image(c)
    others = {"sparc": {"tau": 0.05, "alpha": 1.5}, "locore": {"beta": 2.0, "window": 3}}
    params = dict(SMALL, penalty=0.0, scale=100.0, threshold=3)
    c.use(["sparc", "locore", "opera"], {**others, "opera": params})
    ours = c.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_scores=True)
    rollbacks = c.methods[-1].last_rollbacks[0]
    tokens = ours.sequences[0, -STEPS:].tolist()
    assert len(rollbacks) > 1, "the search must roll back here"
    redone = set()  # the positions of the final beams last chosen by a redone step
    for _, position in rollbacks:
        redone = {q for q in redone if q < position} | {position}
    c.use(["sparc", "locore"], others)
    total = forced_score(c, inputs, tokens, SMALL["candidates"], redone)
    assert tokens != opera(c, inputs, params)[0], "the other methods must change the output here"
    torch.testing.assert_close(ours.sequences_scores[0] * STEPS, total, atol=1e-4, rtol=1e-5)


def test_a_beam_without_candidates_is_replaced(tiny_models):
    """When a logits processor excludes every candidate of some beams, transformers' bookkeeping keeps a continuation
    scored -inf as a running beam; its token (no candidate) is fed on its own, and the other beams go on exactly."""
    c = neverfade.load(tiny_models["llava"], device="cpu")
    inputs = one_image(c)
    c.use(["opera"], {"opera": dict(num_beams=3, candidates=2, penalty=0.0, threshold=NO_ROLLBACK)})
    ours = c.generate(
        **inputs,
        max_new_tokens=10,
        min_new_tokens=10,
        do_sample=False,
        suppress_tokens=[254, 384],
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert c.methods[0].last_fallbacks == [1], "a beam must lose all its candidates here"
    tokens = ours.sequences[0, -10:].tolist()
    c.use([])
    torch.testing.assert_close(ours.sequences_scores[0] * 10, forced_score(c, inputs, tokens, 2), atol=1e-4, rtol=1e-5)


class Listed(Method):
    name, summary = "listed", "keeps a list per batch"

    State = SimpleNamespace

    def new_state(self, batch):
        return SimpleNamespace(seen=[])


@pytest.mark.parametrize(
    "params,message",
    [
        ({"num_beams": 0}, "num_beams must be >= 1"),
        ({"candidates": 0}, "candidates must be >= 1"),
        ({"threshold": 1}, "threshold must be >= 2"),
        ({"scale": 0.0}, "scale must be > 0"),
        ({"penalty": -1.0}, "penalty must be >= 0.0"),
        ({"window": 0}, "window must be >= 1"),
        ({"early": 0}, "early must be >= 1"),
    ],
)
def test_impossible_parameters_are_refused(params, message):
    with pytest.raises(ParameterError, match=message):
        build_methods(["opera"], {"opera": params})


def test_impossible_runs_are_refused(tiny_models):
    with pytest.raises(ParameterError, match="vcd and opera each choose tokens their own way"):
        build_methods(["vcd", "opera"])
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["opera"])
    inputs = one_image(c)
    with pytest.raises(ValueError, match="opera runs its own beams"):
        c.generate(**inputs, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="sampling"):
        c.generate(**inputs, max_new_tokens=2, do_sample=True)
    c.use(["opera"], {"opera": {"candidates": 10_000}})
    with pytest.raises(ParameterError, match="10000 candidates for a vocabulary of 512"):
        c.generate(**inputs, max_new_tokens=2)
    c.use([Listed(), neverfade.methods.METHODS["opera"]()])
    with pytest.raises(ParameterError, match="cannot make listed's state .seen. follow its beams"):
        c.generate(**inputs, max_new_tokens=2)
