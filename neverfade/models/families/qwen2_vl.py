"""Qwen2-VL and Qwen2.5-VL: `image_grid_thw` patches merged `spatial_merge_size` x `spatial_merge_size`, row-major.
The pixel tensor is a list of patches, each image repeated over two frames. The image sits between
<|vision_start|> and <|vision_end|> markers, which stay in PAI's image-free prompt."""

from __future__ import annotations

import numpy as np

from neverfade.models.family import Family, PaperSetup, TokenGrid, register

TEMPLATE = (  # the random models' chat template
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
    "<|video_pad|>",
]


@register
class Qwen2VL(Family):
    architectures = ("Qwen2VLForConditionalGeneration",)
    name = "qwen2-vl"
    random_name = "qwen2_vl"
    paper_layers = 28
    method_defaults = {"sparc": {"layer": 18, "tau": 3.0}, "locore": {"beta": 0.20}}
    paper = PaperSetup("the paper (its Qwen2-VL code is not public): the prompt only, in the chat template")
    image_inputs = ("pixel_values", "image_grid_thw")
    step_constant = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")  # kept by some releases, unused
    processor_class = "Qwen2VLProcessor"
    # `random_parts("small")`'s language model: Qwen/Qwen2-VL-2B-Instruct's (its vision tower is the 7B's). Its
    # config.json was not read here; its parameter count pins every weight-bearing number: 2,208,985,600 (tied lm_head
    # 151936 x 1536), as public repos record from the checkpoint, is what this builds
    small_text = dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2
    )

    def token_grid(self, config, inputs, count):
        t, h, w = (int(x) for x in inputs["image_grid_thw"][0])
        merge = config.vision_config.spatial_merge_size
        rows, cols = h // merge, w // merge
        if t * rows * cols != count:
            return None
        return TokenGrid(rows, cols, np.arange(rows * cols), f"Qwen-VL image_grid_thw {t}x{h}x{w}, merge {merge}")

    def pixel_split(self, inputs):
        """Patches per image (both frames): VCD's noise is drawn per patch element, so the frames differ."""
        return inputs["image_grid_thw"].prod(-1).tolist()

    def random_parts(self, size):
        """Tiny; small: the 2B (Qwen2.5-VL: 3B) Instruct checkpoint's configuration, tied embeddings; 7b: the 7B's
        (Qwen2-VL-7B-Instruct 8,291,375,616 and Qwen2.5-VL-7B-Instruct 8,292,166,656 parameters, the hub's safetensors
        metadata as public repos record it; built here exactly)."""
        import transformers

        from neverfade.models.processors import image_only
        from neverfade.models.random import tokenizer

        tiny = size == "tiny"
        tok = tokenizer(SPECIALS, 512 if tiny else 1024)
        tok.pad_token = tok.eos_token = "<|endoftext|>"
        tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
        ids = {
            name: tok.convert_tokens_to_ids(tok_)
            for name, tok_ in [
                ("image_token_id", "<|image_pad|>"),
                ("video_token_id", "<|video_pad|>"),
                ("vision_start_token_id", "<|vision_start|>"),
                ("vision_end_token_id", "<|vision_end|>"),
            ]
        }
        head_dim = 16 if tiny else 128
        text = dict(
            hidden_size=64 if tiny else 3584,
            intermediate_size=128 if tiny else 18944,
            num_hidden_layers=4 if tiny else 28,
            num_attention_heads=4 if tiny else 28,
            num_key_value_heads=2 if tiny else 4,
            vocab_size=512 if tiny else 152064,
            max_position_embeddings=4096 if tiny else 32768,
            initializer_range=0.2 if tiny else 0.02,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [head_dim // 8, int(head_dim // 8 * 1.5), int(head_dim // 8 * 1.5)],
            },
            bos_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        small = size == "small"
        if small:
            text.update(self.small_text, vocab_size=151936)
        vision = dict(
            depth=2 if tiny else 32,
            embed_dim=32 if tiny else 1280,
            hidden_size=32 if tiny else 1280,
            num_heads=4 if tiny else 16,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=text["hidden_size"],
            in_chans=3,
        )
        config = self.random_config(tiny, text, vision, pad_token_id=tok.pad_token_id, tie_word_embeddings=small, **ids)
        pixels = 56 * 56
        image_processor = transformers.Qwen2VLImageProcessorPil(
            min_pixels=pixels if tiny else 256 * 28 * 28,
            max_pixels=4 * pixels if tiny else 1280 * 28 * 28,
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
        )
        stand_in = image_only(self.processor_class)  # where torchvision is missing, no video processor can be built
        if stand_in is not None:
            return config, stand_in(image_processor=image_processor, tokenizer=tok, chat_template=TEMPLATE)
        video = transformers.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
        return config, getattr(transformers, self.processor_class)(
            image_processor=image_processor, tokenizer=tok, video_processor=video, chat_template=TEMPLATE
        )

    def random_config(self, tiny: bool, text: dict, vision: dict, **kw):
        from transformers import Qwen2VLConfig

        vision.update(mlp_ratio=2 if tiny else 4, hidden_size=text["hidden_size"])  # the merger's output width
        return Qwen2VLConfig(text_config=text, vision_config=vision, **kw)


@register
class Qwen2_5_VL(Qwen2VL):
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    name = "qwen2.5-vl"
    random_name = "qwen2_5_vl"
    # In neither paper: Qwen2-VL's values, unvalidated.
    unvalidated = frozenset({"sparc", "locore"})
    paper = None
    processor_class = "Qwen2_5_VLProcessor"
    # Qwen/Qwen2.5-VL-3B-Instruct's config.json, as a public notes repo mirrors it (tied, vocab 151936; vision the 7B's,
    # out 2048): 3,754,622,976 parameters (vision 668,684,288) as public repos record them, built here exactly. The 7b
    # keeps Qwen2-VL-7B's max_position_embeddings, 32768 (Qwen2.5-VL-7B's, not confirmed here, is 128000; no weight)
    small_text = dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_position_embeddings=128000,
    )

    def random_config(self, tiny, text, vision, **kw):
        from transformers import Qwen2_5_VLConfig

        vision.update(
            intermediate_size=64 if tiny else 3420,
            fullatt_block_indexes=[1] if tiny else [7, 15, 23, 31],
            window_size=112,
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **kw)
