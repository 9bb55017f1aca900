"""The per-batch decoding state the engine shares with methods: tensors, plus the step counter.

One Batch per KV cache: a decoding loop with two branches (VCD's noised image, PAI's image-free prompt) has a cache,
and so a Batch, for each, and every method keeps its per-sequence tensors in the Batch it is called with."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch


@dataclass(eq=False)  # identity: a Batch is one running batch
class Batch:
    image_mask: torch.Tensor  # (B, P) bool: which prompt keys are image tokens, per sequence (left padding included)
    step: int = 0  # 0 while the prompt is prefilled; t at decode step t (not advanced by a replayed CUDA graph)
    rows: int = 0  # decode-step attention rows computed for the methods (not advanced by a replayed CUDA graph)
    query_index: torch.Tensor = None  # () long, on the device: the cache index of the newest query token
    _state: dict[str, SimpleNamespace] = field(default_factory=dict)

    def __post_init__(self):
        if self.query_index is None:
            self.query_index = torch.tensor(self.prompt_len - 1, device=self.image_mask.device)

    @property
    def prompt_len(self) -> int:
        return self.image_mask.shape[1]

    @property
    def size(self) -> int:
        return self.image_mask.shape[0]

    def state(self, method) -> SimpleNamespace:
        """The method's own per-sequence tensors for this batch."""
        return self._state.setdefault(method.name, SimpleNamespace())
