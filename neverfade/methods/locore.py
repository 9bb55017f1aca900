"""LocoRE, Local Coherence Reinforcement (Alg. 2 of "LVLMs-Saliency"): reinforce attention to recent outputs.

At each decode step the newest token's attention weights to the `window` generated tokens before it (its own key
excluded; prompt and image keys untouched) are multiplied by 1 + beta, without renormalisation, in layers
[start, end] (the paper: every layer and head)."""

from __future__ import annotations

import torch

from neverfade.engine.batch import Batch
from neverfade.methods.base import LayerRangeMethod, Param, end_param, register, start_param


@register
class LocoRE(LayerRangeMethod):
    name = "locore"
    summary = "Reinforce attention to the last few generated tokens (LocoRE)."
    on_prefill = False  # nothing has been generated at the prompt
    params = (
        Param("beta", None, "gain: weights to recent outputs are multiplied by 1 + beta",
              "paper per family: LLaVA-1.5 0.15, Qwen2-VL 0.20 (LLaVA-NeXT, Qwen2.5-VL: unvalidated)", minimum=0.0),
        Param("window", 8, "how many of the most recent generated tokens are reinforced",
              "our choice: the paper leaves w_s open; 8 tokens is about one phrase", type=int, minimum=1),
        start_param(0, "paper: every layer"),
        end_param("paper: every layer"),
    )

    capturable = True

    def reweight(self, layer: int, weights: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not self.acts_in(layer):
            return weights
        keys = weights.shape[-1]
        if getattr(self, "_gain_for", None) != (batch, batch.step, keys):  # one gain per step, shared by every layer
            index = torch.arange(keys, device=weights.device)
            query = batch.query_index  # on the device, so that a replayed step moves the window
            recent = (index >= batch.prompt_len) & (index >= query - self.window) & (index < query)
            self._gain = torch.where(recent, 1.0 + self.beta, 1.0).to(weights.dtype)
            self._gain_for = (batch, batch.step, keys)
        return weights * self._gain
