"""SGRS against a plain reference; the batched saliency backward against one backward per candidate; composition;
the step without host synchronisation."""

import functools
from types import SimpleNamespace

import pytest
import torch
from conftest import make_images
from host_sync import HostSync, no_host_sync
from reference_sgrs import reference_sgrs
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText

import neverfade
from neverfade.decoding.rejection import RejectionLoop, StaticRejectionLoop, saliencies, sample
from neverfade.engine import attention

STEPS = 12
SGRS = {"alpha": 1.1, "k": 4, "tries": 3, "window": 5, "start": 2, "end": 3}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("decode", ["eager", "static"])
def test_sgrs_equals_plain_reference(tiny_models, family, decode):
    sgrs_reference_check(tiny_models, family, decode)


def sgrs_reference_check(tiny_models, family, decode="eager"):
    """The tokens, the rejections and every accepted token's saliency (the window holds them all) of a plain SGRS
    that reruns the whole sequence each step with the model's own attention and one backward per candidate."""
    params = {**SGRS, "window": STEPS}
    c = neverfade.load(tiny_models[family], device="cpu")
    c.decode = decode
    inputs = c.processor(text=[c.prompt_text("Describe.")], images=make_images()[:1], return_tensors="pt")
    greedy = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    baseline = c.model.generate(**inputs, **greedy)[0, -STEPS:].tolist()
    c.use(["sgrs"], {"sgrs": params})
    fast = c.generate(**inputs, **greedy)[0, -STEPS:].tolist()
    fast_rejected = c.methods[0].last_rejected
    ref_model = AutoModelForImageTextToText.from_pretrained(tiny_models[family]).eval()
    reference, ref_rejected, ref_saliencies = reference_sgrs(
        ref_model, inputs, c.engine.info.image_token_id, c.model.generation_config.eos_token_id, STEPS, **params
    )
    assert ref_rejected > 0, "the threshold must turn candidates down"
    assert fast != baseline
    assert fast == reference
    assert fast_rejected == ref_rejected
    accepted = c.model._neverfade_last_loop.history[0].tolist()  # the step-ordered ring: window == STEPS
    torch.testing.assert_close(accepted, ref_saliencies, rtol=1e-4, atol=1e-6)


CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")]


@pytest.mark.parametrize("decode", ["static", pytest.param("captured", marks=CUDA)])
def test_sgrs_on_the_captured_path_equals_its_eager_loop(tiny_models, decode):
    """SGRS's loop on the captured path (a static KV cache; on CUDA each step replayed from its two graphs, the
    forward and the saliency backward) gives the tokens and rejections of the eager loop on generate's growing cache
    (on CUDA: of the same loop run eagerly), greedy and seeded sampling, over a padded batch of three image sizes.
    The model's parameters are frozen during the run only."""
    device = "cuda" if decode == "captured" else "cpu"
    c = neverfade.load(
        tiny_models["llava"], device=device, dtype="float32", methods=["sgrs"], method_params={"sgrs": SGRS}
    )
    inputs = c.inputs(make_images(), ["Describe.", "What is here?", "Hi"])
    reference = "static" if decode == "captured" else "eager"
    for sampling in (dict(do_sample=False), dict(do_sample=True, temperature=1.5)):
        runs = {}
        for path in (decode, reference):
            c.decode = path
            torch.manual_seed(5)
            with torch.no_grad():
                tokens = c.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, **sampling)
            loop = c.model._neverfade_last_loop
            assert isinstance(loop, StaticRejectionLoop) == (path != "eager"), type(loop).__name__
            assert getattr(loop, "captured", False) == (path == "captured")
            assert loop.batched, "vmap failed, and the run fell back to one backward per candidate"
            runs[path] = (tokens, c.methods[0].last_rejected)
        assert runs[reference][1] > 0, "the threshold must turn candidates down"
        assert torch.equal(runs[decode][0], runs[reference][0]) and runs[decode][1] == runs[reference][1]
    assert all(p.requires_grad for p in c.model.parameters())


