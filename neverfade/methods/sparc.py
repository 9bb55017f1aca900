"""SPARC: Selective Progressive Attention ReCalibration (Jung et al., 2025), exactly as METHODS.md defines it.

At the selection layer L, each step compares the head-averaged attention of the newest query to every image token
with its exponential moving average; tokens whose relative rise `(a - ema) / ema` reaches tau are selected, and from
the next step on every calibrated layer weights them by alpha once more (alpha ** times selected). The weighting is
applied to the attention row (equal to scaling the value vectors, as the authors do in the cache).

The state is one float32 and one int16 per position of the batch's image span (its first to its last image token):
the EMA, and a count from which the weight follows (alpha ** count, the selection pending for the next step in the
count's lowest bit). That is 6 bytes per image token and sequence where a prompt's image tokens are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neverfade.engine.batch import Batch, SequenceState
from neverfade.methods.base import Flags, Method, Param, check_layer_range, end_param, register, start_param


@dataclass
class SPARCState(SequenceState):
    """SPARC's state over the batch's image span, prompt positions `offset` to `offset + S - 1` (the first to the last
    image token of any sequence; no position outside it is an image token, and its weight is 1)."""

    ema: torch.Tensor  # (B, S) float32: the EMA of the selection layer's head-averaged attention, zero off the image
    count: torch.Tensor  # (B, S) int16: 2 * the selections applied, + 1 for this step's selection (applied next step)
    alpha: float = 1.0  # the method's alpha: weight = alpha ** applied selections
    offset: int = 0  # the prompt position of the span's first column

    @property
    def weight(self) -> torch.Tensor:
        """(B, S) float32: alpha ** selections applied (compounding, paper eqs. 7-9)."""
        return torch.pow(self.alpha, self.count >> 1)

    @property
    def pending(self) -> torch.Tensor:
        """(B, S) bool: this step's selection, applied from the next step on."""
        return (self.count & 1).bool()


def image_span(image_mask: torch.Tensor) -> tuple[int, int]:
    """(first, last + 1) of the prompt positions that hold an image token in some sequence; (0, 0) if none. Reads
    the mask on the host: once per prompt, never in a decode step."""
    where = image_mask.any(0).nonzero().flatten().tolist()
    return (where[0], where[-1] + 1) if where else (0, 0)


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
        first, end = image_span(batch.image_mask)
        shape, device = (batch.size, end - first), batch.image_mask.device
        return SPARCState(
            ema=torch.zeros(shape, dtype=torch.float32, device=device),
            count=torch.zeros(shape, dtype=torch.int16, device=device),  # up to 16383 selections of one token
            alpha=self.alpha,
            offset=first,
        )

    def begin_step(self, batch: Batch) -> None:
        count = batch.state(self).count
        count.add_(count & 1)  # the pending selection is applied: 2a + 1 -> 2(a + 1), and none is pending

    def observes(self, layer: int) -> bool:
        return layer == self.layer  # the probabilities of every other layer are never computed

    def observe(self, layer: int, probs: torch.Tensor, batch: Batch) -> None:
        state = batch.state(self)
        span = slice(state.offset, state.offset + state.ema.shape[1])
        image = batch.image_mask[:, span]
        current = probs[..., span].mean(dim=(1, 2)) * image  # (B, S), zero off the image
        if batch.decoding:  # not `step`: an int read inside a compiled step would recompile it at every step
            rise = (current - state.ema) / torch.where(image, state.ema, 1.0)
            state.count.bitwise_or_(image & (rise >= self.tau))  # no selection is pending here (begin_step)
            state.ema.mul_(self.beta).add_(current, alpha=1.0 - self.beta)
        else:
            state.ema.copy_(current)

    def acts_in(self, layer: int) -> bool:
        return self.start <= layer <= self.end

    def key_scale(self, batch: Batch, keys: int) -> torch.Tensor:
        state = batch.state(self)
        weight = state.weight
        return torch.nn.functional.pad(weight, (state.offset, keys - state.offset - weight.shape[1]), value=1.0)

    def selected(self, batch: Batch) -> torch.Tensor:
        """(B, P) bool: the prompt positions selected at this step (applied from the next step on)."""
        state = batch.state(self)
        pending = state.pending
        return torch.nn.functional.pad(
            pending, (state.offset, batch.prompt_len - state.offset - pending.shape[1]), value=False
        )
