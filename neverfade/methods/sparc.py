"""SPARC: Selective Progressive Attention ReCalibration (Jung et al., 2025), exactly as METHODS.md defines it.

At the selection layer L, each step compares the head-averaged attention of the newest query to every image token
with its exponential moving average; tokens whose relative rise `(a - ema) / ema` reaches tau are selected, and from
the next step on every calibrated layer weights them by alpha once more (alpha ** times selected). The weighting is
applied to the attention row (equal to scaling the value vectors, as the authors do in the cache).
"""

from __future__ import annotations

import torch

from neverfade.engine.batch import Batch
from neverfade.methods.base import Method, Param, end_param, per_key, register, start_param


@register
class SPARC(Method):
    name = "sparc"
    summary = "Reinforce, step by step, the image tokens whose attention rises above its recent trend."
    params = (
        Param("alpha", 1.1, "scale applied to a selected token's attention, compounding per selection",
              "paper (all models)", minimum=0.0),
        Param("beta", 0.1, "EMA factor: ema <- (1 - beta) * current + beta * ema; 0 compares with the last step only",
              "paper (all models)", minimum=0.0, maximum=1.0),
        Param("tau", None, "selection threshold on the relative rise (a - ema) / ema",
              "paper per family: LLaVA-1.5 1.5, LLaVA-NeXT 4.0, Qwen2-VL 3.0 (Qwen2.5-VL: Qwen2-VL's, unvalidated)",
              minimum=0.0),
        Param("layer", None, "selection layer, 0-indexed",
              "paper per family: 20 of 32 (LLaVA-1.5, LLaVA-NeXT), 18 of 28 (Qwen2-VL); other depths: same "
              "relative depth", type=int, minimum=0),
        start_param(0, "paper: all layers are calibrated"),
        end_param("paper: all layers are calibrated"),
    )
    keep_selections = False  # set True to record each step's selection (analysis; the decode step is not captured)

    @property
    def capturable(self) -> bool:
        return not self.keep_selections

    def bind(self, info):
        super().bind(info)
        self.check_layer_range(info, "layer")

    def decode_layers(self, num_layers):
        return self.layer_range() | {self.layer}

    def prefill_layers(self, num_layers):
        return {self.layer}

    def begin_batch(self, batch: Batch) -> None:
        shape, device = batch.image_mask.shape, batch.image_mask.device
        state = batch.state(self)
        state.ema = torch.zeros(shape, dtype=torch.float32, device=device)
        state.weight = torch.ones(shape, dtype=torch.float32, device=device)  # alpha ** times selected
        state.pending = torch.zeros(shape, dtype=torch.bool, device=device)  # this step's selection, applied next
        if self.keep_selections:
            state.selections = []

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
            if self.keep_selections:
                state.selections.append(selected)
            state.ema.mul_(self.beta).add_(current, alpha=1.0 - self.beta)
        else:
            state.ema.copy_(current)

    def selections(self, batch: Batch) -> list[torch.Tensor]:
        """With `keep_selections`: per decode step, the (B, P) bool mask of prompt positions selected at that step."""
        return getattr(batch.state(self), "selections", [])

    def acts_in(self, layer: int) -> bool:
        return self.start <= layer <= self.end

    def key_scale(self, batch: Batch, keys: int) -> torch.Tensor:
        return per_key(batch.state(self).weight, keys)
