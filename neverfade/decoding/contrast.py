"""A decoding loop with two branches: the input as given, and a contrast input (VCD's noised image), each with its
own KV cache (and so its own Batch in the engine). Each step both branches run one forward, the method combines their
next-token logits, and the one chosen token is appended to both."""

from __future__ import annotations

import copy

import torch

from neverfade import compat
from neverfade.decoding.loop import DecodingLoop


class ContrastLoop(DecodingLoop):
    def start(self, input_ids, model_kwargs):
        super().start(input_ids, model_kwargs)
        self.other_ids, self.other_kwargs = self.method.contrast_inputs(
            self.model, input_ids, model_kwargs, self.raw_inputs
        )
        if compat.cache_of(model_kwargs) is not None:  # empty before the prefill
            self.other_kwargs = compat.with_cache(self.other_kwargs, copy.deepcopy(compat.cache_of(model_kwargs)))

    def step_logits(self, input_ids, step):
        out, self.kwargs = self.forward(input_ids, self.kwargs, step == 0)
        other, self.other_kwargs = self.forward(self.other_ids, self.other_kwargs, step == 0)
        return self.method.combine(out.logits[:, -1].float(), other.logits[:, -1].float())

    def appended(self, tokens):
        self.other_ids = torch.cat([self.other_ids, tokens[:, None]], dim=-1)
