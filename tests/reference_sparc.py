"""An independent, plain SPARC: eager attention in every layer, batch size 1, index lists, and the value cache
scaled in place as the authors' code does. It shares no code with neverfade's engine."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "nf_reference_sparc"


class ReferenceSPARC:
    def __init__(self, image_token_id, layer, tau, alpha=1.1, beta=0.1, start=0, end=None):
        self.image_token_id, self.layer, self.tau = image_token_id, layer, tau
        self.alpha, self.beta, self.start, self.end = alpha, beta, start, end

    def attach(self, model, input_ids):
        assert input_ids.shape[0] == 1, "the reference runs batch size 1"
        self.image_positions = [j for j, t in enumerate(input_ids[0].tolist()) if t == self.image_token_id]
        self.step = 0
        self.ema = None
        self.selections: dict[int, list[int]] = {}
        if self.end is None:
            self.end = model.config.get_text_config().num_hidden_layers - 1
        AttentionInterface.register(NAME, self.attention)
        AttentionMaskInterface.register(NAME, eager_mask)
        model.set_attn_implementation({"text_config": NAME})

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer, q_len = module.layer_idx, query.shape[2]
        if layer == 0 and q_len == 1:
            self.step += 1
        if q_len == 1 and self.start <= layer <= self.end:
            for j in self.selections.get(self.step - 1, []):
                value[:, :, j, :] *= self.alpha  # in the cache itself: it compounds over steps
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : k.shape[-2]]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if layer == self.layer:
            current = probs[0, :, -1, self.image_positions].float().mean(0)
            if self.step == 0:
                self.ema = current
            else:
                rise = (current - self.ema) / self.ema
                self.selections[self.step] = [self.image_positions[i] for i in range(len(rise)) if rise[i] >= self.tau]
                self.ema = (1 - self.beta) * current + self.beta * self.ema
        out = torch.matmul(probs, v).transpose(1, 2).contiguous()
        return out, probs

    @property
    def total_selected(self) -> int:
        return sum(len(s) for s in self.selections.values())
