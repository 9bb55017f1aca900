"""PAI, "Paying more attention to image" (Liu et al., ECCV 2024): boost the image tokens' attention logits.

As in PAI's code, the newest query's pre-softmax logits to image keys become z + alpha * |z| in layers [start, end],
from the prompt's last position on; the softmax then renormalises."""

from __future__ import annotations

import torch

from neverfade.engine.batch import Batch
from neverfade.methods.base import Method, Param, end_param, per_key, register, start_param


@register
class PAI(Method):
    name = "pai"
    summary = "Boost image attention logits, z <- z + alpha |z| (PAI)."
    params = (
        Param("alpha", 0.2, "logit boost for image keys: z <- z + alpha * |z|", "paper: PAI's README",
              minimum=0.0),
        start_param(2, "paper: PAI's code acts in layers [2, N)"),
        end_param("paper: PAI's code acts in layers [2, N)"),
    )

    def bind(self, info):
        super().bind(info)
        self.check_layer_range(info)

    def decode_layers(self, num_layers):
        return self.layer_range()

    def prefill_layers(self, num_layers):
        return self.layer_range()

    def begin_batch(self, batch: Batch) -> None:
        batch.state(self).boost = batch.image_mask.float() * self.alpha

    def edit_scores(self, layer: int, scores: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not self.start <= layer <= self.end:
            return scores
        boost = per_key(batch.state(self).boost, scores.shape[-1], fill=0.0)
        return scores + boost.to(scores.dtype) * scores.abs()
