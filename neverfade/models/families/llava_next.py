"""LLaVA-NeXT: the base image's square of tokens comes first, then the high-resolution grid, unpadded to the image's
aspect ratio, row by row with a newline token at the end of each row."""

from __future__ import annotations

import math

import numpy as np

from neverfade.models.families.llava import TEMPLATE, VICUNA_V1, random_llava_parts, side
from neverfade.models.family import Family, PaperSetup, TokenGrid, register


@register
class LlavaNext(Family):
    architectures = ("LlavaNextForConditionalGeneration",)
    name = "llava-next"
    random_name = "llava_next"
    paper_layers = 32
    # LocoRE's paper has no LLaVA-NeXT: LLaVA-1.5's gain, unvalidated.
    method_defaults = {"sparc": {"layer": 20, "tau": 4.0}, "locore": {"beta": 0.15}}
    unvalidated = frozenset({"locore"})
    paper = PaperSetup("the authors' code: LLaVA's codebase, float16, vicuna_v1, anyres", "float16", VICUNA_V1)
    image_inputs = ("pixel_values", "image_sizes")
    step_constant = ("image_sizes",)

    def token_grid(self, config, inputs, count):
        """The high-resolution part; the base square and the newline tokens are left out of maps (their attention
        is not on the grid)."""
        n = side(config)
        height, width = (int(x) for x in inputs["image_sizes"][0])
        grid = _next_grid(count - n * n, height / width)
        if grid is None:
            return None
        rows, cols = grid
        index = n * n + (np.arange(rows)[:, None] * (cols + 1) + np.arange(cols)[None, :]).ravel()
        return TokenGrid(
            rows, cols, index, f"LLaVA-NeXT high-resolution grid {rows}x{cols} (base {n}x{n} and row newlines left out)"
        )

    def random_parts(self, size):
        from transformers import LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor

        vision, _, tok, kw = random_llava_parts(size)
        px = vision.image_size
        pinpoints = [[px, px], [px, 2 * px], [2 * px, px]]
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": px}, crop_size={"height": px, "width": px}, image_grid_pinpoints=pinpoints
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            chat_template=TEMPLATE,
            patch_size=vision.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        return LlavaNextConfig(image_grid_pinpoints=pinpoints, **kw), processor


def _next_grid(rest: int, aspect: float) -> tuple[int, int] | None:
    """(rows, cols) with rows * (cols + 1) == rest whose rows / cols is closest to the image's height / width."""
    shapes = [(r, rest // r - 1) for r in range(1, rest + 1) if rest % r == 0 and rest // r > 1]
    return min(shapes, key=lambda s: abs(math.log(s[0] / s[1] / aspect)), default=None)
