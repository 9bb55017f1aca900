"""Observers the engine runs beside the methods; they record, they change nothing."""

from __future__ import annotations

import torch

from neverfade.engine.batch import Batch
from neverfade.methods.base import Method, Param


class ImageAttentionShare(Method):
    """At one layer, the newest query's attention (averaged over heads) summed over the image tokens, per step: the
    SPARC paper's "visual attention" (its Fig. 5 and 7a). It is read from the softmax, before any reweighting, so a
    method that scales value vectors (SPARC) shows only through what it does to later steps."""

    name = "image_attention_share"
    summary = "Record the share of attention on image tokens at each step."
    params = (Param("layer", None, "layer to read, 0-indexed",
                    "our choice: SPARC's selection layer for the family", type=int, minimum=0),)

    def bind(self, info):
        if self.layer is None:
            self.layer = info.default("sparc", "layer")
        super().bind(info)
        if self.layer >= info.num_layers:
            from neverfade.methods.base import ParameterError

            raise ParameterError(f"attention layer {self.layer} is beyond the model's depth ({info.num_layers})")
        self.batches: list[Batch] = []

    def decode_layers(self, num_layers):
        return {self.layer}

    def prefill_layers(self, num_layers):
        return {self.layer}

    def begin_batch(self, batch: Batch) -> None:
        batch.state(self).shares = []
        self.batches.append(batch)

    def observe(self, layer: int, probs: torch.Tensor, batch: Batch) -> None:
        if layer == self.layer:
            share = (probs.mean(dim=(1, 2))[:, : batch.prompt_len] * batch.image_mask).sum(-1)
            batch.state(self).shares.append(share)

    def take(self) -> torch.Tensor | None:
        """(B, steps) shares of the first batch since the last take: the main branch of a two-branch loop."""
        if not self.batches:
            return None
        shares = self.batches[0].state(self).shares
        self.batches = []
        return torch.stack(shares, dim=1) if shares else None
