"""InternVL3: an InternViT tower whose patches are pixel-shuffled 2 x 2 into one token each (row-major within a
tile), and tiles. An image is resized to the columns x rows of tiles whose aspect ratio is nearest its own (at most
`max_patches`), cut row by row, and followed by the whole image shrunk to one tile (the thumbnail) when there is more
than one tile. In the prompt all of an image's tile tokens run together between <img> and </img>: all of them are
image tokens (SPARC's, PAI's and the probes' masks); the markers stay in PAI's image-free prompt. `pixel_values` is
one flat (tiles, 3, H, W) list for the whole batch, so VCD splits it by the tiles of each image."""

from __future__ import annotations

import numpy as np
import torch
from transformers import InternVLProcessor, InternVLVideoProcessor

from neverfade.models.family import Family, TokenGrid, register
from neverfade.models.processors import IMAGE_ONLY, image_only

TEMPLATE = (  # the random models' chat template (Qwen2's, with InternVL's image placeholder)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MARKS = {  # the tokenizer's named special tokens the processor reads
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


class InternVLImageOnly(InternVLProcessor):
    """InternVLProcessor without its video processor, which needs torchvision (loaded where torchvision is missing;
    saved under the real class name, as a hub checkpoint has it)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kw):
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kw)

    @classmethod
    def _get_arguments_from_pretrained(cls, path, processor_dict=None, **kwargs):
        """The PIL image processor by its class (the auto classes ask for torchvision) and the tokenizer."""
        from transformers import AutoTokenizer
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        return [GotOcr2ImageProcessorPil.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path, **kwargs)]

    def to_dict(self):
        return {**super().to_dict(), "processor_class": "InternVLProcessor"}


IMAGE_ONLY["InternVLProcessor"] = InternVLImageOnly


def tile_side(config) -> int:
    """Tokens along a side of one tile."""
    vision = config.vision_config
    return int(vision.image_size[0] // vision.patch_size[0] * config.downsample_ratio)


def tile_layout(pixels: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of an image's tiles (`pixels`: its tiles, the thumbnail last), the arrangement whose mosaic,
    shrunk to one tile, is nearest the thumbnail; (1, 1) for one tile."""
    n = pixels.shape[0] - 1
    if n == 0:
        return 1, 1
    tiles, thumb = pixels[:-1].float(), pixels[-1].float()
    best, layout = float("inf"), (1, n)
    for rows in (r for r in range(1, n + 1) if n % r == 0):
        cols = n // rows
        mosaic = tiles.reshape(rows, cols, *tiles.shape[1:]).permute(2, 0, 3, 1, 4).flatten(3, 4).flatten(1, 2)
        shrunk = torch.nn.functional.interpolate(mosaic[None], size=thumb.shape[-2:], mode="area")[0]
        error = float((shrunk - thumb).square().mean())
        if error < best:
            best, layout = error, (rows, cols)
    return layout


@register
class InternVL(Family):
    architectures = ("InternVLForConditionalGeneration",)
    name = "internvl3"
    random_name = "internvl"
    paper_layers = 28  # InternVL3-8B's Qwen2.5-7B; InternVL3-1B's 24 layers get the same relative depth
    # In neither paper: the layer at LLaVA's relative depth (20 of 32 -> 18 of 28), tau from LLaVA-NeXT (tiles and a
    # thumbnail, like its any-resolution crops and base image), LocoRE's LLaVA-1.5 beta. Unvalidated: `neverfade tune`.
    method_defaults = {"sparc": {"layer": 18, "tau": 4.0}, "locore": {"beta": 0.15}}
    unvalidated = frozenset({"sparc", "locore"})

    def token_grid(self, config, inputs, count):
        """The tiles as on the image (the thumbnail, a shrunk copy, left out); one tile when not tiled."""
        k = tile_side(config)
        tiles = inputs["pixel_values"].shape[0]
        if tiles * k * k != count:
            return None
        rows, cols = tile_layout(inputs["pixel_values"])
        r, c = np.divmod(np.arange(rows * k * cols * k), cols * k)
        index = ((r // k) * cols + c // k) * k * k + (r % k) * k + c % k
        note = f"InternVL {rows}x{cols} tiles of {k}x{k}"
        if tiles > 1:
            note += " (rows x cols matched to the thumbnail, which is left out)"
        return TokenGrid(rows * k, cols * k, index, note)

    def pixel_split(self, inputs):
        """Tiles per image, in proportion to its image tokens: the token the batch's prompts hold most of (an image
        has at least one tile's worth, 256 in InternVL3)."""
        ids, tiles = inputs["input_ids"], inputs["pixel_values"].shape[0]
        mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        image = ids == ids[mask].mode().values
        per = (image & mask).sum(1)
        split = (per * tiles // per.sum()).tolist()
        if sum(split) != tiles or (per * tiles % per.sum()).any():
            raise ValueError(f"InternVL: {tiles} tiles do not split over image tokens {per.tolist()}")
        return split

    def random_parts(self, size):
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        from neverfade.models.random import tokenizer

        tiny, small = size == "tiny", size == "small"
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *MARKS.values()]
        tok = tokenizer(specials, 512 if tiny else 1024)
        tok = type(tok)(tokenizer_object=tok.backend_tokenizer, padding_side="left", extra_special_tokens=MARKS)
        tok.pad_token = tok.eos_token = "<|endoftext|>"
        vision = InternVLVisionConfig(  # InternViT-300M: 448 px, patch 14
            hidden_size=32 if tiny else 1024,
            intermediate_size=64 if tiny else 4096,
            num_hidden_layers=2 if tiny else 24,
            num_attention_heads=4 if tiny else 16,
            image_size=32 if tiny else 448,
            patch_size=4 if tiny else 14,
            attention_bias=not tiny,  # InternViT-300M's qkv_bias
        )
        # small: InternVL3-1B's Qwen2.5-0.5B, as its printed config shows (public repo shivangjhalani/multicoco,
        # InternVL3-1B_data.md: 896/4864/24 layers/14 heads/2 kv, vocab 151674, untied; InternViT qkv_bias); 7b:
        # InternVL3-8B's Qwen2.5-7B. Parameters, built here exactly: 938,193,024 for InternVL3-1B in a public benchmark
        # table (the hub's 1.88 GB bfloat16 file); 7,944,373,760 recorded for Lingshu-I-8B, an InternVL3-8B-shaped
        # InternVLForConditionalGeneration (InternVL3-8B's own count not found)
        text = Qwen2Config(
            hidden_size=64 if tiny else 896 if small else 3584,
            intermediate_size=128 if tiny else 4864 if small else 18944,
            num_hidden_layers=4 if tiny else 24 if small else 28,
            num_attention_heads=4 if tiny else 14 if small else 28,
            num_key_value_heads=2 if tiny else 2 if small else 4,
            vocab_size=512 if tiny else 151674,
            max_position_embeddings=4096 if tiny else 32768,
            initializer_range=0.2 if tiny else 0.02,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            pad_token_id=tok.pad_token_id,
        )
        config = InternVLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=tok.context_image_token_id,
            downsample_ratio=0.5,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=tiny,  # InternVL3's own are untied
        )
        config.image_seq_length = tile_side(config) ** 2
        px = vision.image_size[0] if isinstance(vision.image_size, list | tuple) else vision.image_size
        image_processor = GotOcr2ImageProcessorPil(  # tiny: up to 4 tiles, so 1, 2 and 2x2 tiles run in the tests
            size={"height": px, "width": px}, crop_to_patches=True, max_patches=4 if tiny else 12
        )
        if image_only("InternVLProcessor") is not None:  # where torchvision is missing, no video processor
            return config, InternVLImageOnly(image_processor, tok, config.image_seq_length, TEMPLATE)
        video = InternVLVideoProcessor()  # AutoProcessor loads one where torchvision is installed
        return config, InternVLProcessor(image_processor, tok, video, config.image_seq_length, TEMPLATE)
