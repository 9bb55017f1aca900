"""The fused decode-attention kernel (neverfade/kernels/decode_attention.py) against the explicit attention row, the
engine's reference and CPU path (neverfade.engine.attention.attention_row), on random inputs: batch sizes,
grouped-query ratios, filled lengths of a static cache, masks, with and without a boost and a scale, the
probabilities an observer sees.

Without CUDA the kernel runs in Triton's interpreter, in float32 and float16 (the interpreter's bfloat16 matrix
product is wrong: bfloat16 is checked on the GPU only). Triton comes with the `test` extra (Linux); on a
platform without its wheel these tests are skipped."""

from __future__ import annotations

import os

import pytest
import torch

from neverfade.engine.attention import attention_row, key_bias

CUDA = torch.cuda.is_available()
pytest.importorskip("triton", reason="Triton is not installed (the test extra brings it on Linux)")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it before anything imports Triton
    pytest.skip("without CUDA Triton runs only in its interpreter: TRITON_INTERPRET=1", allow_module_level=True)
from neverfade.kernels.decode_attention import decode_attention  # noqa: E402

GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="the compiled kernel needs CUDA")]
INTERPRETER = pytest.mark.skipif(CUDA, reason="on a CUDA machine the kernel is compiled: the gpu variant checks it")

# batch, query heads, KV heads, head dim, cache capacity, filled length, edits, mask kind, splits
CASES = [
    (1, 4, 4, 16, 40, 40, "", "bool", 1),
    (1, 8, 2, 32, 70, 23, "scale", "bool", 3),
    (3, 6, 1, 40, 130, 97, "boost+scale", "bool", 2),
    (2, 4, 4, 16, 64, 64, "boost", "additive", 1),
    (3, 8, 2, 16, 100, 65, "scale", "additive", 4),
    (2, 8, 4, 24, 33, 17, "boost+scale", "none", 1),
    (1, 12, 4, 64, 200, 150, "boost+scale", "bool", 5),
    (4, 7, 7, 16, 50, 1, "scale", "bool", 2),
]


def _inputs(case, dtype, device, seed=0):
    b, heads, kv_heads, dim, capacity, length, edits, mask_kind, splits = case
    g = torch.Generator().manual_seed(seed)
    query = (torch.randn(b, heads, 1, dim, generator=g) * 2).to(dtype)
    key = torch.randn(b, kv_heads, capacity, dim, generator=g).to(dtype)
    value = torch.randn(b, kv_heads, capacity, dim, generator=g).to(dtype)
    attended = torch.ones(b, capacity, dtype=torch.bool)
    attended[:, length:] = False
    if b > 1:  # left padding of one sequence
        attended[1, : min(3, length - 1)] = False
    boost = (torch.rand(1, capacity, generator=g) * 0.4) if "boost" in edits else None
    scale = (torch.rand(b, capacity, generator=g) + 0.5) if "scale" in edits else None
    if mask_kind == "none":
        attended[:] = True
    moved = [t.to(device) if t is not None else None for t in (query, key, value, attended, boost, scale)]
    return moved


class _Seen:
    def observe(self, layer, probs, batch):
        self.probs = probs.clone()


def _explicit_row(query, key, value, attended, boost, scale, mask_kind, length):
    """The engine's row over the filled keys only (the mask hides the rest in the static loop)."""
    kv_heads = key.shape[1]
    keys = slice(0, length)
    bias = None
    if mask_kind != "none":
        bias = key_bias(attended[:, None, None, keys], length, kv_heads, query.dtype)
    seen = _Seen()
    edits = tuple(t[:, keys] if t is not None else None for t in (boost, scale))
    out = attention_row(query, key[:, :, keys], value[:, :, keys], bias, query.shape[-1] ** -0.5, edits, 0, [seen])
    return out, seen.probs


def _run(case, dtype, device, length_on_device=True):
    """The kernel's output and probabilities, and the explicit row's on the same inputs, after the checks that hold in
    every dtype: the unfilled cache is never read, and asking for no probabilities changes nothing."""
    query, key, value, attended, boost, scale = _inputs(case, dtype, device)
    mask_kind, splits, length = case[7], case[8], case[5]
    expected, expected_probs = _explicit_row(query, key, value, attended, boost, scale, mask_kind, length)
    key[:, :, length:] = float("nan")  # the unfilled cache: read, it would poison the output
    value[:, :, length:] = float("nan")
    if mask_kind == "bool":
        mask = attended
    elif mask_kind == "additive":
        mask = key_bias(attended[:, None, None, :], key.shape[2], 1, query.dtype)[:, 0, :]
    else:
        mask = None
    filled = torch.tensor([length], device=device) if length_on_device else length
    out, probs = decode_attention(
        query, key, value, query.shape[-1] ** -0.5, filled, mask, boost, scale, return_probs=True, splits=splits
    )
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert (probs[..., length:] == 0).all()
    alone, none = decode_attention(
        query, key, value, query.shape[-1] ** -0.5, filled, mask, boost, scale, splits=splits
    )
    assert none is None
    torch.testing.assert_close(alone, out, atol=0, rtol=0)
    return out, probs[..., :length], expected, expected_probs


