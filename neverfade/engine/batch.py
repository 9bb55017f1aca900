"""The per-batch decoding state the engine shares with methods: the image mask, the step counter, and each method's
own state.

One Batch per KV cache: a decoding loop with two branches (VCD's noised image, PAI's image-free prompt) has a cache,
and so a Batch, for each, and every method keeps its state in the Batch it is called with."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from neverfade.errors import ParameterError


@dataclass
class SequenceState:
    """Base of a method's state whose every tensor field is (B, ...), one row per sequence: a decoding loop that
    moves sequences (beam search) reorders it with them. A field that is not a tensor is a constant of the batch (a
    parameter, an offset into the prompt) and is kept as it is."""

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}

    def select(self, index: torch.Tensor) -> SequenceState:
        return replace(self, **{name: t.index_select(0, index) for name, t in self._tensors().items()})

    def clone(self) -> SequenceState:
        return replace(self, **{name: t.clone() for name, t in self._tensors().items()})


@dataclass(eq=False)  # identity: a Batch is one running batch
class Batch:
    image_mask: torch.Tensor  # (B, P) bool: which prompt keys are image tokens, per sequence (left padding included)
    step: int = 0  # 0 while the prompt is prefilled; t at decode step t (not advanced by a replayed CUDA graph)
    decoding: bool = False  # from the first decode step on: what code inside a compiled step reads, not `step`
    rows: int = 0  # decode-step attention rows computed for the methods (not advanced by a replayed CUDA graph)
    fused: int = 0  # of those, the rows the fused kernel computed
    query_index: torch.Tensor = None  # () long, on the device: the cache index of the newest query token
    states: dict[str, Any] = field(default_factory=dict)  # method name -> its State

    def __post_init__(self):
        if self.query_index is None:
            self.query_index = torch.tensor(self.prompt_len - 1, device=self.image_mask.device)

    @property
    def prompt_len(self) -> int:
        return self.image_mask.shape[1]

    @property
    def size(self) -> int:
        return self.image_mask.shape[0]

    def state(self, method) -> Any:
        """The method's State for this batch."""
        return self.states[method.name]

    def sequence_states(self, leave_out: str | None = None) -> dict[str, SequenceState]:
        """Every method's per-sequence state (but `leave_out`'s); refuses state that cannot follow sequences."""
        for name, state in self.states.items():
            if name != leave_out and not isinstance(state, SequenceState):
                kept = ", ".join(vars(state)) if hasattr(state, "__dict__") else type(state).__name__
                raise ParameterError(
                    f"{leave_out or 'this loop'} cannot make {name}'s state ({kept}) follow its "
                    f"beams: it is not per-sequence tensors; use {leave_out or 'it'} without {name}"
                )
        return {name: s for name, s in self.states.items() if name != leave_out}

    def snapshot(self, leave_out: str | None = None) -> dict[str, SequenceState]:
        """A copy of `sequence_states`, for `restore`."""
        return {name: s.clone() for name, s in self.sequence_states(leave_out).items()}

    def restore(self, snapshot: dict[str, SequenceState], index: torch.Tensor) -> None:
        """Each state in `snapshot`, its rows taken by `index` (rows of the snapshot, one per new sequence)."""
        for name, state in snapshot.items():
            self.states[name] = state.select(index)

    def reorder(self, index: torch.Tensor, leave_out: str | None = None) -> None:
        """Sequence i continues old sequence index[i], for every per-sequence state (but `leave_out`'s)."""
        self.restore(self.sequence_states(leave_out), index)
