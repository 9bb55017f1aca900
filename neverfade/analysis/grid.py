"""Where each image token sits on the image: the token grid of one image, per model family.

- LLaVA-1.5 (and the embedded model): a square of (image_size / patch_size)^2 tokens, row-major (24 x 24 for
  LLaVA-1.5-7B, 12 x 12 for the embedded model).
- LLaVA-NeXT: the base image's square comes first, then the high-resolution grid, unpadded to the image's aspect
  ratio, row by row with a newline token at the end of each row. The grid here is the high-resolution part; the base
  square and the newline tokens are left out of maps (their attention is not on the grid).
- Qwen2-VL / Qwen2.5-VL: `image_grid_thw` patches merged `spatial_merge_size` x `spatial_merge_size`, row-major.
- Anything else: a square if the count is a perfect square, else one row of tokens; `note` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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


def token_grid(model, inputs, count: int) -> TokenGrid:
    """The grid of the one image in `inputs` (the processor's outputs for that image alone), which has `count`
    image tokens in the sequence."""
    kind = type(model).__name__
    if kind.startswith("Qwen2"):
        t, h, w = (int(x) for x in inputs["image_grid_thw"][0])
        merge = model.config.vision_config.spatial_merge_size
        rows, cols = h // merge, w // merge
        if t * rows * cols == count:
            return TokenGrid(rows, cols, np.arange(rows * cols), f"Qwen-VL image_grid_thw {t}x{h}x{w}, merge {merge}")
    elif kind == "LlavaNextForConditionalGeneration":
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        height, width = (int(x) for x in inputs["image_sizes"][0])
        grid = _next_grid(count - side * side, height / width)
        if grid is not None:
            rows, cols = grid
            index = side * side + (np.arange(rows)[:, None] * (cols + 1) + np.arange(cols)[None, :]).ravel()
            return TokenGrid(rows, cols, index, f"LLaVA-NeXT high-resolution grid {rows}x{cols} (base {side}x{side} "
                                                "and row newlines left out)")
    elif kind == "LlavaForConditionalGeneration":
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        if side * side == count:
            return TokenGrid(side, side, np.arange(count), f"LLaVA {side}x{side} patches")
    return fallback_grid(count, kind)


def fallback_grid(count: int, kind: str) -> TokenGrid:
    side = math.isqrt(count)
    if side * side == count:
        return TokenGrid(side, side, np.arange(count), f"unknown layout for {kind}: assumed a {side}x{side} square")
    return TokenGrid(1, count, np.arange(count), f"unknown layout for {kind}: shown as one row of {count} tokens")


def _next_grid(rest: int, aspect: float) -> tuple[int, int] | None:
    """(rows, cols) with rows * (cols + 1) == rest whose rows / cols is closest to the image's height / width."""
    shapes = [(r, rest // r - 1) for r in range(1, rest + 1) if rest % r == 0 and rest // r > 1]
    return min(shapes, key=lambda s: abs(math.log(s[0] / s[1] / aspect)), default=None)
