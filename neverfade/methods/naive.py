"""Naive attention scaling: every image token's attention weight times a constant (the SPARC paper's eq. 3 foil).

Applied without renormalisation from the prompt's last position on, in layers [start, end]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neverfade.engine.batch import Batch, SequenceState
from neverfade.methods.base import Flags, LayerRangeMethod, Param, end_param, per_key, register, start_param


@dataclass
class NaiveState(SequenceState):
    scale: torch.Tensor  # (B, P) alpha on image keys, 1 elsewhere


@register
class Naive(LayerRangeMethod):
    name = "naive"
    summary = "Scale all image attention by a constant (no selection, no progression)."
    params = (
        Param(
            "alpha",
            1.2,
            "multiplier on every image token's attention weight",
            "our choice: the SPARC paper tunes its naive baseline without stating the value",
            minimum=0.0,
        ),
        start_param(2, "our choice: PAI's layers [2, N)"),
        end_param("our choice: PAI's layers [2, N)"),
    )

    State = NaiveState

    def flags(self):
        return Flags(capturable=True)

    def new_state(self, batch: Batch) -> NaiveState:
        return NaiveState(torch.where(batch.image_mask, self.alpha, 1.0).float())

    def key_scale(self, batch: Batch, keys: int) -> torch.Tensor:
        return per_key(batch.state(self).scale, keys)
