"""PAI, "Paying more attention to image" (Liu et al., ECCV 2024): boost the image tokens' attention logits.

As in PAI's code, the newest query's pre-softmax logits to image keys become z + alpha * |z| in layers [start, end],
from the prompt's last position on; the softmax then renormalises.

With `cfg`, PAI's second part also runs: a branch with the same prompt without its image tokens (own KV cache; with
no image tokens nothing is boosted there) gives `uncond`, and the next token is chosen from
    gamma * (cond - uncond) + uncond  on log-softmax scores, tokens with cond < log(cfg_cutoff) + max cond masked.
For Qwen-VL the image-free prompt keeps the <|vision_start|><|vision_end|> markers; only the image tokens go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from neverfade.engine.batch import Batch, SequenceState
from neverfade.methods.base import Flags, LayerRangeMethod, Param, end_param, per_key, register, start_param


@dataclass
class PAIState(SequenceState):
    boost: torch.Tensor  # (B, P) alpha on image keys, 0 elsewhere


@register
class PAI(LayerRangeMethod):
    name = "pai"
    summary = "Boost image attention logits, z <- z + alpha |z|, optionally with image-free guidance (PAI)."
    params = (
        Param("alpha", 0.2, "logit boost for image keys: z <- z + alpha * |z|", "paper: PAI's README", minimum=0.0),
        start_param(2, "paper: PAI's code acts in layers [2, N)"),
        end_param("paper: PAI's code acts in layers [2, N)"),
        Param(
            "cfg",
            False,
            "also guide by an image-free branch: gamma * (cond - uncond) + uncond",
            "paper: optional in PAI",
            type=bool,
        ),
        Param("gamma", 1.1, "guidance scale (with cfg)", "paper: PAI's default", minimum=0.0),
        Param(
            "cfg_cutoff",
            0.1,
            "with cfg, keep tokens with p >= cfg_cutoff * max p under the image",
            "paper: PAI's default",
            minimum=0.0,
            maximum=1.0,
        ),
    )

    def bind(self, info):
        super().bind(info)
        self.image_token_id = info.image_token_id
        self.family = info.family  # builds the image-free prompt

    State = PAIState

    def flags(self):
        return Flags(strategy="contrast" if self.cfg else None, capturable=not self.cfg)

    def new_state(self, batch: Batch) -> PAIState:
        return PAIState(batch.image_mask.float() * self.alpha)

    def key_boost(self, batch: Batch, keys: int) -> torch.Tensor:
        return per_key(batch.state(self).boost, keys, fill=0.0)

    # ---- cfg: the image-free branch, run by the contrast loop ----
    def contrast_inputs(self, model, input_ids, model_kwargs, raw_inputs):
        return self.family.image_free_inputs(model, input_ids, model_kwargs, self.image_token_id)

    def combine(self, logits: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
        cond, uncond = torch.log_softmax(logits, -1), torch.log_softmax(contrast, -1)
        guided = self.gamma * (cond - uncond) + uncond
        cutoff = math.log(self.cfg_cutoff) + cond.max(dim=-1, keepdim=True).values if self.cfg_cutoff > 0 else None
        return guided if cutoff is None else guided.masked_fill(cond < cutoff, float("-inf"))
