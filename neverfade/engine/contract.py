"""The contract between a method and the engine: declared parameters, flags, typed per-sequence state, and hooks.

The engine computes, at a decode step and only in the layers a method asks for, one explicit attention row:
    scores -> [key_boost] -> softmax -> probs -> [observe] -> [key_scale] -> [reweight] -> weights @ V
Pre-softmax edits (PAI) act on `scores`; post-softmax reweightings without renormalisation (SPARC, LocoRE, naive)
on `weights`, which equals scaling value vectors (METHODS.md). `observe` sees the probabilities after all pre-softmax
edits and before any reweighting.

A method declares, once:
- `params`: its parameters, each with a default and where the default comes from;
- `flags()`: its decoding strategy (a loop registered in `neverfade.decoding`) and whether its per-step work can run
  inside a captured decode step; both follow from the parameters alone, so conflicts are refused before a model loads
  and again after binding;
- `State`: the dataclass of its per-sequence tensors, made by `new_state` when a batch begins and kept by the Batch;
- its hooks: the methods of `HOOKS` it overrides (found once, when the class is defined: `Method.hooks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from neverfade.engine.batch import Batch, SequenceState
from neverfade.errors import ParameterError
from neverfade.models.families import ModelInfo

HOOKS = ("begin_step", "key_boost", "key_scale", "observe", "reweight")
STRATEGIES = ("contrast", "rejection", "beam")  # decoding loops a method may own (neverfade.decoding.STRATEGIES)


@dataclass(frozen=True)
class Param:
    name: str
    default: Any  # None: taken from the model family (ModelInfo.default), see `source`
    help: str
    source: str  # where the default comes from: "paper ..." or "our choice: why"
    type: type = float
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False  # may stay None after binding

    def check(self, value: Any) -> Any:
        if value is None:
            return None
        if self.type is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ParameterError(f"{self.name} must be true or false, got {value!r}")
            return value
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise ParameterError(f"{self.name} must be a {self.type.__name__}, got {value!r}") from None
        if value != value or value in (float("inf"), float("-inf")):  # nan, inf: a record could not say it in JSON
            raise ParameterError(f"{self.name} must be a finite number, got {value}")
        if self.minimum is not None and value < self.minimum:
            raise ParameterError(f"{self.name} must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ParameterError(f"{self.name} must be <= {self.maximum}, got {value}")
        return value


@dataclass(frozen=True)
class Flags:
    strategy: str | None = None  # a decoding loop of its own, one of STRATEGIES
    capturable: bool = False  # per-step work is in-place tensor work only: it can run in a captured decode step

    def __post_init__(self):
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"unknown decoding strategy {self.strategy!r}; known: {', '.join(STRATEGIES)}")


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    State: ClassVar[type | None] = None  # per-batch state: a SequenceState to follow beams, else any class
    hooks: ClassVar[frozenset[str]] = frozenset()  # the HOOKS this class overrides; set when the class is defined

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.hooks = frozenset(h for h in HOOKS if getattr(cls, h) is not getattr(Method, h))

    def __init__(self, **values: Any):
        known = {p.name: p for p in self.params}
        unknown = set(values) - set(known)
        if unknown:
            raise ParameterError(
                f"{self.name} has no parameter {', '.join(sorted(unknown))}; it has {', '.join(known) or 'none'}"
            )
        for name, p in known.items():
            setattr(self, name, p.check(values.get(name, p.default)))

    @property
    def values(self) -> dict[str, Any]:
        return {p.name: getattr(self, p.name) for p in self.params}

    def flags(self) -> Flags:
        """What the engine and the decoding path must know; from the parameters alone, never from binding."""
        return Flags()

    def bind(self, info: ModelInfo) -> None:
        """Resolve per-family defaults and check the values against the model."""
        for p in self.params:
            if getattr(self, p.name) is None:
                setattr(self, p.name, p.check(info.default(self.name, p.name)))
            if getattr(self, p.name) is None and not p.optional:
                raise ParameterError(f"{self.name}: no default for {p.name} on {info.family.name}; set it explicitly")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.values}

    # ---- where the engine calls the hooks ----
    def decode_layers(self, num_layers: int) -> set[int]:
        """Layers whose decode-step attention row this method edits, observes or reweights."""
        return set()

    def prefill_layers(self, num_layers: int) -> set[int]:
        """Layers whose last prefill row (the one predicting the first token) this method observes or edits."""
        return set()

    def acts_in(self, layer: int) -> bool:
        """Whether this method's key edits (key_boost, key_scale) apply in `layer`."""
        return False

    def observes(self, layer: int) -> bool:
        """Whether `observe` wants `layer`'s row, among the layers this method asks for. The fused kernel writes the
        probabilities only where some method observes: a method observing one layer says so here."""
        return True

    def new_state(self, batch: Batch) -> Any:
        """A new batch begins (its prefill is about to run): this method's `State` for it."""
        raise NotImplementedError(f"{self.name} declares a State but no new_state")

    # ---- hooks ----
    def begin_step(self, batch: Batch) -> None:
        """A decode step begins, before its first layer."""

    # Per-key edits: in the layers a method `acts_in`, the newest query's logits z become z + boost * |z| (before
    # the softmax) and its weights are multiplied by scale (after it, no renormalisation). Each is a (B or 1, keys)
    # tensor for this step, or None; the engine builds them once per step.
    def key_boost(self, batch: Batch, keys: int) -> torch.Tensor | None:
        return None

    def key_scale(self, batch: Batch, keys: int) -> torch.Tensor | None:
        return None

    def observe(self, layer: int, probs: torch.Tensor, batch: Batch) -> None:
        """See the newest query's softmax (B, KVH, G, T), float32, before any reweighting."""

    def reweight(self, layer: int, weights: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Replace the weights after every key edit (for what a key scale cannot say, such as SGRS's gradients)."""
        return weights


def check_flags(methods: list[Method]) -> dict[Method, Flags]:
    """Each method's flags; refuses two methods that each choose tokens their own way."""
    flags = {m: m.flags() for m in methods}
    owners = [m.name for m, f in flags.items() if f.strategy]
    if len(owners) > 1:
        raise ParameterError(f"{' and '.join(owners)} each choose tokens their own way; use one of them")
    return flags


__all__ = ["HOOKS", "STRATEGIES", "Param", "Flags", "Method", "SequenceState", "check_flags"]
