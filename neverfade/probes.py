"""Observers the engine runs beside the methods; they record, they change nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from neverfade.engine.batch import Batch
from neverfade.engine.contract import Method, Param
from neverfade.errors import ParameterError


@dataclass
class Records:
    rows: list[torch.Tensor] = field(
        default_factory=list
    )  # one record per step: the prefill's, then each decode step's


class LayerProbe(Method):
    """An observer of one layer's attention row (the newest query's), at the prefill's last position and at every
    decode step. It keeps the batches it saw since the last `take`; the first is the main branch of a two-branch
    loop (VCD, PAI's guidance)."""

    State = Records
    params = (
        Param(
            "layer",
            None,
            "layer to read, 0-indexed",
            "our choice: SPARC's selection layer for the family",
            type=int,
            minimum=0,
        ),
    )

    def bind(self, info):
        if self.layer is None:
            self.layer = info.default("sparc", "layer")
        super().bind(info)
        if self.layer >= info.num_layers:
            raise ParameterError(f"attention layer {self.layer} is beyond the model's depth ({info.num_layers})")
        self.batches: list[Batch] = []

    def decode_layers(self, num_layers):
        return {self.layer}

    def prefill_layers(self, num_layers):
        return {self.layer}

    def new_state(self, batch: Batch) -> Records:
        self.batches.append(batch)
        return Records()

    def observe(self, layer: int, probs: torch.Tensor, batch: Batch) -> None:
        if layer == self.layer:
            prompt_attention = probs.mean(dim=(1, 2))[:, : batch.prompt_len]
            batch.state(self).rows.append(self.record(prompt_attention, batch))

    def record(self, prompt_attention: torch.Tensor, batch: Batch) -> torch.Tensor:
        """What to keep of one step: `prompt_attention` is (B, P), the head-averaged attention to the prompt."""
        raise NotImplementedError

    def take_batch(self) -> tuple[Batch, torch.Tensor] | None:
        """The first batch since the last take, with its records stacked as (B, steps, ...); None if none ran."""
        if not self.batches:
            return None
        batch, self.batches = self.batches[0], []
        rows = batch.state(self).rows
        return (batch, torch.stack(rows, dim=1)) if rows else None


class ImageAttentionShare(LayerProbe):
    """At one layer, the newest query's attention (averaged over heads) summed over the image tokens, per step: the
    SPARC paper's "visual attention" (its Fig. 5 and 7a). It is read from the softmax, before any reweighting, so a
    method that scales value vectors (SPARC) shows only through what it does to later steps."""

    name = "image_attention_share"
    summary = "Record the share of attention on image tokens at each step."

    def record(self, prompt_attention, batch):
        return (prompt_attention * batch.image_mask).sum(-1)

    def take(self) -> torch.Tensor | None:
        """(B, steps) shares of the first batch since the last take."""
        taken = self.take_batch()
        return taken[1] if taken else None


class ImageAttentionMap(LayerProbe):
    """At one layer, the newest query's attention (averaged over heads) to every prompt position, zero off the image,
    per step: `take_batch()` gives (B, steps, P). Summed over the image it is ImageAttentionShare's share; over the
    image's token grid it is the map whose consecutive Wasserstein distances the SPARC paper plots (its Fig. 3)."""

    name = "image_attention_map"
    summary = "Record the attention to each image token at each step."

    def record(self, prompt_attention, batch):
        return prompt_attention * batch.image_mask


class SparcSelections(LayerProbe):
    """SPARC's selection at each step: `take_batch()` gives (B, steps, P) bool, the prompt positions selected at the
    prefill (none) and at each decode step (applied from the step after). Read from SPARC's state after its
    `observe`; it forces the eager decode path, as every probe does."""

    name = "sparc_selections"
    summary = "Record the image tokens SPARC selects at each step."
    params = ()

    def __init__(self, sparc: Method):
        super().__init__()
        self.sparc = sparc

    def bind(self, info):
        self.layer = self.sparc.layer  # bound before the probes
        super().bind(info)

    def observe(self, layer, probs, batch):
        if layer == self.layer:
            batch.state(self).rows.append(self.sparc.selected(batch))
