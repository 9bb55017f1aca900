"""Shared parts of the built-in methods: the registry, a layer-range base and parameter helpers. The contract
itself (Param, Flags, Method, hooks, state) is the engine's: neverfade/engine/contract.py."""

from __future__ import annotations

from typing import ClassVar

import torch

from neverfade.engine.contract import Flags, Method, Param
from neverfade.errors import ParameterError
from neverfade.models.families import ModelInfo

__all__ = [
    "METHODS",
    "Flags",
    "Method",
    "Param",
    "ParameterError",
    "register",
    "LayerRangeMethod",
    "start_param",
    "end_param",
    "per_key",
    "check_layer_range",
]

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def check_layer_range(method: Method, info: ModelInfo, *singles: str) -> None:
    """Resolve `end` (default: the last layer) and check `start`, `end` and the named layer parameters."""
    last = info.num_layers - 1
    if method.end is None:
        method.end = last
    for key in ("start", "end", *singles):
        if getattr(method, key) > last:
            raise ParameterError(
                f"{method.name}: {key} {getattr(method, key)} is beyond the model's depth "
                f"({info.num_layers} layers: 0..{last})"
            )
    if method.start > method.end:
        raise ParameterError(f"{method.name}: start ({method.start}) is after end ({method.end})")


class LayerRangeMethod(Method):
    """A method acting in layers [start, end] (parameters `start`, `end`) at every decode step, and at the prompt's
    last position too unless `on_prefill` is False."""

    on_prefill: ClassVar[bool] = True

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        check_layer_range(self, info)

    def acts_in(self, layer: int) -> bool:
        return self.start <= layer <= self.end

    def decode_layers(self, num_layers):
        return set(range(self.start, self.end + 1))

    def prefill_layers(self, num_layers):
        return self.decode_layers(num_layers) if self.on_prefill else set()


def start_param(default: int, source: str) -> Param:
    return Param("start", default, "first layer the method acts in (0-indexed)", source, type=int, minimum=0)


def end_param(source: str) -> Param:
    return Param(
        "end",
        None,
        "last layer the method acts in (inclusive); default the last layer",
        source,
        type=int,
        minimum=0,
        optional=True,
    )


def per_key(values: torch.Tensor, keys: int, fill: float = 1.0) -> torch.Tensor:
    """A (B, P) per-prompt-key tensor extended with `fill` to (B, keys)."""
    return torch.nn.functional.pad(values, (0, keys - values.shape[-1]), value=fill)
