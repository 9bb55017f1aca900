"""SGRS, Saliency-Guided Rejection Sampling (Alg. 1 of "LVLMs-Saliency"): reject candidate tokens whose saliency
to the text so far is low.

Saliency of candidate c: the step's forward runs with gradients through the attention weights A of the target
layers (the newest query's row; the KV cache is constant); with L = cross-entropy of c at the last position,
S(l, h) = |A(l, h) * dL/dA(l, h)| is averaged over heads, the row is l2-normalised over all keys (the paper
normalises the head-sum matrix; with one row, the row), and S(c) is its mean over the target layers and over the
keys after the last image token up to the newest token (the paper's j >= Sys + Img, j < P: the instruction after
the image and the output so far). A is the weight after every other method's reweighting.

Each step: the top `k` candidates of the processed next-token distribution are tried, up to `tries` of them
(sampled from the renormalised candidates when sampling, in order of probability when greedy); the first with
S(c) >= alpha * mean S over the last `window` accepted tokens is taken; if none passes, the candidate of highest
saliency. The first token, with no history, is taken as generate would. The K saliencies come from one batched
backward (vmap over the K cotangents), falling back to K backward passes where vmap cannot run. The loop is
`decoding.rejection.RejectionLoop`; on the captured decode path (decode="auto" on CUDA), `StaticRejectionLoop`
replays each step's forward and saliency backward from CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from neverfade.engine.batch import Batch
from neverfade.methods.base import Flags, LayerRangeMethod, Param, end_param, register, start_param


@dataclass
class SGRSState:
    rows: list[torch.Tensor] = field(default_factory=list)  # this step's target-layer attention rows, with graphs


@register
class SGRS(LayerRangeMethod):
    name = "sgrs"
    summary = "Reject candidate tokens with low gradient saliency to the text so far (SGRS)."
    params = (
        Param("alpha", 0.6, "accept if saliency >= alpha * recent mean", "paper", minimum=0.0),
        Param("k", 5, "candidates per step (top-k)", "our choice: the paper leaves K open", type=int, minimum=1),
        Param(
            "tries",
            3,
            "candidates tried before falling back to the most salient",
            "our choice: the paper leaves R open",
            type=int,
            minimum=1,
        ),
        Param(
            "window",
            10,
            "accepted tokens whose mean saliency sets the threshold",
            "our choice: the paper leaves W open",
            type=int,
            minimum=1,
        ),
        start_param(None, "our choice: 'middle-to-deep' layers, from the middle layer (depth // 2)"),
        end_param("our choice: 'middle-to-deep' layers, to the last layer"),
    )

    def bind(self, info):
        if self.start is None:
            self.start = info.num_layers // 2
        super().bind(info)

    State = SGRSState

    def flags(self):
        return Flags(strategy="rejection", capturable=True)  # its loop's steps replay from CUDA graphs

    def new_state(self, batch: Batch) -> SGRSState:
        return SGRSState()

    def begin_step(self, batch: Batch) -> None:
        batch.state(self).rows = []

    def reweight(self, layer: int, weights: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.acts_in(layer) and torch.is_grad_enabled():
            if not weights.requires_grad:
                weights = weights.detach().requires_grad_(True)
            batch.state(self).rows.append(weights)
        return weights
