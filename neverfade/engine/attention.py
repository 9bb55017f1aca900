"""The one attention function neverfade registers with transformers.

Prefill runs the stock SDPA kernel; in a layer where a method acts on the prompt's last position (the row that
predicts the first token), that one row is computed explicitly and replaces SDPA's. A decode step runs SDPA in layers no method touches, and in the others one explicit attention
row (the query is a single token, so this is two small matmuls and a softmax over the keys).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "neverfade"


def attention_row(query, key, value, attention_mask, scaling, layer, methods, batch):
    """One query token's attention through the methods: query (B, H, 1, D); key, value (B, KVH, T, D);
    returns the output (B, 1, H, D)."""
    b, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(b, kv_heads, heads // kv_heads, dim)  # heads of one KV head together
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * scaling  # (B, KVH, G, T)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, : key.shape[2]]  # (B, 1, 1, T), shared by all heads
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    for m in methods:
        scores = m.edit_scores(layer, scores, batch)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    observed = probs.detach()  # observers keep state across steps; a gradient (SGRS) must not reach it
    for m in methods:
        m.observe(layer, observed, batch)
    for m in methods:
        probs = m.reweight(layer, probs, batch)
    out = torch.matmul(probs.to(value.dtype), value)  # (B, KVH, G, D)
    return out.reshape(b, heads, 1, dim).transpose(1, 2)


def neverfade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    engine = getattr(module, "_neverfade_engine", None)
    if engine is None or not engine.hooks:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return engine.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, neverfade_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
