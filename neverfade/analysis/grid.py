"""Where each image token sits on the image: the token grid of one image, as the model's family lays it out
(`Family.token_grid`, in neverfade/models/families/). Where the family does not say, or its layout does not match:
a square if the count is a perfect square, else one row of tokens; `note` says so."""

from __future__ import annotations

import math

import numpy as np

from neverfade.models.families import FAMILIES
from neverfade.models.family import TokenGrid

__all__ = ["TokenGrid", "fallback_grid", "token_grid"]


def token_grid(model, inputs, count: int) -> TokenGrid:
    """The grid of the one image in `inputs` (the processor's outputs for that image alone), which has `count`
    image tokens in the sequence."""
    kind = type(model).__name__
    family = FAMILIES.get(kind)
    grid = family.token_grid(model.config, inputs, count) if family is not None else None
    return grid or fallback_grid(count, kind)


def fallback_grid(count: int, kind: str) -> TokenGrid:
    side = math.isqrt(count)
    if side * side == count:
        return TokenGrid(side, side, np.arange(count), f"unknown layout for {kind}: assumed a {side}x{side} square")
    return TokenGrid(1, count, np.arange(count), f"unknown layout for {kind}: shown as one row of {count} tokens")
