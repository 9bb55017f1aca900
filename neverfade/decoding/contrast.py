"""A decoding loop with two branches: the input as given, and a contrast input (VCD's noised image, PAI's
image-free prompt), each with its own KV cache. Each step both branches run one forward, the method combines their
next-token logits, and the one chosen token is appended to both.

It replaces only `generate`'s loop (`custom_generate`): inputs, caches, logits processors (min/max length, and the
temperature/top-p warpers when sampling) and stopping criteria are generate's own.
"""

from __future__ import annotations

import copy

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput


def contrast_decode(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                    streamer=None, *, method, neverfade_inputs=None, **model_kwargs):
    """`neverfade_inputs`: the processor's outputs as given to generate (which may have encoded the images already
    and dropped the pixels; the contrast branch needs them)."""
    if synced_gpus:
        raise ValueError(f"{method.name} does not support synced_gpus")
    other_ids, other_kwargs = method.contrast_inputs(model, input_ids, model_kwargs, neverfade_inputs or {})
    cache = model_kwargs.get("past_key_values")
    if cache is not None:
        other_kwargs["past_key_values"] = copy.deepcopy(cache)  # empty before the prefill
    pad = generation_config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    scores = ()
    first = True
    while True:
        out = _forward(model, input_ids, model_kwargs, first)
        other = _forward(model, other_ids, other_kwargs, first)
        model_kwargs = model._update_model_kwargs_for_generation(out, model_kwargs)
        other_kwargs = model._update_model_kwargs_for_generation(other, other_kwargs)
        first = False
        logits = method.combine(out.logits[:, -1].float(), other.logits[:, -1].float())
        step_scores = logits_processor(input_ids, logits)
        if generation_config.return_dict_in_generate and generation_config.output_scores:
            scores += (step_scores,)
        if generation_config.do_sample:
            tokens = torch.multinomial(torch.softmax(step_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = step_scores.argmax(dim=-1)
        if has_eos and pad is not None:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        other_ids = torch.cat([other_ids, tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        if unfinished.max() == 0:
            break
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores or None,
                                         past_key_values=model_kwargs.get("past_key_values"))
    return input_ids


def _forward(model, ids, kwargs, first: bool):
    inputs = model.prepare_inputs_for_generation(ids, next_sequence_length=None if first else 1,
                                                 is_first_iteration=first, **kwargs)
    return model(**inputs, return_dict=True)
