"""The one attention function neverfade registers with transformers.

Prefill runs the stock SDPA kernel; in a layer where a method acts on the prompt's last position (the row that
predicts the first token), that one row is computed explicitly and replaces SDPA's. A decode step on CUDA runs the
fused Triton kernel in every layer (`neverfade.kernels.decode_attention`: one pass over the filled keys only, with the
methods' edits where they act); elsewhere SDPA in layers no method touches and, in the others and wherever the
kernel does not cover the call (`fused_covers`), the explicit row (`attention_row`: two small matmuls and a softmax
over every key of the cache), which is also the kernel's reference.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import AttentionInterface

from neverfade import compat

NAME = "neverfade"


def key_bias(attention_mask, keys: int, kv_heads: int, dtype) -> torch.Tensor | None:
    """The newest query's mask row as an additive bias, shaped (B * KVH, 1, T) for `baddbmm`."""
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, :keys]  # (B, T): one row, shared by every head
    if row.dtype == torch.bool:
        row = torch.zeros(row.shape, dtype=dtype, device=row.device).masked_fill_(~row, torch.finfo(dtype).min)
    return row.to(dtype).repeat_interleave(kv_heads, dim=0)[:, None, :]


def attention_row(
    query, key, value, bias, scaling, edits, layer, observers=(), reweighters=(), batch=None, newest=None
):
    """One query token's attention with the methods' edits: query (B, H, 1, D); key, value (B, KVH, T, D);
    `bias` from `key_bias`; `edits` = (boost, scale), each (B or 1, T) or None: the logits of keys become
    z + boost * |z| before the softmax, and the weights are multiplied by `scale` after it (no renormalisation).
    Observers see the softmax before any reweighting; `reweighters` (SGRS) see it after `scale`.
    `newest` ((1,) long): at a decode step, the cache index this step's key and value were written to. Where the
    keys carry a gradient (SGRS's backward through the layers above its first), only those get it (`_Newest`): the
    others were cached before this step's attention rows existed. The output is the same to the bit.
    Returns the output (B, 1, H, D). Four kernels where SDPA is one: a matmul with scale and mask, the softmax,
    the reweighting with the cast, and a matmul."""
    b, heads, _, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    grouped = query.reshape(b * kv_heads, heads // kv_heads, dim)  # the heads of one KV head together
    new_key = new_value = None
    if newest is not None and (key.requires_grad or value.requires_grad):
        new_key, new_value = (_Newest.apply(t, newest).reshape(b * kv_heads, 1, dim) for t in (key, value))
        key, value = key.detach(), value.detach()
    scores = _product(grouped, key.reshape(b * kv_heads, keys, dim).transpose(1, 2), bias, scaling)
    if new_key is not None:  # + 0 at the newest key, with its logit's gradient to the key (the query has its own)
        own = torch.bmm(grouped.detach(), new_key.transpose(1, 2)) * scaling  # (B * KVH, G, 1)
        scores = scores + (torch.arange(keys, device=newest.device) == newest) * (own - own.detach())
    scores = scores.view(b, kv_heads, -1, keys)  # (B, KVH, G, T)
    boost, scale = edits
    if boost is not None:
        scores = scores + boost[:, None, None, :].to(scores.dtype) * scores.abs()
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if len(observers) > 0:  # len: dynamo (torch 2.11) cannot trace bool() of a list
        observed = probs.detach()  # observers keep state across steps; a gradient (SGRS) must not reach it
        for m in observers:
            m.observe(layer, observed, batch)
    if scale is not None and len(reweighters) == 0 and not probs.requires_grad:  # reweight and cast in one kernel
        weights = torch.mul(probs, scale[:, None, None, :], out=torch.empty_like(probs, dtype=value.dtype))
    else:
        if scale is not None:
            probs = probs * scale[:, None, None, :]
        for m in reweighters:
            probs = m.reweight(layer, probs, batch)
        weights = probs.to(value.dtype)
    weights = weights.view(b * kv_heads, -1, keys)
    out = _product(weights, value.reshape(b * kv_heads, keys, dim))
    if new_value is not None:  # + 0, with the gradient of the newest value
        out = out + weights.detach().index_select(2, newest) * (new_value - new_value.detach())
    return out.view(b, heads, 1, dim).transpose(1, 2)


def _product(x, cache, bias=None, alpha=None):
    """bmm(x, cache) * alpha, or baddbmm(bias, x, cache, alpha=alpha): x (N, M, P) with the batch's rows, `cache`
    (N, P, Q) a view of the KV cache. Where x carries a gradient and the cache does not: `_ConstantProduct`."""
    if x.requires_grad and not cache.requires_grad and torch.is_grad_enabled():
        return _ConstantProduct.apply(x, cache, bias, alpha)
    return _ConstantProduct.forward(x, cache, bias, alpha)


class _ConstantProduct(torch.autograd.Function):
    """`_product` with the cache a constant, for SGRS's batched backward (torch.func.vmap over the candidates'
    cotangents): vmap's own rule for bmm copies the unbatched operand once per candidate (a cache-sized copy per
    candidate, layer and step); this rule folds the candidates into x's rows, so the cache is read as it is."""

    @staticmethod
    def forward(x, cache, bias, alpha):
        if bias is not None:
            return torch.baddbmm(bias, x, cache, alpha=alpha)
        out = torch.bmm(x, cache)
        return out if alpha is None else out * alpha

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.alpha = inputs[3]

    @staticmethod
    def backward(ctx, grad):
        (cache,) = ctx.saved_tensors
        grad = grad if ctx.alpha is None else grad * ctx.alpha
        return _ConstantProduct.apply(grad, cache.transpose(1, 2), None, None), None, None, None

    @staticmethod
    def vmap(info, in_dims, x, cache, bias, alpha):
        if in_dims[1:] != (None, None, None):  # not SGRS's backward (saliencies falls back to one per candidate)
            raise NotImplementedError("_ConstantProduct: a batched cache or bias")
        x = x.movedim(in_dims[0], 1)  # (N, candidates, M, P)
        n, k, m, p = x.shape
        return _ConstantProduct.forward(x.reshape(n, k * m, p), cache, None, alpha).view(n, k, m, -1), 1


class _Newest(torch.autograd.Function):
    """cache.index_select(2, newest) at a decode step, whose gradient is read at `newest` only: the cache's own
    backward (a static cache's index_copy_, a dynamic one's cat) takes the gradient of the one position this step
    wrote, so the gradient returned is this one expanded over the cache (no cache-sized tensor per candidate)."""

    @staticmethod
    def forward(cache, newest):
        return cache.index_select(2, newest)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, grad):
        return grad.expand(ctx.shape), None


