"""OPERA (Huang et al., CVPR 2024): beam search with an over-trust penalty and retrospection (roll-back).

The definition we run, from the paper and the authors' code (shikiw/OPERA, `opera_beam_search` in their
transformers-4.29.2 `generation/utils.py`). P is the prompt length (the response starts at cache index P), t the
number of tokens generated so far, N beams, C candidates, sigma `scale`, alpha `penalty`, r `threshold`,
w `window`, e `early`.

1. Candidates: each beam's C tokens of highest next-token logit l.
2. Attention: each candidate is fed at position P + t; at the last layer its query's attention over all P + t + 1
   keys is reduced by the max over heads and divided by its sum: a_c. A beam's earlier rows a_i (i < t: the row of
   its own response token i) are kept along the beam's lineage.
3. Column scores over the local window of response positions j in [max(0, t + 1 - w), t]:
       s_j(c) = 1e-7 * prod_{i=j}^{t-1} (sigma a_i[P + j]) * (sigma a_c[P + j])
   (computed as sums of logs in float64).
4. Penalty: for the first e tokens (t + 1 <= e) an image bonus, phi(c) = -sum over image keys k of a_c[k];
   afterwards phi(c) = min(max_j s_j(c), 65504). Location loc(c) = argmax_j s_j(c) (the first of equal maxima).
5. Token scores: log_softmax over the candidates of l_c - alpha phi(c); every other token -inf. Then generate's
   logits processors, then transformers' own beam bookkeeping (accumulated log-probs, length penalty, early stopping,
   end-of-sequence handling), exactly as `generate(num_beams=N)` does. (If a logits processor excludes every
   candidate of some beams and too few finite continuations remain, that bookkeeping keeps a continuation scored
   -inf as a running beam, as it does in generate; its token is then fed on its own: `last_fallbacks` counts it.)
6. Roll-back: each step records, per beam slot n, m_n = the mode of loc over its candidates (mode: most frequent,
   the smallest of equally frequent), and takes the consensus L = the mode of the m_n. If L >= e and, for every
   slot n, m_n equalled L at more than r of the steps so far, the search rolls back to p = L + 1 (if it already
   rolled back C times to p: p = L; if that too, no roll-back). Beams, scores and finished hypotheses return to
   their state before step p; the (beam, token) pairs chosen at step p join the rejected set of p (rejected sets of
   later positions are dropped); the location history keeps steps 0..p. Step p is redone without penalty or
   candidates: full-vocabulary log_softmax of l, rejected pairs at -inf, then processors and bookkeeping.

Where the authors' code differs, and what we chose:
- Non-candidate tokens: the code fills them with logit -999 before its log_softmax, so a beam whose candidates are
  all penalised below -999 continues with a non-candidate token. We follow the paper (softmax over the candidate
  set only): non-candidates are -inf.
- Precision: the code stores s_j in float16, so scores below ~6e-8 become 0 (ties at 0 go to the first column) and
  scores above 65504 become inf (and then the -999 fillers win); with a float16 model the product itself saturates
  before the 1e-7. We compute in float64 logs and cap the penalty at 65504, float16's largest value; capped
  candidates keep their order by logit.
- Window: the code's local window is every response position (its window_size, 512, only bounds its history);
  with at most 512 new tokens the two agree. We apply `window` as the paper's local window.
- Roll-back bookkeeping: the code demotes rejected tokens to the lowest logit, we exclude them; the code clears
  the wrong entries of its rejected lists, we drop the rejected sets of positions after p as intended; the code
  rebuilds the KV cache by a new prefill, we keep every step's keys and values and reassemble the beams' caches
  exactly. The location history is per beam slot, not per lineage, as in the code.
- `early` (10) is hard-coded in the code (image bonus for the first 10 tokens; no roll-back to a location < 10).
- `threshold` must be >= 2: with more than r >= 2 matches the location lies at least two steps back, so the
  rolled-back step exists (the code's index arithmetic also assumes it).
- Batches: the code runs one image (its modes and roll-backs pool the whole batch). Here each image's beam search
  runs on its own, one image after another after one joint prefill, so a caption does not depend on its batch.
- Other attention methods (SPARC, PAI, naive, LocoRE) compose: OPERA observes the probabilities after pre-softmax
  edits and before reweightings, and their per-sequence state follows the beams, candidates and roll-backs.
  Methods whose state is not per-sequence tensors are refused at run time.
- Beam bookkeeping is transformers 5's (the code used 4.29's BeamSearchScorer); beam search needs greedy
  generate settings: OPERA's beams come from `num_beams` here, not from generate's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from neverfade.engine.batch import Batch
from neverfade.methods.base import Flags, Method, Param, ParameterError, register

SCORE_FACTOR = 1e-7  # the authors' constant in front of the column product
PENALTY_CAP = 65504.0  # float16's largest value, where the authors' scores saturate


@dataclass
class OperaState:
    row: torch.Tensor | None = None  # (B, T): the last layer's newest attention row, max over heads


@register
class OPERA(Method):
    name = "opera"
    summary = "Beam search that penalises over-trust in summary tokens and rolls back (OPERA)."
    params = (
        Param("num_beams", 5, "beams per image", "paper", type=int, minimum=1),
        Param(
            "candidates",
            5,
            "candidate tokens per beam whose attention is scored",
            "paper: num_attn_candidates",
            type=int,
            minimum=1,
        ),
        Param(
            "scale",
            50.0,
            "sigma: attention weights are multiplied by this in the column product",
            "paper: scale_factor",
        ),
        Param(
            "penalty",
            1.0,
            "alpha: weight of the over-trust penalty on the candidates' logits",
            "paper: penalty_weights",
            minimum=0.0,
        ),
        Param(
            "threshold",
            15,
            "roll back once a location was every beam's summary location at more than this many steps",
            "paper",
            type=int,
            minimum=2,
        ),
        Param(
            "window",
            512,
            "local window: the last `window` response positions are scored",
            "paper: window_size",
            type=int,
            minimum=1,
        ),
        Param(
            "early",
            10,
            "the first `early` tokens get an image-attention bonus instead of the penalty, and "
            "locations among them never trigger a roll-back",
            "authors' code: hard-coded 10",
            type=int,
            minimum=1,
        ),
    )

    def __init__(self, **values):
        super().__init__(**values)
        if not self.scale > 0:
            raise ParameterError(f"scale must be > 0, got {self.scale}")

    State = OperaState

    def flags(self):
        return Flags(strategy="beam")

    def new_state(self, batch: Batch) -> OperaState:
        return OperaState()

    def bind(self, info):
        super().bind(info)
        self.last_layer = info.num_layers - 1
        self.last_rollbacks: list[list[tuple[int, int]]] = []  # per image of the last call: (at step, back to)
        self.last_fallbacks: list[int] = []  # per image: steps that fed a non-candidate (all candidates excluded)

    def decode_layers(self, num_layers):
        return {num_layers - 1}

    def observe(self, layer: int, probs: torch.Tensor, batch: Batch) -> None:
        if layer == self.last_layer:
            batch.state(self).row = probs.amax(dim=(1, 2))  # (B, T): max over heads

    # ---- the definition's arithmetic, shared by the decoding loop ----
    def column_logs(self, rows: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """log(sigma a) over the response keys: rows (R, T) head-max attention rows -> (R, T - prompt_len) float64."""
        a = rows.double()
        return torch.log(self.scale * a[:, prompt_len:] / a.sum(-1, keepdim=True))

    def penalties(self, history: torch.Tensor, rows: torch.Tensor, image_mask: torch.Tensor):
        """Penalty phi and location of each candidate. history (R, t) float64: per response column j < t, the sum
        over the beam's rows i in [j, t) of log(sigma a_i[P + j]); rows (R, P + t + 1); image_mask (R, P).
        Returns phi (R,) float64 and loc (R,) long."""
        prompt_len = image_mask.shape[1]
        t = rows.shape[1] - prompt_len - 1
        scores = math.log(SCORE_FACTOR) + self.column_logs(rows, prompt_len)
        scores[:, :t] += history
        scores[:, : max(0, t + 1 - self.window)] = float("-inf")
        location = scores.argmax(-1)
        if t + 1 <= self.early:
            a = rows.double()
            phi = -(a[:, :prompt_len] * image_mask).sum(-1) / a.sum(-1)
        else:
            phi = scores.gather(1, location[:, None]).squeeze(1).clamp(max=math.log(PENALTY_CAP)).exp()
        return phi, location
