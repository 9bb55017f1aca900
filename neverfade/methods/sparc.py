"""SPARC: Selective Progressive Attention ReCalibration (Jung et al., 2025), exactly as METHODS.md defines it.

At the selection layer L, each step compares the head-averaged attention of the newest query to every image token
with its exponential moving average; tokens whose relative rise `(a - ema) / ema` reaches tau are selected, and from
the next step on every calibrated layer weights them by alpha once more (alpha ** times selected). The weighting is
applied to the attention row (equal to scaling the value vectors, as the authors do in the cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neverfade.engine.batch import Batch, SequenceState
from neverfade.methods.base import Flags, Method, Param, check_layer_range, end_param, per_key, register, start_param


@dataclass
class SPARCState(SequenceState):
    ema: torch.Tensor  # (B, P) float32: the EMA of the selection layer's head-averaged attention, zero off the image
    weight: torch.Tensor  # (B, P) float32: alpha ** times selected
    pending: torch.Tensor  # (B, P) bool: this step's selection, applied from the next step on


@register
class SPARC(Method):
    name = "sparc"
    summary = "Reinforce, step by step, the image tokens whose attention rises above its recent trend."
    params = (
        Param(
            "alpha",
            1.1,
            "scale applied to a selected token's attention, compounding per selection",
            "paper (all models)",
            minimum=0.0,
        ),
        Param(
            "beta",
            0.1,
            "EMA factor: ema <- (1 - beta) * current + beta * ema; 0 compares with the last step only",
            "paper (all models)",
            minimum=0.0,
            maximum=1.0,
        ),
        Param(
            "tau",
            None,
            "selection threshold on the relative rise (a - ema) / ema",
            "paper per family: LLaVA-1.5 1.5, LLaVA-NeXT 4.0, Qwen2-VL 3.0 (Qwen2.5-VL: Qwen2-VL's, unvalidated)",
            minimum=0.0,
        ),
        Param(
            "layer",
            None,
            "selection layer, 0-indexed",
            "paper per family: 20 of 32 (LLaVA-1.5, LLaVA-NeXT), 18 of 28 (Qwen2-VL); other depths: same "
            "relative depth",
            type=int,
            minimum=0,
        ),
        start_param(0, "paper: all layers are calibrated"),
        end_param("paper: all layers are calibrated"),
    )
    State = SPARCState

    def flags(self):
        return Flags(capturable=True)

    def bind(self, info):
        super().bind(info)
        check_layer_range(self, info, "layer")

    def decode_layers(self, num_layers):
        return set(range(self.start, self.end + 1)) | {self.layer}

    def prefill_layers(self, num_layers):
        return {self.layer}

    def new_state(self, batch: Batch) -> SPARCState:
        shape, device = batch.image_mask.shape, batch.image_mask.device
        return SPARCState(
            ema=torch.zeros(shape, dtype=torch.float32, device=device),
            weight=torch.ones(shape, dtype=torch.float32, device=device),
            pending=torch.zeros(shape, dtype=torch.bool, device=device),
        )

    def begin_step(self, batch: Batch) -> None:
        state = batch.state(self)
        state.weight.mul_(torch.where(state.pending, self.alpha, 1.0))
        state.pending.fill_(False)

    def observe(self, layer: int, probs: torch.Tensor, batch: Batch) -> None:
        if layer != self.layer:
            return
        image, state = batch.image_mask, batch.state(self)
        current = probs.mean(dim=(1, 2))[:, : batch.prompt_len] * image  # (B, P), zero off the image
        if batch.step > 0:
            rise = (current - state.ema) / torch.where(image, state.ema, 1.0)
            selected = image & (rise >= self.tau)
            state.pending.copy_(selected)
            state.ema.mul_(self.beta).add_(current, alpha=1.0 - self.beta)
        else:
            state.ema.copy_(current)

    def acts_in(self, layer: int) -> bool:
        return self.start <= layer <= self.end

    def key_scale(self, batch: Batch, keys: int) -> torch.Tensor:
        return per_key(batch.state(self).weight, keys)
