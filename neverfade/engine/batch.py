"""The per-batch decoding state the engine shares with methods: tensors, plus the step counter."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    image_mask: torch.Tensor  # (B, P) bool: which prompt keys are image tokens, per sequence (left padding included)
    step: int = 0  # 0 while the prompt is prefilled; t at decode step t

    @property
    def prompt_len(self) -> int:
        return self.image_mask.shape[1]

    @property
    def size(self) -> int:
        return self.image_mask.shape[0]
