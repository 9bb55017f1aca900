"""LLaVA-OneVision: SigLIP patches (no CLS token) of the base image first, then the any-resolution grid of crops,
unpadded to the image's aspect ratio, shrunk (bilinear) where it holds more than `anyres_max_<k>` crops' worth of
patches, row by row with a newline token at the end of each row. One image per prompt: every image gets its grid."""

from __future__ import annotations

import math

import numpy as np

from neverfade.models.families.llava import side
from neverfade.models.family import Family, TokenGrid, register

TEMPLATE = (  # the random models' chat template (Qwen2's, with LLaVA's <image>)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]


def grid_shape(config, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the high-resolution grid of an image of `height` x `width`, as the model packs it: the best
    pinpoint's crops, the padding cut off, then shrunk to at most `anyres_max_<k>` crops' worth of patches."""
    from transformers.image_processing_utils import select_best_resolution

    n, crop = side(config), config.vision_config.image_size
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    rows, cols = best_h // crop * n, best_w // crop * n
    if width / height > cols / rows:
        rows -= (rows - int(round(height * (cols / width), 7))) // 2 * 2
    else:
        cols -= (cols - int(round(width * (rows / height), 7))) // 2 * 2
    ratio = math.sqrt(rows * cols / (int(config.vision_aspect_ratio.removeprefix("anyres_max_")) * n * n))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


@register
class LlavaOnevision(Family):
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    name = "llava-onevision"
    random_name = "llava_onevision"
    paper_layers = 28  # LLaVA-OneVision-7B (Qwen2-7B)
    # In neither paper: LLaVA-NeXT's tau (the nearest family: any-resolution crops) and LocoRE gain, SPARC's layer at
    # LLaVA-NeXT's relative depth (20 of 32 -> 18 of 28). Unvalidated: `neverfade tune` calibrates them.
    method_defaults = {"sparc": {"layer": 18, "tau": 4.0}, "locore": {"beta": 0.15}}
    unvalidated = frozenset({"sparc", "locore"})
    image_inputs = ("pixel_values", "image_sizes", "batch_num_images")
    step_constant = ("image_sizes", "batch_num_images")  # image metadata some releases keep passing, unused there

    def token_grid(self, config, inputs, count):
        """The high-resolution part; the base square and the newline tokens are left out of maps, as for LLaVA-NeXT."""
        n = side(config)
        height, width = (int(x) for x in inputs["image_sizes"][0])
        rows, cols = grid_shape(config, height, width)
        if n * n + rows * (cols + 1) != count:
            return None
        index = n * n + (np.arange(rows)[:, None] * (cols + 1) + np.arange(cols)[None, :]).ravel()
        return TokenGrid(
            rows, cols, index, f"LLaVA-OneVision any-resolution grid {rows}x{cols} (base {n}x{n} and newlines left out)"
        )

    def random_parts(self, size):
        import transformers
        from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil, Qwen2Config, SiglipVisionConfig

        from neverfade.models.processors import image_only
        from neverfade.models.random import tokenizer

        tiny, small = size == "tiny", size == "small"
        tok = tokenizer(SPECIALS, 512 if tiny else 1024)
        tok.pad_token = tok.eos_token = "<|endoftext|>"
        tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
        # small: llava-hf/llava-onevision-qwen2-0.5b-ov-hf, 7b: llava-hf/llava-onevision-qwen2-7b-ov-hf, as
        # transformers' convert_llava_onevision_weights_to_hf.py builds them: SigLIP so400m less its last layer and
        # head, the text config of Qwen/Qwen2-0.5B-Instruct (896/4864/24 layers/14 heads/2 kv, tied: the original saves
        # no lm_head) or Qwen2-7B-Instruct, vocab + <image>, <video> padded to 64s. Not read from their config.json;
        # parameters built: 893,675,552 (the hub's file: 1.79 GB in float16, 0.89B) and 8,030,807,584 (the hub: 8.03B)
        vision = SiglipVisionConfig(
            hidden_size=32 if tiny else 1152,
            intermediate_size=64 if tiny else 4304,
            num_hidden_layers=2 if tiny else 26,
            num_attention_heads=4 if tiny else 16,
            image_size=32 if tiny else 384,
            patch_size=8 if tiny else 14,
            vision_use_head=False,
        )
        text = Qwen2Config(
            hidden_size=64 if tiny else 896 if small else 3584,
            intermediate_size=128 if tiny else 4864 if small else 18944,
            num_hidden_layers=4 if tiny else 24 if small else 28,
            num_attention_heads=4 if tiny else 14 if small else 28,
            num_key_value_heads=2 if tiny else 2 if small else 4,
            vocab_size=512 if tiny else 152000 if small else 152128,  # Qwen2's + <image>, <video>: to 64s
            max_position_embeddings=4096 if tiny else 32768,
            initializer_range=0.2 if tiny else 0.02,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
        px = vision.image_size
        # tiny: crops of up to 2x2, and at most one crop's worth of patches, so the shrinking runs in the tests too
        pinpoints = [[a * px, b * px] for a in range(1, 3 if tiny else 7) for b in range(1, 3 if tiny else 7)]
        aspect = "anyres_max_1" if tiny else "anyres_max_9"
        config = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            video_token_index=tok.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=pinpoints,
            vision_aspect_ratio=aspect,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=small,
        )
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": px, "width": px}, image_grid_pinpoints=pinpoints
        )
        kw = dict(
            image_processor=image_processor,
            tokenizer=tok,
            chat_template=TEMPLATE,
            num_image_tokens=side(config) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=aspect,
        )
        stand_in = image_only("LlavaOnevisionProcessor")  # where torchvision is missing, no video processor
        if stand_in is not None:
            return config, stand_in(**kw)
        return config, transformers.LlavaOnevisionProcessor(
            video_processor=transformers.LlavaOnevisionVideoProcessor(), **kw
        )