ATTENTION = ("auto", "fused", "explicit")  # the engine's choice of decode-step row (`Engine.attention`)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernel's


def fused_unavailable(device: torch.device) -> str | None:
    """Why the fused kernel cannot run on `device`, or None: it needs Triton (not a dependency of neverfade; torch's
    CUDA wheels bring it), and CUDA, or on a CPU Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
    first imported: the tests run it so)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return f"Triton compiles for CUDA and interprets on a CPU only with TRITON_INTERPRET=1; the model is on {device}"


def fused_runs(choice: str, device: torch.device) -> bool:
    """Whether the decode-step rows take the fused kernel on `device` (where `fused_covers` the call) under the
    engine's `choice`: "fused" anywhere it can run (refused where it cannot); "auto" on CUDA with Triton (in a
    compiled step too: the kernel is one operator there); "explicit" never."""
    if choice not in ATTENTION:
        raise ValueError(f"attention must be {', '.join(ATTENTION)}, not {choice!r}")
    if choice == "explicit":
        return False
    why = fused_unavailable(device)
    if choice == "fused" and why:
        raise ValueError(f"attention='fused' cannot run: {why}")
    return why is None and (choice == "fused" or device.type == "cuda")


def fused_covers(query, key, value, attention_mask, reweighters) -> bool:
    """Whether the fused kernel computes this decode step's row as `attention_row` would: one query token, a dtype
    it takes, one head size, no mask or a boolean one (an additive mask may hold -inf, which the kernel's online
    softmax cannot take over a chunk of hidden keys), no reweighter (SGRS reweights after the scale and
    backpropagates through the row: the kernel has no backward), and no gradient wanted. Shapes and flags only:
    no host synchronisation."""
    if query.shape[2] != 1 or len(reweighters) > 0:  # len: dynamo (torch 2.11) cannot trace bool() of a list
        return False
    if query.dtype not in FUSED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if query.device.type != key.device.type or value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return False
    if query.shape[1] % key.shape[1] or value.shape[:3] != key.shape[:3]:
        return False
    if query.requires_grad or key.requires_grad or value.requires_grad:
        return False
    if attention_mask is None:
        return True
    return (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dtype == torch.bool
        and attention_mask.dim() == 4
        and attention_mask.shape[0] in (1, query.shape[0])
        and attention_mask.shape[-1] >= key.shape[2]
    )


def fused_row(query, key, value, attention_mask, scaling, edits, length, layer, observers=(), batch=None):
    """`attention_row` (without reweighters) by the fused kernel, over the first `length` keys (a one-element device
    tensor: the filled part of a static cache, read by the kernel, so a captured step replays it as the cache
    grows). Observers see the same float32 probabilities, zero from `length` on. Returns the output (B, 1, H, D)."""
    from neverfade.kernels.decode_attention import decode_attention  # Triton: imported only where it runs

    boost, scale = edits
    out, probs = decode_attention(
        query, key, value, scaling, length, attention_mask, boost, scale, return_probs=len(observers) > 0
    )
    for m in observers:
        m.observe(layer, probs, batch)
    return out


def neverfade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    engine = getattr(module, "_neverfade_engine", None)
    if engine is None or not engine.active:
        return compat.sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return engine.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, neverfade_attention)
    compat.AttentionMaskInterface.register(NAME, compat.sdpa_mask)
