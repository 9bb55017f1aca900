"""Qwen3-VL: Qwen2-VL's token layout (`image_grid_thw` patches of 16 pixels merged `spatial_merge_size` x
`spatial_merge_size`, row-major, between <|vision_start|> and <|vision_end|>), with deepstack: features from early
vision layers are added to the hidden states of the image tokens in the first decoder layers. The model computes
them from `pixel_values` in the prefill, so VCD's noised branch, which re-encodes its noised pixels, gets noised
deepstack features, and PAI's image-free branch, which has no pixels and no image tokens, gets none."""

from __future__ import annotations

from neverfade.models.families.qwen2_vl import SPECIALS, TEMPLATE, Qwen2VL
from neverfade.models.family import register


@register
class Qwen3VL(Qwen2VL):
    architectures = ("Qwen3VLForConditionalGeneration",)
    name = "qwen3-vl"
    random_name = "qwen3_vl"
    # In neither paper: Qwen2-VL's values at the same relative depth (18 of 28 layers: 23 of Qwen3-VL-8B's 36),
    # unvalidated; `neverfade tune` calibrates them.
    paper_layers = 28
    method_defaults = {"sparc": {"layer": 18, "tau": 3.0}, "locore": {"beta": 0.20}}
    unvalidated = frozenset({"sparc", "locore"})
    paper = None
    step_constant = ("image_grid_thw", "video_grid_thw")  # kept by some releases, unused after the prefill
    processor_class = "Qwen3VLProcessor"

    def random_parts(self, size):
        """Tiny; small: Qwen3-VL-2B-Instruct's configuration (28 layers, deepstack after vision layers 5, 11, 17);
        7b: Qwen3-VL-8B-Instruct's (36 layers, deepstack after vision layers 8, 16, 24)."""
        import transformers

        from neverfade.models.processors import image_only
        from neverfade.models.random import tokenizer

        tiny, small = size == "tiny", size == "small"
        tok = tokenizer(SPECIALS, 512 if tiny else 1024)
        tok.pad_token = tok.eos_token = "<|endoftext|>"
        tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
        ids = {
            f"{name}_token_id": tok.convert_tokens_to_ids(f"<|{token}|>")
            for name, token in [
                ("image", "image_pad"),
                ("video", "video_pad"),
                ("vision_start", "vision_start"),
                ("vision_end", "vision_end"),
            ]
        }
        # small: Qwen/Qwen3-VL-2B-Instruct, tied embeddings; 7b: Qwen/Qwen3-VL-8B-Instruct. The 2B's numbers as public
        # ports and test fixtures copy its config.json (sgl-jax's Qwen3VLVisionConfig defaults: depth 24, width 1024,
        # 4096, deepstack 5/11/17; text 2048/6144/28 layers/16 heads/8 kv, rope 5e6, mrope 24/20/20). Parameters, as
        # public repos record the hub's safetensors metadata, each built here exactly: 2B 2,127,532,032 (language
        # 1,720,574,976, vision 406,957,056; the OpenExplorer card: 2.128B), 8B 8,767,123,696.
        text = dict(
            hidden_size=64 if tiny else 2048 if small else 4096,
            intermediate_size=128 if tiny else 6144 if small else 12288,
            num_hidden_layers=4 if tiny else 28 if small else 36,
            num_attention_heads=4 if tiny else 16 if small else 32,
            num_key_value_heads=2 if tiny else 8,
            head_dim=16 if tiny else 128,
            vocab_size=512 if tiny else 151936,
            max_position_embeddings=4096 if tiny else 262144,
            initializer_range=0.2 if tiny else 0.02,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [2, 3, 3] if tiny else [24, 20, 20],
                "mrope_interleaved": True,
            },
            pad_token_id=tok.pad_token_id,
        )
        vision = dict(
            depth=2 if tiny else 24 if small else 27,
            hidden_size=32 if tiny else 1024 if small else 1152,
            intermediate_size=64 if tiny else 4096 if small else 4304,
            num_heads=4 if tiny else 16,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=text["hidden_size"],
            num_position_embeddings=64 if tiny else 2304,
            deepstack_visual_indexes=[0, 1] if tiny else [5, 11, 17] if small else [8, 16, 24],
        )
        config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=small, **ids)
        config.pad_token_id = tok.pad_token_id
        image_processor = transformers.Qwen2VLImageProcessorPil(
            min_pixels=2 * 32 * 32 if tiny else 256 * 256,
            max_pixels=12 * 32 * 32 if tiny else 16384 * 32 * 32,
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
        )
        stand_in = image_only(self.processor_class)  # where torchvision is missing, no video processor can be built
        if stand_in is not None:
            return config, stand_in(image_processor=image_processor, tokenizer=tok, chat_template=TEMPLATE)
        video = transformers.Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
        return config, transformers.Qwen3VLProcessor(
            image_processor=image_processor, tokenizer=tok, video_processor=video, chat_template=TEMPLATE
        )
