"""What a model family must provide: the adapter base class, and the registry its modules fill.

A family is one module in `neverfade/models/families/`, found by `neverfade.models.families.discover`: a `Family`
subclass decorated with `@register`. Everything outside `models/` that depends on the family asks the adapter
(methods through `ModelInfo.family`), never the model's class name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class PaperSetup:
    """How the SPARC authors ran a family (`paper=True`, `--paper`): weights' dtype, prompt format, image padding."""

    source: str
    dtype: str | None = None  # None: the authors do not say; the usual default stays
    conversation: str | None = None  # the whole prompt, with {image} and {prompt}; None: the checkpoint's template
    pad_to_square: bool = False  # the family's `square_padding` processor: a square, filled with the mean colour


@dataclass(frozen=True)
class TokenGrid:
    rows: int
    cols: int
    index: np.ndarray  # (rows * cols,) the image-token index (0-based among the image's tokens) of each cell, row-major
    note: str  # how the grid was found

    def place(self, values: np.ndarray) -> np.ndarray:
        """(..., N_image) values per image token -> (..., rows, cols)."""
        return np.asarray(values)[..., self.index].reshape(*np.shape(values)[:-1], self.rows, self.cols)

    def describe(self) -> dict:
        return {"rows": self.rows, "cols": self.cols, "note": self.note}


# inputs generate passes that carry or mark the image in any family: dropped with the image (PAI's image-free branch)
IMAGE_MARKS = ("mm_token_type_ids", "mm_encoder_outputs")


class Family(ABC):
    """One model family. Data as class attributes; behaviour as methods. `@register` refuses a subclass that leaves
    a data attribute undeclared or an abstract method undefined."""

    architectures: ClassVar[tuple[str, ...]]  # the transformers model class names (config.architectures)
    name: ClassVar[str]  # shown to users and in results: "llava-1.5"
    random_name: ClassVar[str]  # `random:<random_name>` builds a random-weight model of the family
    paper_layers: ClassVar[int]  # depth of the model the papers' defaults were tuned on (7B)
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # method -> parameter -> the family's default
    unvalidated: ClassVar[frozenset[str]] = frozenset()  # methods whose defaults here are our extrapolation
    paper: ClassVar[PaperSetup | None] = None  # None: the SPARC authors did not run this family
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)  # processor outputs the image is encoded from
    step_constant: ClassVar[tuple[str, ...]] = ()  # per-step inputs of a decode step kept as they are (image metadata)
    step_advancing: ClassVar[tuple[str, ...]] = ()  # per-step inputs of a decode step that grow by 1 each step

    REQUIRED: ClassVar[tuple[str, ...]] = ("architectures", "name", "random_name", "paper_layers")

    @abstractmethod
    def token_grid(self, config, inputs, count: int) -> TokenGrid | None:
        """Where each of the `count` image tokens of the one image in `inputs` (the processor's outputs for it)
        sits on the image; None where the layout does not match (the caller falls back to a square or a row)."""

    @abstractmethod
    def random_parts(self, size: str) -> tuple[Any, Any]:
        """(config, processor) of a random-weight model: size "tiny" (tests, seconds on a CPU), "small" (bench: the
        family's smallest published checkpoint with vision) or "7b" (bench: its 7B-class checkpoint)."""

    def random_weights(self, model) -> None:
        """Set weights that the model's own initialisation leaves without effect (a random model must see the image);
        called right after the random model is built, under its seed. Default: none."""
        return None

    def pixel_split(self, inputs) -> list[int]:
        """How many leading entries of `inputs["pixel_values"]` belong to each image (VCD noises each on its own)."""
        return [1] * inputs["pixel_values"].shape[0]

    def pixel_padding(self, inputs):
        """None, or a mask broadcast over `inputs["pixel_values"]`, True where the entries pad the batch (the model
        skips them as padding only while they stay as they are, so VCD does not noise them)."""
        return None

    def image_free_inputs(self, model, input_ids, model_kwargs, image_token_id: int):
        """(input_ids, model_kwargs) of the same prompts without their image tokens and image inputs, left padded
        (PAI's image-free branch). Other tokens around the image (a family's image markers) stay."""
        import torch

        from neverfade import compat

        mask = model_kwargs.get("attention_mask")
        keep = input_ids != image_token_id
        if mask is not None:
            keep &= mask.bool()
        rows = [ids[k] for ids, k in zip(input_ids, keep)]
        width = max(len(r) for r in rows)
        ids = input_ids.new_full((len(rows), width), model.generation_config.pad_token_id or 0)
        new_mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = r
            new_mask[i, width - len(r) :] = 1
        dropped = {*self.image_inputs, *IMAGE_MARKS, "position_ids"}
        other = {k: v for k, v in model_kwargs.items() if k not in dropped}
        other["attention_mask"] = new_mask
        if "position_ids" in model_kwargs:
            other["position_ids"] = compat.position_ids(model, ids, other)
        return ids, other

    def model_view(self, image, processor):
        """The part of `image` the token grid covers, as `processor` prepares it (default: all of it)."""
        return image

    def square_padding(self, image_processor):
        """The image processor padding to a square first (`PaperSetup.pad_to_square`)."""
        raise NotImplementedError(f"{self.name} has no square padding")


FAMILIES: dict[str, Family] = {}  # architecture class name -> its family; filled by `register`


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add the family under each of its architectures."""
    missing = [a for a in Family.REQUIRED if not hasattr(cls, a)]
    if missing:
        raise TypeError(f"family {cls.__name__} does not declare {', '.join(missing)}")
    family = cls()  # TypeError where an abstract method is left undefined
    taken = [a for a in cls.architectures if a in FAMILIES]
    if taken:
        raise ValueError(f"family {cls.__name__}: {', '.join(taken)} already belongs to {FAMILIES[taken[0]].name}")
    FAMILIES.update(dict.fromkeys(cls.architectures, family))
    return cls