def test_sgrs_rejections_count_the_kept_steps_only(tiny_models):
    """The static loop looks at the finished flags every 16 steps, so it decodes past a caption's end; the tokens past
    it are cut, and so are their rejections: the count equals the eager loop's, which stops at the end."""
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sgrs"], method_params={"sgrs": SGRS})
    inputs = c.inputs(make_images()[:1])
    c.decode = "eager"
    with torch.no_grad():
        free = c.generate(**inputs, max_new_tokens=STEPS)[0, -STEPS:].tolist()
    end = next(i for i in range(5, STEPS) if free[i] not in free[:i])  # a token new at step `end`: make it the EOS
    runs = {}
    for path in ("eager", "static"):
        c.decode = path
        with torch.no_grad():
            tokens = c.generate(**inputs, max_new_tokens=STEPS, eos_token_id=free[end])
        loop = c.model._neverfade_last_loop
        runs[path] = (tokens[0, -(end + 1) :].tolist(), c.methods[0].last_rejected, loop.seen)
    assert runs["eager"][0] == free[: end + 1] == runs["static"][0]
    assert runs["eager"][2] == end + 1 < runs["static"][2], "the static loop must run past the end"
    assert runs["eager"][1] > 0 and runs["static"][1] == runs["eager"][1]


@pytest.mark.parametrize("failing", [0, 3])
def test_a_vmap_failure_is_logged_and_only_a_decode_steps_turns_batching_off(tiny_models, monkeypatch, caplog, failing):
    """Where vmap fails, the saliencies come from one backward per candidate (the same tokens), with a warning; a
    failure at the prompt's step (which backpropagates through SDPA too) keeps batching for the decode steps."""
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sgrs"], method_params={"sgrs": SGRS})
    inputs = c.inputs(make_images()[:2], ["Describe.", "Hi"])
    c.decode = "eager"
    with torch.no_grad():
        expected = c.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS)
    batched_calls = []

    def flaky(*args, batched=True):
        if batched:
            batched_calls.append(len(batched_calls))
            if batched_calls[-1] == failing:
                raise RuntimeError("no batching rule, say")
        return saliencies(*args, batched=batched)

    monkeypatch.setattr("neverfade.decoding.rejection.saliencies", flaky)
    with torch.no_grad(), caplog.at_level("WARNING", logger="neverfade"):
        tokens = c.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS)
    assert torch.equal(tokens, expected)
    assert c.model._neverfade_last_loop.batched == (failing == 0)
    assert len(batched_calls) == (STEPS if failing == 0 else failing + 1)
    (warning,) = [r.getMessage() for r in caplog.records if "one backward per candidate" in r.getMessage()]
    assert ("at the prompt's step" if failing == 0 else "from now on") in warning and "no batching rule" in warning


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


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("masked", [False, True])
def test_the_row_backpropagates_to_the_newest_key_and_value_alone_with_the_same_gradient(cache, masked):
    """The row SGRS backpropagates through: with `newest`, the cached keys and values take no gradient (a cache-sized
    one per candidate), the output is the same to the bit, and the gradients to the query and to what the newest key
    and value came from are those of the row without it, on both kinds of cache."""
    torch.manual_seed(0)
    b, heads, kv_heads, keys, dim = 2, 4, 2, 9, 8
    upstream = torch.randn(b, kv_heads, 1, dim, requires_grad=True)  # the newest token's hidden state, say
    query = torch.randn(b, heads, 1, dim) + upstream.mean()
    cached = torch.randn(b, kv_heads, keys, dim), torch.randn(b, kv_heads, keys, dim)  # constants
    new = upstream * 2, upstream.sin()
    if cache == "static":  # writes this step's key and value in place
        newest = torch.tensor([6])
        for c, n in zip(cached, new):
            c.index_copy_(2, newest, n)
        key, value = cached
    else:  # appends them
        newest = torch.tensor([keys - 1])
        key, value = (torch.cat([c[:, :, 1:], n], 2) for c, n in zip(cached, new))
    mask = torch.arange(keys) <= torch.stack([newest, newest - 3])  # the second row's newest key is masked
    bias = attention.key_bias(mask[:, None, None, :], keys, kv_heads, query.dtype) if masked else None
    grad_out = torch.randn(b, 1, heads, dim)
    runs = {}
    for name, index in (("every key", None), ("newest", newest)):
        out = attention.attention_row(query, key, value, bias, 0.3, (None, None), 0, newest=index)
        runs[name] = (out, *torch.autograd.grad(out, (query, upstream), grad_out, retain_graph=True))
    assert runs["every key"][2].abs().sum() > 0
    assert torch.equal(runs["newest"][0], runs["every key"][0])
    torch.testing.assert_close(runs["newest"][1:], runs["every key"][1:])