def _check(case, dtype, device, atol, probs_atol, length_on_device=True):
    out, probs, expected, expected_probs = _run(case, dtype, device, length_on_device)
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(probs, expected_probs, atol=probs_atol, rtol=probs_atol)


@INTERPRETER
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_equals_the_explicit_row_in_float32(case):
    _check(case, torch.float32, "cpu", atol=2e-6, probs_atol=2e-6, length_on_device=case[0] % 2 == 1)


@INTERPRETER
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "-".join(map(str, c)))
def test_kernel_rounds_where_the_explicit_row_rounds_in_float16(case):
    """The row's logits are float16 (its baddbmm and its boost): the kernel rounds them where it does, so the
    probabilities agree far closer than float16's own step."""
    _check(case, torch.float16, "cpu", atol=4e-3, probs_atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the compiled kernel needs CUDA")
def test_compiled_kernel_equals_the_explicit_row_on_the_gpu_in_float32(case):
    _check(case, torch.float32, "cuda", atol=2e-5, probs_atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the compiled kernel needs CUDA")
def test_compiled_kernel_is_as_accurate_as_the_explicit_row_on_the_gpu(case, dtype):
    """In half precision the compiled kernel sums q.k in another order than cuBLAS, so a logit can round one step
    of its dtype apart from the row's (a probability then differs by a few percent). So both are measured against
    the row in float64 on the same inputs: the kernel is no further from it than the row, with half again as slack."""
    out, probs, expected, expected_probs = _run(case, dtype, "cuda")
    wide = [t.double() if t is not None and t.is_floating_point() else t for t in _inputs(case, dtype, "cuda")]
    exact, exact_probs = _explicit_row(*wide, case[7], case[5])
    for got, row, truth in ((out, expected, exact), (probs, expected_probs, exact_probs)):
        kernel_error = float((got.double() - truth.double()).abs().max())
        row_error = float((row.double() - truth.double()).abs().max())
        assert kernel_error <= 1.5 * row_error + 1e-6, (kernel_error, row_error)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the compiled kernel needs CUDA")
def test_compiled_kernel_replays_from_a_cuda_graph_as_the_cache_fills():
    """The filled length is a device tensor: one captured launch serves every step."""
    case = (8, 28, 4, 128, 1112, 860, "boost+scale", "bool", None)
    query, key, value, attended, boost, scale = _inputs(case, torch.bfloat16, "cuda")
    attended[:] = True
    length = torch.tensor([700], device="cuda")
    run = dict(mask=attended, boost=boost, scale=scale, return_probs=True)
    decode_attention(query, key, value, 128**-0.5, length, **run)  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, probs = decode_attention(query, key, value, 128**-0.5, length, **run)
    for filled in (700, 860, 1112):
        length.fill_(filled)
        graph.replay()
        expected, expected_probs = decode_attention(query, key, value, 128**-0.5, filled, **run)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        torch.testing.assert_close(probs, expected_probs, atol=0, rtol=0)


@INTERPRETER
def test_torch_compile_leaves_the_launch_untraced(monkeypatch):
    """The split count is chosen inside the custom operator, at run time: on CUDA it asks the device for its
    multiprocessor count, a call dynamo cannot trace (a compiled step with the kernel failed on the H200 when the
    count was chosen in the traced wrapper)."""
    import neverfade.kernels.decode_attention as kernel

    compiling = []

    def splits(*args):
        compiling.append(torch.compiler.is_compiling())
        return 2

    monkeypatch.setattr(kernel, "default_splits", splits)
    case = CASES[1]
    query, key, value, attended, _, scale = _inputs(case, torch.float32, "cpu")
    expected, _ = _explicit_row(query, key, value, attended, None, scale, "bool", case[5])
    torch._dynamo.reset()
    step = torch.compile(lambda *a: kernel.decode_attention(*a)[0], fullgraph=True)
    out = step(query, key, value, query.shape[-1] ** -0.5, torch.tensor([case[5]]), attended, None, scale)
    assert compiling and not any(compiling)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-6)
