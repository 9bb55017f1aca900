"""The fused decode-attention kernel wired into the engine (`Engine.attention`): which decode-step rows take it, and
that a model decodes with it as with the explicit row.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), about 25 ms per
program, so these tests keep the methods to one or two layers of the tiny LLaVA and a few steps. On a GPU the
`gpu`-marked tests run the compiled kernel inside a captured CUDA graph."""

from __future__ import annotations

import os

import pytest
import torch

import neverfade
from neverfade.engine.attention import fused_covers, fused_runs
from neverfade.models.random import FAMILIES
from tests.conftest import make_images

CUDA = torch.cuda.is_available()
pytest.importorskip("triton", reason="Triton is not installed (the test extra brings it on Linux)")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it before anything imports Triton
    pytest.skip("without CUDA Triton runs only in its interpreter: TRITON_INTERPRET=1", allow_module_level=True)

INTERPRETER = pytest.mark.skipif(CUDA, reason="on a CUDA machine the kernel is compiled: the gpu tests check it")
PROMPTS = ["Hi", "What is in this picture?"]  # of different lengths: the batch is left-padded
SPARC = {"sparc": {"tau": 0.05, "alpha": 1.5, "layer": 2, "start": 1, "end": 2}}  # selects, observes, scales


def _decode(c, inputs, attention, decode, steps):
    c.attention, c.decode = attention, decode
    with torch.no_grad():
        out = c.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
    return out, c.attention_path()


def _same(fused, explicit, atol):
    assert torch.equal(fused.sequences, explicit.sequences)
    for f, e in zip(fused.scores, explicit.scores, strict=True):
        torch.testing.assert_close(f, e, atol=atol, rtol=atol)


def test_the_choice_follows_the_device():
    cpu = torch.device("cpu")
    assert not fused_runs("auto", cpu)  # the explicit row is the CPU path
    assert fused_runs("auto", torch.device("cuda"))  # Triton is installed here (the test extra)
    assert not fused_runs("explicit", cpu)
    assert fused_runs("fused", cpu)  # the interpreter, forced (TRITON_INTERPRET=1 here)
    assert not fused_runs("auto", torch.device("meta"))
    with pytest.raises(ValueError, match="cannot run"):
        fused_runs("fused", torch.device("meta"))
    with pytest.raises(ValueError, match="attention must be"):
        fused_runs("fast", cpu)


def test_the_kernel_takes_only_the_calls_it_covers():
    """The explicit check the engine makes before the kernel: every case it does not cover takes the explicit row."""
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 30, 16)
    mask = torch.ones(2, 1, 1, 30, dtype=torch.bool)
    assert fused_covers(q, k, k, mask, [])
    assert fused_covers(q, k, k, None, [])
    assert fused_covers(q, k, k, mask[:1], [])  # a mask shared by the batch
    assert not fused_covers(torch.randn(2, 4, 3, 16), k, k, mask, [])  # a prompt: more than one query token
    assert not fused_covers(q, k, k, mask.float(), [])  # additive: may hold -inf
    assert not fused_covers(q, k, k, mask[..., :20], [])  # narrower than the keys
    assert not fused_covers(q, k, k, mask, [object()])  # a reweighter (SGRS)
    assert not fused_covers(q.double(), k.double(), k.double(), mask, [])
    assert not fused_covers(q, k.half(), k.half(), mask, [])
    assert not fused_covers(q, k, k[..., :8], mask, [])  # another value head size
    assert not fused_covers(torch.randn(2, 3, 1, 16), k, k, mask, [])  # heads not a multiple of the KV heads
    assert not fused_covers(q.requires_grad_(), k, k, mask, [])  # SGRS backpropagates through the row


@INTERPRETER
def test_fused_decoding_equals_the_explicit_row_on_a_cpu(tiny_models):
    """SPARC on the static loop (the captured path's step, run eagerly: a static cache, its bool mask, the filled
    length from the device-side query index) and naive+PAI (a scale and a boost) on generate's loop (a dynamic
    cache): the same tokens and logits, to float32 rounding, as the explicit row; every decode-step row fused."""
    c = neverfade.load(tiny_models["llava"], device="cpu")
    inputs = c.inputs(make_images()[:2], PROMPTS)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded"
    baseline, _ = _decode(c, inputs, "auto", "static", 5)
    for methods, params, decode in [
        (["sparc"], SPARC, "static"),
        (["naive", "pai"], {"naive": {"alpha": 3.0, "start": 3}, "pai": {"alpha": 0.5, "start": 3}}, "eager"),
    ]:
        c.use(methods, params)
        explicit, explicit_path = _decode(c, inputs, "explicit", decode, 5)
        fused, fused_path = _decode(c, inputs, "fused", decode, 5)
        assert (explicit_path, fused_path) == ("explicit", "fused")
        assert c.engine.batch.fused == c.engine.batch.rows > 0
        assert not torch.equal(explicit.sequences, baseline.sequences), f"{methods} must change the tokens here"
        _same(fused, explicit, atol=2e-5)
        if methods == ["sparc"]:
            assert (c.engine.batch.state(c.methods[0]).count > 0).any(), "SPARC must select from the fused probs"
    assert _decode(c, inputs, "auto", "static", 3)[1] == "explicit"  # auto on a CPU


