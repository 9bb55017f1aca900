"""The skeleton of a decoding loop run through `generate(custom_generate=...)`: generate prepares the inputs, the
cache, the logits processors (min/max length, and temperature/top-p when sampling) and the stopping criteria; a
subclass says how a step's logits are made (`step_logits`) and how a token is chosen from them (`choose`).

`run` is the one loop every strategy shares: it streams each step's tokens, keeps the scores generate was asked
for, and stops when every sequence has finished. It looks at the finished flags on the host only every
`check_every` steps (1 unless a subclass avoids host synchronisation), so it can run past the end; the tokens
after it are cut off before returning."""

from __future__ import annotations

import torch

from neverfade import compat


class DecodingLoop:
    check_every = 1  # steps between looks at the finished flags on the host

    def __init__(
        self, model, logits_processor, stopping_criteria, generation_config, streamer=None, method=None, raw_inputs=None
    ):
        self.model = model
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.config = generation_config
        self.streamer = streamer
        self.method = method
        self.raw_inputs = raw_inputs or {}  # the processor's outputs as given to generate (neverfade_inputs)
        self.kwargs: dict = {}

    def forward(self, ids, kwargs, first: bool):
        """One forward of `ids` (the whole prompt at the first step, else the newest token); returns the output and
        the kwargs for the next step."""
        inputs = self.model.prepare_inputs_for_generation(
            ids, next_sequence_length=None if first else 1, is_first_iteration=first, **kwargs
        )
        out = self.model(**inputs, return_dict=True)
        return out, compat.update_model_kwargs(self.model, out, kwargs)

    def start(self, input_ids, model_kwargs) -> None:
        """Before the first step: `model_kwargs` are generate's, with its (empty) cache."""
        self.kwargs = model_kwargs

    def step_logits(self, input_ids, step: int) -> torch.Tensor:
        """(B, V) float32 next-token logits of step `step` (0: the prompt's)."""
        raise NotImplementedError

    def choose(self, input_ids, logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(B,) tokens from the raw logits and the processed scores; default: generate's own rule."""
        if self.config.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(dim=-1)

    def appended(self, tokens: torch.Tensor) -> None:
        """The chosen tokens were appended to the sequences."""

    def finish(self) -> None:
        """After the last step."""

    def run(self, input_ids, model_kwargs):
        self.start(input_ids, model_kwargs)
        pad = compat.pad_token(self.config)
        has_eos = any(hasattr(c, "eos_token_id") for c in self.stopping_criteria)
        prompt_len, device = input_ids.shape[1], input_ids.device
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=device)
        done_at = torch.zeros((), dtype=torch.long, device=device)  # new tokens when every sequence had finished
        keep_scores = self.config.return_dict_in_generate and self.config.output_scores
        kept, step = [], 0
        while True:
            logits = self.step_logits(input_ids, step)
            scores = self.logits_processor(input_ids, logits)
            if keep_scores:
                kept.append(scores.clone())  # a loop may rewrite its logits buffer at the next step
            tokens = self.choose(input_ids, logits, scores)
            if has_eos and pad is not None:
                tokens = tokens * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            self.appended(tokens)
            if self.streamer is not None:
                self.streamer.put(tokens.cpu())
            unfinished = unfinished & ~self.stopping_criteria(input_ids, scores)
            step += 1
            done_at = torch.where((done_at == 0) & (unfinished.max() == 0), step, done_at)
            if input_ids.shape[1] >= self.config.max_length or (step % self.check_every == 0 and done_at > 0):
                break
        stop = int(done_at)
        self.steps = stop or step  # the steps kept: a loop that checks every few steps may run past the end
        self.finish()
        if self.streamer is not None:
            self.streamer.end()
        if stop:
            input_ids, kept = input_ids[:, : prompt_len + stop], kept[:stop]
        if self.config.return_dict_in_generate:
            return compat.decoder_output(input_ids, tuple(kept) or None, compat.cache_of(self.kwargs))
        return input_ids
