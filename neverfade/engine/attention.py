"""The one attention function neverfade registers with transformers.

Prefill runs the stock SDPA kernel; in a layer where a method acts on the prompt's last position (the row that
predicts the first token), that one row is computed explicitly and replaces SDPA's. A decode step runs SDPA in
layers no method touches, and in the others one explicit attention row (the query is a single token, so this is two
small matmuls and a softmax over the keys).
"""

from __future__ import annotations

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


def attention_row(query, key, value, bias, scaling, edits, layer, observers=(), reweighters=(), batch=None):
    """One query token's attention with the methods' edits: query (B, H, 1, D); key, value (B, KVH, T, D);
    `bias` from `key_bias`; `edits` = (boost, scale), each (B or 1, T) or None: the logits of keys become
    z + boost * |z| before the softmax, and the weights are multiplied by `scale` after it (no renormalisation).
    Observers see the softmax before any reweighting; `reweighters` (SGRS) see it after `scale`.
    Returns the output (B, 1, H, D). Four kernels where SDPA is one: a matmul with scale and mask, the softmax,
    the reweighting with the cast, and a matmul."""
    b, heads, _, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    grouped = query.reshape(b * kv_heads, heads // kv_heads, dim)  # the heads of one KV head together
    key_t = key.reshape(b * kv_heads, keys, dim).transpose(1, 2)
    if bias is None:
        scores = torch.bmm(grouped, key_t) * scaling
    else:
        scores = torch.baddbmm(bias, grouped, key_t, alpha=scaling)
    scores = scores.view(b, kv_heads, -1, keys)  # (B, KVH, G, T)
    boost, scale = edits
    if boost is not None:
        scores = scores + boost[:, None, None, :].to(scores.dtype) * scores.abs()
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if observers:
        observed = probs.detach()  # observers keep state across steps; a gradient (SGRS) must not reach it
        for m in observers:
            m.observe(layer, observed, batch)
    if scale is not None and not reweighters and not probs.requires_grad:  # reweight and cast in one kernel
        weights = torch.mul(probs, scale[:, None, None, :], out=torch.empty_like(probs, dtype=value.dtype))
    else:
        if scale is not None:
            probs = probs * scale[:, None, None, :]
        for m in reweighters:
            probs = m.reweight(layer, probs, batch)
        weights = probs.to(value.dtype)
    out = torch.bmm(weights.view(b * kv_heads, -1, keys), value.reshape(b * kv_heads, keys, dim))
    return out.view(b, heads, 1, dim).transpose(1, 2)


def neverfade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    engine = getattr(module, "_neverfade_engine", None)
    if engine is None or not engine.hooks:
        return compat.sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return engine.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, neverfade_attention)
    compat.AttentionMaskInterface.register(NAME, compat.sdpa_mask)