class LargestOutput(TorchDispatchMode):
    """The most elements of any tensor an operator writes (below vmap: the physical tensors; views are not counted)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, t.numel())
        return out


def test_the_rows_batched_backward_copies_no_cache_per_candidate():
    """SGRS's one backward for its k candidates (torch.func.vmap over their cotangents) reads the cache as it is: vmap's
    own rule for bmm would copy the cache k times per layer (15 of a step's 39 ms at LLaVA-7B batch 8 on the H200).
    The gradients are those of one backward per candidate."""
    torch.manual_seed(0)
    b, heads, kv_heads, keys, dim, k = 2, 4, 2, 64, 64, 5  # a row per candidate is smaller than the cache
    query = torch.randn(b, heads, 1, dim, requires_grad=True)
    key, value = torch.randn(b, kv_heads, keys, dim), torch.randn(b, kv_heads, keys, dim)
    out = attention.attention_row(query, key, value, None, 0.3, (None, None), 0, newest=torch.tensor([keys - 1]))
    cotangents = torch.randn(k, *out.shape)
    with LargestOutput() as mode:
        batched = torch.func.vmap(functools.partial(torch.autograd.grad, out, query, retain_graph=True))(cotangents)
    looped = torch.stack([torch.autograd.grad(out, query, c, retain_graph=True)[0] for c in cotangents])
    assert 0 < mode.largest < key.numel()
    torch.testing.assert_close(batched[0], looped)


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


# ---- the step on the device: no host synchronisation ----

LEAKS = {  # what reads a tensor on the host, each as a line of code
    "item": "t.sum().item()",
    "tolist": "t.tolist()",
    "bool": "bool(t.any())",
    "if": "1 if t.sum() > 0 else 0",
    "int": "int(t.sum())",
    "float": "float(t.sum())",
    "cpu": "t.cpu()",
    "to-cpu": "t.to('cpu')",
    "nonzero": "torch.nonzero(t)",
    "nonzero-method": "t.nonzero()",
    "masked_select": "torch.masked_select(t, t > 0)",
    "boolean index": "t[t > 0]",
    "boolean assignment": "t[t > 0] = 0",
    "multinomial": "torch.multinomial(t.softmax(0), 1)",
    "print": "print(t)",
    "format": "f'{t}'",
}


def _defined_in(module: str, line: str):
    """A function running `line` on its argument t, as if it were defined in `module`."""
    namespace = {"torch": torch, "__name__": module}
    exec(f"def leak(t):\n    {line}\n", namespace)
    return namespace["leak"]


@pytest.mark.parametrize("leak", LEAKS)
def test_the_guard_catches_each_host_read_in_neverfade_code(leak):
    t = torch.tensor([0.5, -1.0, 2.0])
    ours, theirs = _defined_in("neverfade.decoding.rejection", LEAKS[leak]), _defined_in("transformers.x", LEAKS[leak])
    ours(t.clone())  # runs unguarded
    originals = (torch.Tensor.item, torch.Tensor.__bool__, torch.nonzero)
    tensor_work = _defined_in(
        "neverfade.x", "t[1:].sum(), t[None, torch.tensor([0, 2])], t.to(torch.float64), t.new_zeros(2)"
    )
    seen = []
    with no_host_sync(seen=seen):
        with pytest.raises(HostSync, match="host synchronisation"):
            ours(t.clone())
        theirs(t.clone())  # transformers' own reads are not the step's
        tensor_work(t)  # and neverfade's tensor work passes
    assert len(seen) == 1
    assert (torch.Tensor.item, torch.Tensor.__bool__, torch.nonzero) == originals  # all restored
    assert torch.tensor([torch.tensor(-4), torch.tensor(2)]).tolist() == [-4, 2]  # tensors are no sequences after


def test_the_guard_catches_a_deliberate_item():
    leak = _defined_in("neverfade.decoding.rejection", "return t.sum().item()")
    assert leak(torch.ones(3)) == 3.0
    with no_host_sync(), pytest.raises(HostSync, match=r"item from neverfade\.decoding\.rejection"):
        leak(torch.ones(3))


def test_sample_draws_as_multinomial():
    probs = torch.softmax(torch.randn(4, 9) * 3, -1).index_fill(1, torch.tensor([2, 5]), 0.0)
    for seed in range(20):
        torch.manual_seed(seed)
        want, after = torch.multinomial(probs, 1).squeeze(1), torch.rand(3)
        torch.manual_seed(seed)
        assert torch.equal(sample(probs), want) and torch.equal(torch.rand(3), after)  # the same random numbers


def _guarded(function, calls):
    def step(self, *args, **kwargs):
        calls.append(function.__name__)
        with no_host_sync():
            return function(self, *args, **kwargs)

    return step


GUARDED_RUNS = {  # sampled with top_k=3 < k=4: the candidates past the third have no probability
    "greedy": dict(do_sample=False),
    "sampled": dict(do_sample=True, top_k=3),
    "sampled, every candidate": dict(do_sample=True),
}


def test_sgrs_step_reads_nothing_on_the_host(tiny_models, monkeypatch):
    """Each SGRS step (the forward with the engine's hooks, the backward, the tries, the fallback, the ring of
    accepted saliencies) runs without a host read in neverfade's code, on a padded batch; its tokens and rejection
    count are those of the same run unguarded."""
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sgrs"], method_params={"sgrs": SGRS})
    images, prompts = make_images(), ["Describe it.", "Hi", "What is in this picture?"]
    tokens = dict(max_new_tokens=STEPS, min_new_tokens=STEPS)

    def run(name):
        torch.manual_seed(0)
        texts = [r.text for r in c.caption(images, prompts, **tokens, **GUARDED_RUNS[name])]
        return texts, c.methods[0].last_rejected

    unguarded = {name: run(name) for name in GUARDED_RUNS}
    assert unguarded["greedy"][1] > 0, "candidates must be turned down"
    calls = []
    for name in ("step_logits", "choose", "appended"):
        monkeypatch.setattr(RejectionLoop, name, _guarded(getattr(RejectionLoop, name), calls))
    for name in GUARDED_RUNS:
        calls.clear()
        assert run(name) == unguarded[name]
        assert calls == ["step_logits", "choose", "appended"] * STEPS  # the guard was on at every step

    # a host read in the step is caught: neverfade's own end-of-run read of the rejection count, made at each step
    def leaky(self, tokens):
        self.steps = len(self.tallies)  # as if the run ended here
        RejectionLoop.finish(self)

    monkeypatch.setattr(RejectionLoop, "appended", _guarded(leaky, calls))
    with pytest.raises(HostSync, match=r"from neverfade\.decoding\.rejection:\d+ \(finish\)"):
        run("greedy")


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_step_decisions_trace_as_one_graph(do_sample):
    """The choice after the backward (the candidates' mask, the recent mean, the tries, the fallback) has no graph
    break: torch.compile traces it whole (fullgraph) and gives the same tokens."""
    loop = RejectionLoop.__new__(RejectionLoop)
    loop.method = SimpleNamespace(tries=3, k=4, window=5, alpha=1.1)
    loop.config = SimpleNamespace(do_sample=do_sample)
    loop.history, loop.filled = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)), torch.tensor(3)
    probs = torch.softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(1)), -1).index_fill(
        1, torch.arange(47), 0.0
    )
    cand_probs, candidates = probs.topk(4)  # the fourth has no probability
    sal = torch.rand(3, 4, generator=torch.Generator().manual_seed(2))

    def decide(probs, cand_probs, candidates, sal):
        loop.rejected = torch.zeros((), dtype=torch.long)
        k = (probs > 0).sum(-1).min().clamp(min=1)
        valid = torch.arange(candidates.shape[1]) < k
        return *loop._reject(candidates, cand_probs, sal, 1.1 * loop._recent_mean(), valid, k), loop.rejected

    torch.manual_seed(3)
    want = decide(probs, cand_probs, candidates, sal)
    torch.manual_seed(3)
    got = torch.compile(decide, fullgraph=True, backend="eager")(probs, cand_probs, candidates, sal)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert (want[0][:, None] == candidates[:, :3]).any(1).all()


def test_a_nan_distribution_stops_the_run(tiny_models):
    """The tries decide on the device, so a NaN distribution no longer trips multinomial's own check: the loop must
    still refuse to return choices made from it."""
    from neverfade.errors import CannotAct

    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sgrs"], method_params={"sgrs": SGRS})
    inputs = c.processor(text=[c.prompt_text("Describe.")], images=make_images()[:1], return_tensors="pt")
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    c.generate(**inputs, **greedy)  # finite weights: no complaint
    with torch.no_grad():
        c.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(CannotAct, match="NaN"):
        c.generate(**inputs, **greedy)
