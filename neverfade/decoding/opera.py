"""OPERA's beam search (the definition is in methods/opera.py), run through `generate(custom_generate=...)`.

One prefill for the whole batch; then each image's search runs on its own rows of the same KV cache, one image after
another (a roll-back rewinds one image, and the rows of one cache share a length). An image's rows are its N beams,
or N * C while its candidates are fed: one forward per step, since the chosen candidate's forward already gives the
next step's logits and its keys and values. The beam bookkeeping is transformers' own (`_get_top_k_continuations`
and its siblings, as `generate(num_beams=N)` runs them).

Every step keeps what a roll-back needs: the bookkeeping, the column history and the other methods' per-sequence
state at the start of the step, and the key/value entry each surviving beam added. A roll-back to step p rebuilds
the beams' caches from the prompt and those entries (following each beam's lineage) and re-feeds their last token
for the logits, so the cache, the logits and every method's state are those the beams had.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from transformers import DynamicCache

from neverfade import compat
from neverfade.decoding.loop import DecodingLoop
from neverfade.errors import ParameterError

SEQUENCE_KEYS = ("attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids")  # grow with the sequence


class BeamLoop(DecodingLoop):
    """The strategy's entry: checks generate's settings, runs the joint prefill, then each image's search."""

    def run(self, input_ids, model_kwargs):
        model, method, config = self.model, self.method, self.config
        if self.streamer is not None:
            raise ValueError("opera is a beam search: it cannot stream tokens")
        if config.do_sample:
            raise ValueError("opera is a beam search: sampling (do_sample=True) is not supported")
        if config.num_beams != 1 or config.num_return_sequences != 1:
            raise ValueError(
                "opera runs its own beams (its num_beams parameter): call generate without num_beams "
                "or num_return_sequences"
            )
        cache = compat.cache_of(model_kwargs)
        if not isinstance(cache, DynamicCache) or cache.get_seq_length() != 0:
            raise ValueError("opera needs an empty DynamicCache (generate's default cache)")
        out, kwargs = self.forward(input_ids, model_kwargs, first=True)
        search = BeamSearch(
            model,
            method,
            cache,
            kwargs,
            out.logits[:, -1].float(),
            self.logits_processor,
            self.stopping_criteria,
            config,
        )
        results = [search.run(b, input_ids[b]) for b in range(input_ids.shape[0])]
        method.last_rollbacks = [r.rollbacks for r in results]
        method.last_fallbacks = [r.fallbacks for r in results]
        width = max(len(r.sequence) for r in results)
        sequences = input_ids.new_full((len(results), width), int(search.fill))
        for i, r in enumerate(results):
            sequences[i, : len(r.sequence)] = r.sequence
        if config.return_dict_in_generate:
            scores = torch.stack([r.score for r in results]) if config.output_scores else None
            return compat.beam_output(sequences, scores)
        return sequences


@dataclass
class Beams:
    """transformers' beam-search bookkeeping for one image (batch dimension 1), under its own names."""

    running_sequences: torch.Tensor  # (1, N, max_length)
    running_beam_scores: torch.Tensor  # (1, N)
    running_beam_indices: torch.Tensor  # (1, N, max_new): the parent slot chosen at each step
    sequences: torch.Tensor  # finished hypotheses
    beam_scores: torch.Tensor
    beam_indices: torch.Tensor
    is_sent_finished: torch.Tensor
    unsatisfied: torch.Tensor  # is_early_stop_heuristic_unsatisfied, (1, 1)
    cur_len: int

    @classmethod
    def start(cls, prompt_ids, num_beams, max_length, fill):
        p, device = prompt_ids.shape[0], prompt_ids.device
        running = torch.full((1, num_beams, max_length), int(fill), dtype=torch.long, device=device)
        running[:, :, :p] = prompt_ids
        scores = torch.zeros(1, num_beams, device=device)
        scores[:, 1:] = -1e9
        indices = torch.full((1, num_beams, max_length - p), -1, dtype=torch.int32, device=device)
        return cls(
            running,
            scores,
            indices,
            running.clone(),
            torch.full_like(scores, -1e9),
            indices.clone(),
            torch.zeros(1, num_beams, dtype=torch.bool, device=device),
            torch.ones(1, 1, dtype=torch.bool, device=device),
            p,
        )

    def clone(self) -> Beams:
        return replace(self, **{f.name: getattr(self, f.name).clone() for f in fields(self) if f.name != "cur_len"})


