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

    def reweight(self, layer: int, weights: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not self.acts_in(layer) or batch.step < 2:
            return weights
        key = (batch.prompt_len, batch.step, weights.shape[-1], weights.dtype, weights.device)
        if getattr(self, "_gain_key", None) != key:  # one gain per step, shared by every layer
            query = batch.prompt_len + batch.step - 1  # cache index of the token fed at this step
            first = max(batch.prompt_len, query - self.window)
            self._gain = torch.ones(weights.shape[-1], dtype=weights.dtype, device=weights.device)
            self._gain[first:query] = 1.0 + self.beta
            self._gain_key = key
        return weights * self._gain