@INTERPRETER
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_decodes_fused_as_with_the_explicit_row(tiny_models, family):
    """What "auto" takes on CUDA, for each family's own attention (grouped heads, Gemma 3's windowed masks over a
    cache that keeps every key, Qwen-VL's rotary sections): SPARC on the static loop, every decode-step row fused,
    the explicit row's tokens and logits to float32 rounding, over a padded batch of two image sizes."""
    c = neverfade.load(tiny_models[family], device="cpu", methods=["sparc"], method_params=SPARC)
    inputs = c.inputs(make_images()[:2], PROMPTS)
    explicit, explicit_path = _decode(c, inputs, "explicit", "static", 12)
    fused, fused_path = _decode(c, inputs, "fused", "static", 12)
    assert (explicit_path, fused_path) == ("explicit", "fused")
    assert c.engine.batch.fused == c.engine.batch.rows > 0
    assert (c.engine.batch.state(c.methods[0]).count > 0).any(), "SPARC must select from the fused probs"
    _same(fused, explicit, atol=2e-5)


@INTERPRETER
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_baseline_on_the_kernel_gives_sdpas_tokens(tiny_models, family):
    """attention="fused" with no method: every layer's decode step on the kernel, SDPA's tokens and logits to float32
    rounding (LLaVA's heads one per KV head, Qwen2-VL's grouped); back to "auto", SDPA alone again."""
    c = neverfade.load(tiny_models[family], device="cpu")
    inputs = c.inputs(make_images()[:2], PROMPTS)
    sdpa, sdpa_path = _decode(c, inputs, "auto", "static", 8)
    assert sdpa_path is None and c.engine is None
    fused, fused_path = _decode(c, inputs, "fused", "static", 8)
    assert fused_path == "fused" and not c.engine.methods
    assert c.engine.batch.fused == c.engine.batch.rows == 7 * c.engine.info.num_layers
    _same(fused, sdpa, atol=2e-5)
    c.attention = "auto"
    assert c.engine is None


@INTERPRETER
def test_fused_takes_the_kernel_in_the_layers_no_method_touches_too(tiny_models):
    """Naive scaling from layer 3 on: "explicit" computes its rows in those layers and leaves the others to SDPA;
    "fused" takes the kernel in every layer (plain where no method acts), with the same tokens and logits to float32
    rounding."""
    params = {"naive": {"alpha": 3.0, "start": 3}}
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["naive"], method_params=params)
    inputs = c.inputs(make_images()[:2], PROMPTS)
    layers, acting = c.engine.info.num_layers, sum(map(bool, c.engine.decode_layers))
    assert 0 < acting < layers
    explicit, _ = _decode(c, inputs, "explicit", "static", 4)
    assert c.engine.batch.rows == 3 * acting and c.engine.batch.fused == 0
    fused, path = _decode(c, inputs, "fused", "static", 4)
    assert path == "fused" and c.engine.batch.fused == c.engine.batch.rows == 3 * layers
    _same(fused, explicit, atol=2e-5)


@INTERPRETER
def test_auto_takes_the_kernel_in_every_layer_where_it_runs(tiny_models, monkeypatch):
    """ "auto" where the kernel runs (CUDA; here the interpreter stands in for it) decodes every layer on the kernel
    while a method is attached, the layers no method touches too, as "fused" does; the baseline stays on SDPA."""
    from neverfade.engine import engine as engine_module

    monkeypatch.setattr(engine_module.attention, "fused_runs", lambda choice, device: choice != "explicit")
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["naive"], method_params={"naive": {"start": 3}})
    inputs = c.inputs(make_images()[:2], PROMPTS)
    layers, acting = c.engine.info.num_layers, sum(map(bool, c.engine.decode_layers))
    assert 0 < acting < layers
    _, path = _decode(c, inputs, "auto", "static", 3)
    assert path == "fused" and c.engine.batch.fused == c.engine.batch.rows == 2 * layers
    _, path = _decode(c, inputs, "explicit", "static", 3)
    assert c.engine.batch.rows == 2 * acting and c.engine.batch.fused == 0
    c.use([])
    c.attention = "auto"
    assert c.engine is None  # the baseline: SDPA


