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

import torch

from neverfade import compat
from neverfade.engine.batch import Batch
from neverfade.methods.base import LayerRangeMethod, Param, end_param, per_key, register, start_param

IMAGE_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids", "mm_encoder_outputs")


@register
class PAI(LayerRangeMethod):
    name = "pai"
    summary = "Boost image attention logits, z <- z + alpha |z|, optionally with image-free guidance (PAI)."
    params = (
        Param("alpha", 0.2, "logit boost for image keys: z <- z + alpha * |z|", "paper: PAI's README",
              minimum=0.0),
        start_param(2, "paper: PAI's code acts in layers [2, N)"),
        end_param("paper: PAI's code acts in layers [2, N)"),
        Param("cfg", False, "also guide by an image-free branch: gamma * (cond - uncond) + uncond",
              "paper: optional in PAI", type=bool),
        Param("gamma", 1.1, "guidance scale (with cfg)", "paper: PAI's default", minimum=0.0),
        Param("cfg_cutoff", 0.1, "with cfg, keep tokens with p >= cfg_cutoff * max p under the image",
              "paper: PAI's default", minimum=0.0, maximum=1.0),
    )

    def bind(self, info):
        super().bind(info)
        self.image_token_id = info.image_token_id

    @property
    def strategy(self) -> str | None:  # known from the parameters, so a conflict is refused before any model loads
        return "contrast" if self.cfg else None

    @property
    def capturable(self) -> bool:
        return not self.cfg

    def begin_batch(self, batch: Batch) -> None:
        batch.state(self).boost = batch.image_mask.float() * self.alpha

    def key_boost(self, batch: Batch, keys: int) -> torch.Tensor:
        return per_key(batch.state(self).boost, keys, fill=0.0)

    # ---- cfg: the image-free branch, run by the contrast loop ----
    def contrast_inputs(self, model, input_ids, model_kwargs, raw_inputs):
        mask = model_kwargs.get("attention_mask")
        keep = input_ids != self.image_token_id
        if mask is not None:
            keep &= mask.bool()
        rows = [ids[k] for ids, k in zip(input_ids, keep)]
        width = max(len(r) for r in rows)
        pad = model.generation_config.pad_token_id or 0
        ids = input_ids.new_full((len(rows), width), pad)
        new_mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding, as the main branch has
            ids[i, width - len(r):] = r
            new_mask[i, width - len(r):] = 1
        other = {k: v for k, v in model_kwargs.items() if k not in IMAGE_INPUTS and k != "position_ids"}
        other["attention_mask"] = new_mask
        if "position_ids" in model_kwargs:
            other["position_ids"] = compat.position_ids(model, ids, other)
        return ids, other

    def combine(self, logits: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
        cond, uncond = torch.log_softmax(logits, -1), torch.log_softmax(contrast, -1)
        guided = self.gamma * (cond - uncond) + uncond
        cutoff = math.log(self.cfg_cutoff) + cond.max(dim=-1, keepdim=True).values if self.cfg_cutoff > 0 else None
        return guided if cutoff is None else guided.masked_fill(cond < cutoff, float("-inf"))
