"""Plain references for naive scaling, PAI and LocoRE: eager attention in every layer, batch size 1, index lists,
positions read off the key length. They share no code with neverfade's engine."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "nf_reference_methods"


class ReferenceMethods:
    """`naive`, `pai`, `locore`: dicts of parameters (with `start`, `end`), or None to leave the method out."""

    def __init__(self, naive=None, pai=None, locore=None):
        self.naive, self.pai, self.locore = naive, pai, locore

    def attach(self, model, input_ids, image_token_id):
        assert input_ids.shape[0] == 1, "the reference runs batch size 1"
        self.prompt_len = input_ids.shape[1]
        self.images = [j for j, t in enumerate(input_ids[0].tolist()) if t == image_token_id]
        AttentionInterface.register(NAME, self.attention)
        AttentionMaskInterface.register(NAME, eager_mask)
        model.set_attn_implementation({"text_config": NAME})

    @staticmethod
    def _acts(cfg, layer):
        return cfg is not None and cfg["start"] <= layer <= cfg["end"]

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : k.shape[-2]]
        if self._acts(self.pai, layer):
            for j in self.images:
                z = scores[0, :, -1, j].clone()
                scores[0, :, -1, j] = z + self.pai["alpha"] * z.abs()
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if self._acts(self.naive, layer):
            for j in self.images:
                probs[0, :, -1, j] *= self.naive["alpha"]
        query_position = k.shape[-2] - 1  # the newest token's own key is the last one
        if query.shape[2] == 1 and self._acts(self.locore, layer):
            for j in range(self.prompt_len, query_position):
                if query_position - j <= self.locore["window"]:
                    probs[0, :, -1, j] *= 1 + self.locore["beta"]
        out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).contiguous()
        return out, probs
