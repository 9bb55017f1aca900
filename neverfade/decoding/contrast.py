"""A decoding loop with two branches: the input as given, and a contrast input (VCD's noised image), each with its
own KV cache (and so its own Batch in the engine). Each step both branches run one forward, the method combines their
next-token logits, and the one chosen token is appended to both."""

from __future__ import annotations

import copy

import torch

from neverfade import compat
from neverfade.decoding.loop import DecodingLoop


class ContrastLoop(DecodingLoop):
    def __init__(self, method, other_ids, other_kwargs, **loop):
        super().__init__(**loop)
        self.method, self.other_ids, self.other_kwargs = method, other_ids, other_kwargs

    def step_logits(self, input_ids, first):
        out, self.kwargs = self.forward(input_ids, self.kwargs, first)
        other, self.other_kwargs = self.forward(self.other_ids, self.other_kwargs, first)
        return self.method.combine(out.logits[:, -1].float(), other.logits[:, -1].float())

    def appended(self, tokens):
        self.other_ids = torch.cat([self.other_ids, tokens[:, None]], dim=-1)


def contrast_decode(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                    streamer=None, *, method, neverfade_inputs=None, neverfade_streamer=None, **model_kwargs):
    """`neverfade_inputs`: the processor's outputs as given to generate (which may have encoded the images already
    and dropped the pixels; the contrast branch needs them)."""
    streamer = streamer or neverfade_streamer  # transformers 5.23 does not pass its own to a custom loop
    if synced_gpus:
        raise ValueError(f"{method.name} does not support synced_gpus")
    other_ids, other_kwargs = method.contrast_inputs(model, input_ids, model_kwargs, neverfade_inputs or {})
    if compat.cache_of(model_kwargs) is not None:  # empty before the prefill
        other_kwargs = compat.with_cache(other_kwargs, copy.deepcopy(compat.cache_of(model_kwargs)))
    loop = ContrastLoop(method, other_ids, other_kwargs, model=model, logits_processor=logits_processor,
                        stopping_criteria=stopping_criteria, generation_config=generation_config, streamer=streamer)
    return loop.run(input_ids, model_kwargs)