@INTERPRETER
def test_the_kernel_writes_probabilities_only_where_a_method_observes(tiny_models, monkeypatch):
    """SPARC scales in layers 1-2 and observes only layer 2: the kernel is asked for the probabilities there alone
    (each row it writes costs about 5 us on the H200), and SPARC still selects from them."""
    from neverfade.kernels import decode_attention as kernel

    asked = []
    plain = kernel.decode_attention

    def spy(*args, return_probs=False, **kwargs):
        asked.append(return_probs)
        return plain(*args, return_probs=return_probs, **kwargs)

    monkeypatch.setattr(kernel, "decode_attention", spy)
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sparc"], method_params=SPARC)
    inputs = c.inputs(make_images()[:2], PROMPTS)
    _decode(c, inputs, "fused", "static", 4)
    steps = 3  # the decode steps after the prefill
    assert len(asked) == steps * c.engine.info.num_layers
    assert sum(asked) == steps
    assert (c.engine.batch.state(c.methods[0]).count > 0).any(), "SPARC must select from the probabilities"


@INTERPRETER
def test_bench_times_fused_and_explicit_side_by_side(tiny_models, tmp_path):
    import json

    from neverfade.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "--model", tiny_models["llava"], "--device", "cpu", "--batch-sizes", "1", "--new-tokens", "3"]
    argv += ["--repeats", "1", "--no-stock", "--decode", "captured", "--method", "naive:start=3"]
    argv += ["--attention", "fused", "explicit", "--check", "--check-tokens", "3", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = {r["setting"]: (r["path"], r["attention"]) for r in report["rows"]}
    assert rows == {
        "baseline": ("static", "sdpa"),
        "baseline [fused]": ("static", "fused"),
        "naive:start=3 [fused]": ("static", "fused"),
        "naive:start=3 [explicit]": ("static", "explicit"),
    }
    checks = {k["setting"]: (k["attention"], k["same"]) for k in report["checks"]}
    assert checks["naive:start=3 [fused]"] == ("fused", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the compiled kernel needs CUDA")
def test_captured_fused_decoding_equals_the_explicit_row_on_the_gpu(tiny_models, dtype):
    """The tiny LLaVA with SPARC in every layer on CUDA, decoding captured and fused: the captured replay
    of the fused step gives the tokens of the same loop run eagerly; in float32 it gives the tokens and logits of
    the captured explicit row too. In bfloat16 the kernel rounds the value product where the row does not (see
    neverfade/kernels/decode_attention.py), and a logit can round one step apart, which may flip SPARC's selection
    or a near tie later on: there only the first decoded step's logits are compared, loosely."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = {"sparc": {"tau": 0.05, "alpha": 1.5}}
    c = neverfade.load(tiny_models["llava"], device="cuda", dtype=dtype, methods=["sparc"], method_params=params)
    inputs = c.inputs(make_images(), [*PROMPTS, "Describe it."])
    assert c.decode_path() == "captured"
    steps = 24
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):  # cuDNN's is not reproducible
        fused, fused_path = _decode(c, inputs, "fused", "captured", steps)
        assert c.model._neverfade_last_loop.captured, "the steps after the second must replay a CUDA graph"
        static, static_path = _decode(c, inputs, "fused", "static", steps)
        explicit, explicit_path = _decode(c, inputs, "explicit", "captured", steps)
        assert c.model._neverfade_last_loop.captured
    assert (fused_path, static_path, explicit_path) == ("fused", "fused", "explicit")
    assert torch.equal(fused.sequences, static.sequences)  # the replay of the fused kernel
    baseline = c.use([])
    plain, _ = _decode(baseline, inputs, "auto", "captured", steps)
    assert not torch.equal(plain.sequences, fused.sequences), "SPARC must change the tokens here"
    if dtype == torch.float32:
        _same(fused, explicit, atol=1e-4)
    else:
        f, e = fused.scores[1], explicit.scores[1]  # [0] is the prefill's
        finite = e.isfinite()
        torch.testing.assert_close(f[finite], e[finite], atol=0.05 * float(e[finite].abs().max()), rtol=0)