@dataclass
class Snapshot:
    beams: Beams
    history: torch.Tensor
    states: dict


@dataclass
class Result:
    sequence: torch.Tensor
    score: torch.Tensor
    rollbacks: list  # (at step, back to position)
    fallbacks: int  # steps that fed a non-candidate continuation (some beam's candidates were all excluded)


class BeamSearch:
    def __init__(self, model, method, cache, kwargs, first_logits, logits_processor, stopping_criteria, config):
        self.model, self.m, self.cache = model, method, cache
        self.batch = model._neverfade_engine.batch  # the Batch the prefill started, kept for this cache
        self.processor, self.stopping = logits_processor, stopping_criteria
        self.prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.prompt_states = self.batch.snapshot(leave_out=method.name)
        self.prompt_mask = self.batch.image_mask
        self.prompt_len = self.prompt_mask.shape[1]
        self.kwargs = compat.without_cache(kwargs)
        self.first_logits = first_logits
        self.vocab = first_logits.shape[-1]
        if method.candidates > self.vocab:
            raise ParameterError(f"opera: {method.candidates} candidates for a vocabulary of {self.vocab}")
        self.max_length = config.max_length
        self.length_penalty, self.early_stopping = config.length_penalty, config.early_stopping
        pad, eos = compat.pad_token(config), compat.eos_tokens(config)
        self.fill = pad or eos[0] if eos is not None else -1  # transformers' fill value, precedence included
        n = method.num_beams
        self.beams_to_keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * n
        self.top_num_beam_mask = torch.arange(self.beams_to_keep, device=first_logits.device) < n

    # ---- one image ----
    def run(self, b: int, prompt_ids: torch.Tensor) -> Result:
        m, n, c, p_len = self.m, self.m.num_beams, self.m.candidates, self.prompt_len
        max_new = self.max_length - p_len
        self.b = b
        self.image_row = self.prompt_mask[b : b + 1]
        index = torch.tensor([b], device=prompt_ids.device)
        self.image_kwargs = {k: _rows(k, v, index) if k in SEQUENCE_KEYS else v for k, v in self.kwargs.items()}
        zeros = torch.zeros(n, dtype=torch.long, device=prompt_ids.device)
        for layer, (k, v) in zip(self.cache.layers, self.prompt_kv):
            layer.keys, layer.values = k[b : b + 1].expand(n, -1, -1, -1), v[b : b + 1].expand(n, -1, -1, -1)
        self.set_states({name: s.select(index) for name, s in self.prompt_states.items()}, zeros)
        self.stash = [
            (k.new_empty(n, k.shape[1], max_new, k.shape[3]), v.new_empty(n, v.shape[1], max_new, v.shape[3]))
            for k, v in self.prompt_kv
        ]
        beams = Beams.start(prompt_ids, n, self.max_length, self.fill)
        history = torch.zeros(n, max_new, dtype=torch.float64, device=prompt_ids.device)
        logits = self.first_logits[b : b + 1].expand(n, -1)
        snaps, locations, rollbacks, fallbacks = [], [], [], 0
        self.rollbacks_at, self.rejected = [0] * (max_new + 1), {}
        t = 0
        while True:
            del snaps[t:]
            snaps.append(Snapshot(beams.clone(), history.clone(), self.batch.snapshot(leave_out=m.name)))
            cand_logits, cands = logits.topk(c, dim=-1)  # (N, C)
            self.gather(torch.arange(n, device=cands.device).repeat_interleave(c))
            next_logits, rows = self.forward(cands.reshape(-1), t)
            phi, loc = m.penalties(history.repeat_interleave(c, 0)[:, :t], rows, self.batch.image_mask)
            locations.append(mode(loc.view(n, c)))
            back_to = self.rollback_target(locations)
            if back_to is not None:
                rollbacks.append((t, back_to))
                t = back_to
                beams, history, logits = self.roll_back(t, snaps, locations)
                scores = torch.log_softmax(logits, dim=-1).view(-1).index_fill(0, self.rejected[t], float("-inf"))
                parents, tokens, done = self.advance(beams, scores.view(n, -1))
                if done:
                    break
                self.gather(parents)
                logits, row = self.forward(tokens, t)
            else:
                penalised = torch.log_softmax(cand_logits.double() - m.penalty * phi.view(n, c), dim=-1)
                scores = torch.full_like(logits, float("-inf")).scatter(1, cands, penalised.float())
                parents, tokens, done = self.advance(beams, scores)
                if done:
                    break
                match = cands[parents] == tokens[:, None]
                if bool(match.any(1).all()):
                    chosen = parents * c + match.float().argmax(1)
                    self.gather(chosen)
                    logits, row = next_logits[chosen], rows[chosen]
                else:  # a continuation scored -inf survived (too few finite ones): feed its token from step t
                    fallbacks += 1
                    self.gather(parents * c)
                    self.truncate(p_len + t)
                    self.set_states(snaps[t].states, parents)
                    logits, row = self.forward(tokens, t)
            history = history[parents]
            history[:, : t + 1] += m.column_logs(row, p_len)
            for layer, (sk, sv) in zip(self.cache.layers, self.stash):
                sk[:, :, t], sv[:, :, t] = layer.keys[:, :, -1], layer.values[:, :, -1]
            t += 1
        length = p_len + int((beams.beam_indices[0, 0] + 1).bool().sum())
        return Result(beams.sequences[0, 0, :length], beams.beam_scores[0, 0], rollbacks, fallbacks)

    def advance(self, beams: Beams, scores: torch.Tensor):
        """transformers' beam-search step on (N, V) token scores (before logits processors); updates `beams`.
        Returns each new beam's parent slot and token, and whether the search is over."""
        model, n, p_len, cur = self.model, self.m.num_beams, self.prompt_len, beams.cur_len
        common = dict(
            num_beams=n,
            decoder_prompt_len=p_len,
            early_stopping=self.early_stopping,
            length_penalty=self.length_penalty,
            max_length=self.max_length,
            batch_size=1,
            vocab_size=scores.shape[-1],
            do_sample=False,
            beams_to_keep=self.beams_to_keep,
            top_num_beam_mask=self.top_num_beam_mask,
        )
        scores = self.processor(beams.running_sequences[0, :, :cur], scores)
        accumulated = (scores + beams.running_beam_scores.view(n, 1)).view(1, -1)

        def call(helper, **arguments):
            return compat.beam_helper(model, helper, common, **arguments)

        topk_scores, topk_sequences, topk_indices = call(
            "_get_top_k_continuations",
            accumulated_log_probs=accumulated,
            cur_len=cur,
            running_sequences=beams.running_sequences,
            running_beam_indices=beams.running_beam_indices,
        )
        hits = self.stopping(topk_sequences[0, :, : cur + 1], None).view(1, -1)
        beams.running_sequences, beams.running_beam_scores, beams.running_beam_indices = call(
            "_get_running_beams_for_next_iteration",
            topk_log_probs=topk_scores,
            topk_running_sequences=topk_sequences,
            topk_running_beam_indices=topk_indices,
            next_token_hits_stopping_criteria=hits,
        )
        beams.sequences, beams.beam_scores, beams.beam_indices, beams.is_sent_finished = call(
            "_update_finished_beams",
            sequences=beams.sequences,
            topk_running_sequences=topk_sequences,
            beam_scores=beams.beam_scores,
            topk_log_probs=topk_scores,
            beam_indices=beams.beam_indices,
            topk_running_beam_indices=topk_indices,
            is_early_stop_heuristic_unsatisfied=beams.unsatisfied,
            is_sent_finished=beams.is_sent_finished,
            next_token_hits_stopping_criteria=hits,
            cur_len=cur,
        )
        parents = beams.running_beam_indices[0, :, cur - p_len].long()
        tokens = beams.running_sequences[0, :, cur]
        beams.cur_len = cur + 1
        beams.unsatisfied = call(
            "_check_early_stop_heuristic",
            is_early_stop_heuristic_unsatisfied=beams.unsatisfied,
            running_beam_scores=beams.running_beam_scores,
            beam_scores=beams.beam_scores,
            is_sent_finished=beams.is_sent_finished,
            cur_len=cur + 1,
        )
        done = not bool(
            call(
                "_beam_search_has_unfinished_sequences",
                is_early_stop_heuristic_unsatisfied=beams.unsatisfied,
                is_sent_finished=beams.is_sent_finished,
                next_token_hits_stopping_criteria=hits,
            )
        )
        return parents, tokens, done

    def rollback_target(self, locations):
        """The response position to roll back to, or None (definition step 6)."""
        m = self.m
        consensus = int(mode(locations[-1]))
        if consensus < m.early:
            return None
        if not bool(((torch.stack(locations) == consensus).sum(0) > m.threshold).all()):
            return None
        target = consensus + 1
        if self.rollbacks_at[target] >= m.candidates:
            target = consensus
            if self.rollbacks_at[target] >= m.candidates:
                return None
        self.rollbacks_at[target] += 1
        return target

    def roll_back(self, p, snaps, locations):
        """Return to the start of step p: the rejected pairs, the beams, their caches, states and logits."""
        v, p_len, n = self.vocab, self.prompt_len, self.m.num_beams
        chosen = snaps[p + 1].beams  # the beams step p made
        pairs = chosen.running_beam_indices[0, :, p].long() * v + chosen.running_sequences[0, :, p_len + p]
        self.rejected = {q: r for q, r in self.rejected.items() if q <= p}
        self.rejected[p] = torch.cat([self.rejected.get(p, pairs[:0]), pairs])
        del locations[p + 1 :]
        beams, history = snaps[p].beams.clone(), snaps[p].history.clone()
        lineage = beams.running_beam_indices[0, :, :p].long()  # (N, p): each beam's parent slot at steps 0..p-1
        steps = torch.arange(p - 1, device=lineage.device)
        b = self.b
        for layer, (k, val), (sk, sv) in zip(self.cache.layers, self.prompt_kv, self.stash):
            # the entry of response position s < p - 1 is the one the beam's ancestor at state s + 1 added
            layer.keys = torch.cat(
                [k[b : b + 1].expand(n, -1, -1, -1), sk[lineage[:, 1:], :, steps].permute(0, 2, 1, 3)], dim=2
            )
            layer.values = torch.cat(
                [val[b : b + 1].expand(n, -1, -1, -1), sv[lineage[:, 1:], :, steps].permute(0, 2, 1, 3)], dim=2
            )
        self.set_states(snaps[p - 1].states, lineage[:, p - 1])
        logits, _ = self.forward(beams.running_sequences[0, :, p_len + p - 1], p - 1)
        return beams, history, logits

    # ---- the cache, the engine's Batch and the kwargs, kept row for row ----
    def forward(self, tokens: torch.Tensor, position: int):
        """Feed one token per row at response position `position`; returns (R, V) logits and the (R, T) row."""
        self.batch.step = position  # the engine's pre-hook advances both by one
        self.batch.query_index.fill_(self.batch.prompt_len - 1 + position)
        kwargs = dict(self.image_kwargs)
        if position:
            kwargs = compat.update_model_kwargs(self.model, {}, kwargs, num_new_tokens=position)
        rows = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        kwargs = {k: _rows(k, v, rows) if k in SEQUENCE_KEYS else v for k, v in kwargs.items()}
        inputs = self.model.prepare_inputs_for_generation(
            tokens[:, None], next_sequence_length=1, **compat.with_cache(kwargs, self.cache)
        )
        out = self.model(**inputs, return_dict=True)
        return out.logits[:, -1].float(), self.batch.state(self.m).row

    def gather(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)
        self.set_states(self.batch.sequence_states(leave_out=self.m.name), index)

    def truncate(self, length: int) -> None:
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

    def set_states(self, states: dict, index: torch.Tensor) -> None:
        """The other methods' states of `states` (a snapshot), row i taken from row index[i]."""
        self.batch.restore(states, index)
        self.batch.image_mask = self.image_row.expand(index.shape[0], -1)


def mode(x: torch.Tensor) -> torch.Tensor:
    """The most frequent value along the last dim; the smallest of equally frequent ones."""
    counts = (x[..., :, None] == x[..., None, :]).sum(-1)
    top = counts == counts.max(-1, keepdim=True).values
    return torch.where(top, x, x.max() + 1).min(-1).values


def _rows(key: str, value, index: torch.Tensor):
    if not isinstance(value, torch.Tensor):
        return value
    return value.index_select(1 if key == "position_ids" and value.dim() == 3 else 0, index)
