"""LocoRE, Local Coherence Reinforcement (Alg. 2 of "LVLMs-Saliency"): reinforce attention to recent outputs.

At each decode step the newest token's attention weights to the `window` generated tokens before it (its own key
excluded; prompt and image keys untouched) are multiplied by 1 + beta, without renormalisation, in layers
[start, end] (the paper: every layer and head)."""

from __future__ import annotations

import torch

from neverfade.engine.batch import Batch
from neverfade.methods.base import Flags, LayerRangeMethod, Param, end_param, register, start_param


@register
class LocoRE(LayerRangeMethod):
    name = "locore"
    summary = "Reinforce attention to the last few generated tokens (LocoRE)."
    on_prefill = False  # nothing has been generated at the prompt
    params = (
        Param(
            "beta",
            None,
            "gain: weights to recent outputs are multiplied by 1 + beta",
            "paper per family: LLaVA-1.5 0.15, Qwen2-VL 0.20 (LLaVA-NeXT, Qwen2.5-VL: unvalidated)",
            minimum=0.0,
        ),
        Param(
            "window",
            8,
            "how many of the most recent generated tokens are reinforced",
            "our choice: the paper leaves w_s open; 8 tokens is about one phrase",
            type=int,
            minimum=1,
        ),
        start_param(0, "paper: every layer"),
        end_param("paper: every layer"),
    )

    def flags(self):
        return Flags(capturable=True)

    def key_scale(self, batch: Batch, keys: int) -> torch.Tensor:
        """1 + beta on the `window` generated keys before the newest; the window moves with the device-side
        query index, so a replayed step moves it too."""
        index = torch.arange(keys, device=batch.query_index.device)
        query = batch.query_index
        recent = (index >= batch.prompt_len) & (index >= query - self.window) & (index < query)
        return torch.where(recent, 1.0 + self.beta, 1.0)[None, :]
