"""The skeleton of a decoding loop run through `generate(custom_generate=...)`: generate prepares the inputs, the
cache, the logits processors (min/max length, and temperature/top-p when sampling) and the stopping criteria; a
subclass says how a step's logits are made (`step_logits`) and how a token is chosen from them (`choose`)."""

from __future__ import annotations

import torch
from neverfade import compat


class DecodingLoop:
    def __init__(self, model, logits_processor, stopping_criteria, generation_config, streamer=None):
        self.model = model
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.config = generation_config
        self.streamer = streamer

    def forward(self, ids, kwargs, first: bool):
        """One forward of `ids` (the whole prompt at the first step, else the newest token); returns the output and
        the kwargs for the next step."""
        inputs = self.model.prepare_inputs_for_generation(ids, next_sequence_length=None if first else 1,
                                                          is_first_iteration=first, **kwargs)
        out = self.model(**inputs, return_dict=True)
        return out, compat.update_model_kwargs(self.model, out, kwargs)

    def step_logits(self, input_ids, first: bool) -> torch.Tensor:
        """(B, V) float32 next-token logits of this step."""
        raise NotImplementedError

    def choose(self, input_ids, logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(B,) tokens from the raw logits and the processed scores; default: generate's own rule."""
        if self.config.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(dim=-1)

    def appended(self, tokens: torch.Tensor) -> None:
        """The chosen tokens were appended to the sequences."""

    def run(self, input_ids, model_kwargs):
        self.kwargs = model_kwargs
        pad = compat.pad_token(self.config)
        has_eos = any(hasattr(c, "eos_token_id") for c in self.stopping_criteria)
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        keep_scores = self.config.return_dict_in_generate and self.config.output_scores
        scores_seen, first = (), True
        while True:
            logits = self.step_logits(input_ids, first)
            first = False
            scores = self.logits_processor(input_ids, logits)
            if keep_scores:
                scores_seen += (scores,)
            tokens = self.choose(input_ids, logits, scores)
            if has_eos and pad is not None:
                tokens = tokens * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            self.appended(tokens)
            if self.streamer is not None:
                self.streamer.put(tokens.cpu())
            unfinished = unfinished & ~self.stopping_criteria(input_ids, scores_seen or scores)
            if unfinished.max() == 0:
                break
        if self.streamer is not None:
            self.streamer.end()
        if self.config.return_dict_in_generate:
            return compat.decoder_output(input_ids, scores_seen or None, compat.cache_of(self.kwargs))
        return input_ids
