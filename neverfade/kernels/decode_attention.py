"""One decode step's attention, fused, for the layers where a method acts (Triton). The engine calls it at a decode
step on CUDA (`Engine.attention`, "auto" or "fused"; `neverfade.engine.attention.fused_row`).

One query token per sequence; its query heads are grouped over their KV head (grouped-query attention), and only the
filled part of a static KV cache is read (`length` keys, a device tensor, so a captured CUDA graph replays it as the
cache grows). Per key j, with the same rounding as the explicit row (`neverfade.engine.attention.attention_row`):

    z_j = round(scaling * q.k_j + bias_j)          bias: 0, or the query dtype's minimum where the mask hides the key
    z_j = round(z_j + round(boost_j * |z_j|))      a method's pre-softmax boost (PAI), if given
    p_j = softmax(z)_j                             float32; returned for an observer (SPARC's selection layer)
    out = sum_j p_j * scale_j * v_j                a post-softmax scale (SPARC, naive, LocoRE), not renormalised

`round` is to the query's dtype, where the explicit row rounds: its `baddbmm` (one rounding of the scaled product plus
the bias; without a mask, `bmm` then `* scaling`, two) and its elementwise boost. The one difference left is in the
value product: the row rounds the normalised weights p_j * scale_j to the value dtype; the kernel rounds the
unnormalised ones, exp(z_j - running max) * scale_j (flash-decoding's online softmax), and divides at the end. In
float32 the two agree to float32 rounding (checked by tests/test_decode_attention.py, in Triton's interpreter).

The keys are split into `splits` chunks of the filled length, one program each per (sequence, KV head), and a second
kernel combines them (and normalises the returned probabilities). Split-K keeps a large GPU busy at batch 1. The
first kernel runs on 2 warps with 2 pipeline stages (head size up to 128): in a sweep on the H200 (session 9,
`docs/findings/bench_h200_session9.json`, "kernel_sweep") that took a layer with a per-key scale from 50.4 to 42.4 us
at LLaVA-7B's batch 8 and from 141.2 to 127.6 at batch 32, against Triton's default 4 warps and 3 stages, and was
within 1 us of it at the other points.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _rounded(x, DTYPE: tl.constexpr, ROUND: tl.constexpr):
    """x (float32) rounded to DTYPE and back (if ROUND: DTYPE is narrower): where the explicit row stores a value in
    the query's dtype."""
    if ROUND:
        x = x.to(DTYPE).to(tl.float32)
    return x


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, length_ptr, mask_ptr, boost_ptr, scale_ptr,
    m_ptr, l_ptr, acc_ptr, z_ptr,
    scaling, masked_value,
    sq_b, sq_h, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    smask_b, smask_t, sboost_b, sboost_t, sscale_b, sscale_t,
    sz_b, sz_h, sz_g, sz_t,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, DIM: tl.constexpr, SPLITS: tl.constexpr,
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,  # 0: none; 1: additive bias (the query dtype); 2: bool, true where the key is attended
    BOOST: tl.constexpr, SCALE: tl.constexpr, PROBS: tl.constexpr,
    DTYPE: tl.constexpr, ROUND: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # one (sequence, KV head)
    split = tl.program_id(1)
    b = row // KV_HEADS
    h = row % KV_HEADS
    length = tl.load(length_ptr).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    g_ok = g < GROUP
    d_ok = d < DIM
    q = tl.load(
        q_ptr + b * sq_b + (h * GROUP + g)[:, None] * sq_h + d[None, :] * sq_d,
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)  # noqa: E741 (flash attention's name for the running sum)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        k = tl.load(
            k_ptr + b * sk_b + h * sk_h + n[:, None] * sk_t + d[None, :] * sk_d,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if MASK == 0:
            z = _rounded(_rounded(qk, DTYPE, ROUND) * scaling, DTYPE, ROUND)
        else:
            if MASK == 1:
                bias = tl.load(mask_ptr + b * smask_b + n * smask_t, mask=n_ok, other=0.0).to(tl.float32)
            else:
                hidden = tl.load(mask_ptr + b * smask_b + n * smask_t, mask=n_ok, other=1) == 0
                bias = tl.where(hidden, masked_value, 0.0)
            z = _rounded(qk * scaling + bias[None, :], DTYPE, ROUND)
        if BOOST:
            boost = tl.load(boost_ptr + b * sboost_b + n * sboost_t, mask=n_ok, other=0.0).to(tl.float32)
            z = _rounded(z + _rounded(_rounded(boost, DTYPE, ROUND)[None, :] * tl.abs(z), DTYPE, ROUND), DTYPE, ROUND)
        z = tl.where(n_ok[None, :], z, float("-inf"))
        if PROBS:  # the logits, normalised by the combining kernel
            tl.store(
                z_ptr + b * sz_b + h * sz_h + g[:, None] * sz_g + n[None, :] * sz_t,
                z,
                mask=g_ok[:, None] & n_ok[None, :],
            )
        m_new = tl.maximum(m, tl.max(z, axis=1))
        p = tl.exp(z - m_new[:, None])
        rescale = tl.exp(m - m_new)
        l = l * rescale + tl.sum(p, axis=1)  # noqa: E741
        if SCALE:
            p = p * tl.load(scale_ptr + b * sscale_b + n * sscale_t, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        v = tl.load(
            v_ptr + b * sv_b + h * sv_h + n[:, None] * sv_t + d[None, :] * sv_d,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * rescale[:, None] + pv
        m = m_new
    part = row * SPLITS + split
    tl.store(m_ptr + part * G_PAD + g, m)
    tl.store(l_ptr + part * G_PAD + g, l)
    tl.store(acc_ptr + (part * G_PAD + g)[:, None] * D_PAD + d[None, :], acc)


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, length_ptr, out_ptr, z_ptr,
    so_b, so_h, so_d,
    sz_b, sz_h, sz_g, sz_t,
    capacity,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, DIM: tl.constexpr, SPLITS: tl.constexpr, S_PAD: tl.constexpr,
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PROBS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    b = row // KV_HEADS
    h = row % KV_HEADS
    s = tl.arange(0, S_PAD)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    s_ok = s < SPLITS
    part = row * SPLITS + s
    m = tl.load(m_ptr + part[:, None] * G_PAD + g[None, :], mask=s_ok[:, None], other=float("-inf"))  # (S, G)
    l = tl.load(l_ptr + part[:, None] * G_PAD + g[None, :], mask=s_ok[:, None], other=0.0)  # noqa: E741
    top = tl.max(m, axis=0)  # (G,)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - top[None, :]))  # empty chunks weigh nothing
    total = tl.sum(weight * l, axis=0)
    out = tl.zeros([G_PAD, D_PAD], tl.float32)
    for split in range(SPLITS):  # one chunk's (G, D) at a time: all S at once spill registers at batch 1
        chunk = (row * SPLITS + split) * G_PAD + g
        m_split = tl.load(m_ptr + chunk)
        acc = tl.load(acc_ptr + chunk[:, None] * D_PAD + d[None, :])
        out += tl.where(m_split == float("-inf"), 0.0, tl.exp(m_split - top))[:, None] * acc
    out = out / total[:, None]
    g_ok = g < GROUP
    tl.store(
        out_ptr + b * so_b + (h * GROUP + g)[:, None] * so_h + d[None, :] * so_d,
        out.to(out_ptr.dtype.element_ty),
        mask=g_ok[:, None] & (d < DIM)[None, :],
    )
    if PROBS:
        length = tl.load(length_ptr).to(tl.int32)
        for start in range(0, capacity, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            where = z_ptr + b * sz_b + h * sz_h + g[:, None] * sz_g + n[None, :] * sz_t
            inside = g_ok[:, None] & (n < capacity)[None, :]
            filled = inside & (n < length)[None, :]
            z = tl.load(where, mask=filled, other=float("-inf"))
            p = tl.where(filled, tl.exp(z - top[:, None]) / total[:, None], 0.0)
            tl.store(where, p, mask=inside)


def _row(t: torch.Tensor | None, batch: int) -> tuple[torch.Tensor | None, int, int]:
    """A (B or 1, T) per-key tensor's strides, 0 across a batch it is shared by."""
    if t is None:
        return None, 0, 0
    if t.dim() != 2 or t.shape[0] not in (1, batch):
        raise ValueError(f"a per-key tensor must be (B or 1, keys), got {tuple(t.shape)}")
    return t, (t.stride(0) if t.shape[0] == batch and batch > 1 else 0), t.stride(1)


def default_splits(batch: int, kv_heads: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Enough key chunks to give every streaming multiprocessor two programs, at most one chunk per key block."""
    if device.type != "cuda":
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, batch * kv_heads), triton.cdiv(capacity, block_n), 64))


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    length: int | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    boost: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    return_probs: bool = False,
    splits: int | None = None,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query token's attention over the first `length` keys of a (static) KV cache, with a method's edits.

    query (B, H, 1, D); key, value (B, KVH, T, D), H a multiple of KVH; `length`: the filled keys, an int or a
    one-element integer tensor on the device (default T); `mask`: which keys each sequence attends, as the attention
    mask's newest row (B, T') or the 4-D mask (B, 1, Q, T'), bool (true: attended) or additive in the query's dtype;
    `boost`, `scale`: (B or 1, T') per-key edits (see the module's docstring), T' >= length.
    Returns (out (B, 1, H, D) in the value's dtype, as `attention_row`; the probabilities (B, KVH, H // KVH, T)
    float32, zero from `length` on, if `return_probs`, else None)."""
    b, heads, q_len, dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    if q_len != 1:
        raise ValueError(f"one query token per sequence, got {q_len}")
    if heads % kv_heads or value.shape[:3] != key.shape[:3] or key.shape[0] != b or value.shape[-1] != dim:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} do not fit")
    if query.dtype not in _TL_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"query, key and value must share one of {list(_TL_DTYPES)}")
    if length is None:
        length = capacity
    if isinstance(length, int):
        length = torch.tensor([length], device=query.device)
    if length.numel() != 1 or length.dtype.is_floating_point:
        raise ValueError("length: one integer")
    if mask is not None and mask.dim() == 4:
        mask = mask[:, 0, -1, :]
    for t in (mask, boost, scale):
        _row(t, b)  # refuses a per-key tensor of the wrong shape
    out, probs = _decode_attention_op(
        query, key, value, float(scaling), length, mask, boost, scale, return_probs, splits or 0, block_n
    )
    return out, probs if return_probs else None


@torch.library.custom_op(
    "neverfade::decode_attention",
    mutates_args=(),
    schema="(Tensor query, Tensor key, Tensor value, float scaling, Tensor length, Tensor? mask, Tensor? boost, "
    "Tensor? scale, bool return_probs, int splits, int block_n) -> (Tensor, Tensor)",
)
def _decode_attention_op(query, key, value, scaling, length, mask, boost, scale, return_probs, splits, block_n):
    """The kernels' launch as one operator: torch.compile leaves it whole (its `fake` gives the shapes) and calls it
    from the compiled step, so nothing here is traced: `splits` 0 is `default_splits`, which asks the device for its
    multiprocessor count (dynamo cannot trace that call). Returns (out, probs), probs empty (0,) when not asked for."""
    return launch(query, key, value, scaling, length, mask, boost, scale, return_probs, splits, block_n)


def launch(
    query, key, value, scaling, length, mask, boost, scale, return_probs, splits, block_n, num_warps=None, num_stages=2
):
    """The two kernels' launch (`_decode_attention_op`'s body); `num_warps`, `num_stages`: the first kernel's (default
    2 warps up to head size 128, else 4; 2 stages), settable for scripts/kernel_sweep.py."""
    b, heads, _, dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    group = heads // kv_heads
    device = query.device
    splits = splits or default_splits(b, kv_heads, capacity, block_n, device)
    if mask is not None and mask.dtype == torch.bool:
        mask_kind, mask = 2, mask.view(torch.uint8)
    else:
        mask_kind = 0 if mask is None else 1
    mask, smask_b, smask_t = _row(mask, b)
    boost, sboost_b, sboost_t = _row(boost, b)
    scale, sscale_b, sscale_t = _row(scale, b)
    g_pad = max(16, triton.next_power_of_2(group))
    d_pad = max(16, triton.next_power_of_2(dim))
    m = torch.empty(b * kv_heads * splits * g_pad, device=device, dtype=torch.float32)
    total = torch.empty_like(m)
    acc = torch.empty(b * kv_heads * splits * g_pad * d_pad, device=device, dtype=torch.float32)
    out = torch.empty(b, 1, heads, dim, device=device, dtype=value.dtype)
    probs = torch.empty(b, kv_heads, group, capacity, device=device, dtype=torch.float32) if return_probs else None
    z = probs if return_probs else m  # a pointer the kernels never touch without PROBS
    z_strides = probs.stride() if return_probs else (0, 0, 0, 0)
    dummy = m
    _partial_kernel[(b * kv_heads, splits)](
        query, key, value, length, mask if mask is not None else dummy, boost if boost is not None else dummy,
        scale if scale is not None else dummy,
        m, total, acc, z,
        float(scaling), torch.finfo(query.dtype).min,
        query.stride(0), query.stride(1), query.stride(3),
        *key.stride(), *value.stride(),
        smask_b, smask_t, sboost_b, sboost_t, sscale_b, sscale_t,
        *z_strides,
        KV_HEADS=kv_heads, GROUP=group, DIM=dim, SPLITS=splits, G_PAD=g_pad, D_PAD=d_pad, BLOCK_N=block_n,
        MASK=mask_kind, BOOST=boost is not None, SCALE=scale is not None, PROBS=return_probs,
        DTYPE=_TL_DTYPES[query.dtype], ROUND=query.dtype != torch.float32, IEEE=query.dtype == torch.float32,
        num_warps=num_warps or (2 if d_pad <= 128 else 4), num_stages=num_stages,
    )  # fmt: skip
    _combine_kernel[(b * kv_heads,)](
        m, total, acc, length, out, z,
        out.stride(0), out.stride(2), out.stride(3),
        *z_strides,
        capacity,
        KV_HEADS=kv_heads, GROUP=group, DIM=dim, SPLITS=splits, S_PAD=triton.next_power_of_2(splits),
        G_PAD=g_pad, D_PAD=d_pad, BLOCK_N=block_n, PROBS=return_probs,
    )  # fmt: skip
    return out, probs if return_probs else m.new_empty(0)


@_decode_attention_op.register_fake
def _(query, key, value, scaling, length, mask, boost, scale, return_probs, splits, block_n):
    b, heads, _, dim = query.shape
    kv_heads, capacity = key.shape[1], key.shape[2]
    out = query.new_empty(b, 1, heads, dim, dtype=value.dtype)
    shape = (b, kv_heads, heads // kv_heads, capacity) if return_probs else (0,)
    return out, query.new_empty(shape, dtype=torch.float32)


__all__ = ["decode_attention", "default_splits"]
