"""What a method is: declared parameters with their sources, and optional hooks the engine calls.

The engine computes, at a decode step and only in the layers a method asks for, one explicit attention row:
    scores -> [method.edit_scores] -> softmax -> probs -> [method.observe] -> [method.reweight] -> weights @ V
Pre-softmax edits (PAI) act on `scores`; post-softmax reweightings without renormalisation (SPARC, LocoRE, naive)
on `weights`, which equals scaling value vectors (METHODS.md). `observe` sees the probabilities after all pre-softmax
edits and before any reweighting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from neverfade.engine.batch import Batch
from neverfade.errors import ParameterError
from neverfade.models.families import ModelInfo

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    METHODS[cls.name] = cls
    return cls


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


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    # Flags, known from the parameters alone (class attributes, or properties of the parameters; never set in bind),
    # so conflicts are refused before a model loads:
    strategy: ClassVar[str | None] = None  # a decoding strategy of its own ("contrast", "rejection", "beam")
    capturable: ClassVar[bool] = False  # per-step work is tensor work only: it can run in a captured decode step

    def __init__(self, **values: Any):
        known = {p.name: p for p in self.params}
        unknown = set(values) - set(known)
        if unknown:
            raise ParameterError(
                f"{self.name} has no parameter {', '.join(sorted(unknown))}; it has {', '.join(known) or 'none'}")
        for name, p in known.items():
            setattr(self, name, p.check(values.get(name, p.default)))

    @property
    def values(self) -> dict[str, Any]:
        return {p.name: getattr(self, p.name) for p in self.params}

    def bind(self, info: ModelInfo) -> None:
        """Resolve per-family defaults and check the values against the model."""
        for p in self.params:
            if getattr(self, p.name) is None:
                setattr(self, p.name, p.check(info.default(self.name, p.name)))
            if getattr(self, p.name) is None and not p.optional:
                raise ParameterError(f"{self.name}: no default for {p.name} on {info.family.name}; set it explicitly")

    def check_layer_range(self, info: ModelInfo, *singles: str) -> None:
        """Resolve `end` (default: the last layer) and check `start`, `end` and the named layer parameters."""
        last = info.num_layers - 1
        if self.end is None:
            self.end = last
        for key in ("start", "end", *singles):
            if getattr(self, key) > last:
                raise ParameterError(f"{self.name}: {key} {getattr(self, key)} is beyond the model's depth "
                                     f"({info.num_layers} layers: 0..{last})")
        if self.start > self.end:
            raise ParameterError(f"{self.name}: start ({self.start}) is after end ({self.end})")

    def layer_range(self) -> set[int]:
        return set(range(self.start, self.end + 1))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.values}

    # ---- hooks; the engine calls only what a method declares through the layer sets ----
    def decode_layers(self, num_layers: int) -> set[int]:
        """Layers whose decode-step attention row this method edits, observes or reweights."""
        return set()

    def prefill_layers(self, num_layers: int) -> set[int]:
        """Layers whose last prefill row (the one predicting the first token) this method observes or edits."""
        return set()

    def begin_batch(self, batch: Batch) -> None:
        """A new batch begins (its prefill is about to run): allocate per-sequence state."""

    def begin_step(self, batch: Batch) -> None:
        """A decode step begins, before its first layer."""

    # Per-key edits: in the layers a method `acts_in`, the newest query's logits z become z + boost * |z| (before
    # the softmax) and its weights are multiplied by scale (after it, no renormalisation). Each is a (B or 1, keys)
    # tensor for this step, or None; the engine builds them once per step.

    def acts_in(self, layer: int) -> bool:
        return False

    def key_boost(self, batch: Batch, keys: int) -> torch.Tensor | None:
        return None

    def key_scale(self, batch: Batch, keys: int) -> torch.Tensor | None:
        return None

    def observe(self, layer: int, probs: torch.Tensor, batch: Batch) -> None:
        """See the newest query's softmax (B, KVH, G, T), float32, before any reweighting."""

    def reweight(self, layer: int, weights: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Replace the weights after every key edit (for what a key scale cannot say, such as SGRS's gradients)."""
        return weights

    def decoder(self):
        """The decoding loop for `generate(custom_generate=...)`, for methods with a strategy."""
        if self.strategy == "contrast":
            import functools

            from neverfade.decoding.contrast import contrast_decode

            return functools.partial(contrast_decode, method=self)
        if self.strategy == "beam":
            import functools

            from neverfade.decoding.opera import beam_decode

            return functools.partial(beam_decode, method=self)
        return None


class LayerRangeMethod(Method):
    """A method acting in layers [start, end] (parameters `start`, `end`) at every decode step, and at the prompt's
    last position too unless `on_prefill` is False."""

    on_prefill: ClassVar[bool] = True

    def bind(self, info: ModelInfo) -> None:
        super().bind(info)
        self.check_layer_range(info)

    def acts_in(self, layer: int) -> bool:
        return self.start <= layer <= self.end

    def decode_layers(self, num_layers):
        return self.layer_range()

    def prefill_layers(self, num_layers):
        return self.layer_range() if self.on_prefill else set()


def start_param(default: int, source: str) -> Param:
    return Param("start", default, "first layer the method acts in (0-indexed)", source, type=int, minimum=0)


def end_param(source: str) -> Param:
    return Param("end", None, "last layer the method acts in (inclusive); default the last layer", source,
                 type=int, minimum=0, optional=True)


def per_key(values: torch.Tensor, keys: int, fill: float = 1.0) -> torch.Tensor:
    """A (B, P) per-prompt-key tensor extended with `fill` to (B, keys)."""
    return torch.nn.functional.pad(values, (0, keys - values.shape[-1]), value=fill)
