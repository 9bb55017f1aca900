"""LLaVA-1.5 (and the embedded model): CLIP patches of one square crop, (image_size / patch_size)^2 tokens,
row-major (24 x 24 for LLaVA-1.5-7B, 12 x 12 for the embedded model)."""

from __future__ import annotations

import numpy as np

from neverfade.models.family import Family, PaperSetup, TokenGrid, register

# LLaVA's `vicuna_v1` conversation, as the SPARC authors' dataset_loader.py builds it (the tokenizer adds <s>)
VICUNA_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: {image}\n{prompt} ASSISTANT:"
)

TEMPLATE = (  # the random models' chat template
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def side(config) -> int:
    """Patches along a side of the vision tower's square input."""
    return config.vision_config.image_size // config.vision_config.patch_size


def random_llava_parts(size: str):
    """(vision config, text config, tokenizer, LLaVA config keywords) of a random LLaVA-style model: tiny, or
    LLaVA-1.5-7B's configuration for both small and 7b (the smallest LLaVA-1.5 and LLaVA-NeXT checkpoints are 7B):
    7,063,427,072 parameters, as a public audit of llava-hf/llava-1.5-7b-hf's safetensors headers counts them, built
    here exactly (LLaVA-NeXT adds its 4096 image_newline: llava-v1.6-vicuna-7b, 7.06B on the hub)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from neverfade.models.random import tokenizer

    tiny = size == "tiny"
    vision = CLIPVisionConfig(
        hidden_size=32 if tiny else 1024,
        intermediate_size=64 if tiny else 4096,
        num_hidden_layers=2 if tiny else 24,
        num_attention_heads=4 if tiny else 16,
        image_size=32 if tiny else 336,
        patch_size=8 if tiny else 14,
        projection_dim=32 if tiny else 768,
    )
    text = LlamaConfig(
        hidden_size=64 if tiny else 4096,
        intermediate_size=128 if tiny else 11008,
        num_hidden_layers=4 if tiny else 32,
        num_attention_heads=4 if tiny else 32,
        num_key_value_heads=2 if tiny else 32,
        vocab_size=512 if tiny else 32064,
        max_position_embeddings=4096,
        initializer_range=0.2 if tiny else 0.02,
    )
    tok = tokenizer(["<pad>", "<s>", "</s>", "<image>"], 512 if tiny else 1024)
    tok.pad_token, tok.bos_token, tok.eos_token = "<pad>", "<s>", "</s>"
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    kw = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return vision, text, tok, kw


@register
class Llava(Family):
    architectures = ("LlavaForConditionalGeneration",)
    name = "llava-1.5"
    random_name = "llava"
    paper_layers = 32
    method_defaults = {"sparc": {"layer": 20, "tau": 1.5}, "locore": {"beta": 0.15}}
    paper = PaperSetup(
        "the authors' code: LLaVA's codebase, float16, vicuna_v1, image_aspect_ratio pad",
        "float16",
        VICUNA_V1,
        pad_to_square=True,
    )
    image_inputs = ("pixel_values", "image_sizes")
    step_constant = ("image_sizes",)  # image metadata some releases keep passing after the prefill, unused there

    def token_grid(self, config, inputs, count):
        n = side(config)
        if n * n == count:
            return TokenGrid(n, n, np.arange(count), f"LLaVA {n}x{n} patches")
        return None

    def model_view(self, image, processor):
        """LLaVA-1.5's processor crops the centre square."""
        if getattr(getattr(processor, "image_processor", None), "do_center_crop", 0):
            n = min(image.size)
            left, top = (image.width - n) // 2, (image.height - n) // 2
            return image.crop((left, top, left + n, top + n))
        return image

    def square_padding(self, image_processor):
        """LLaVA's own image processor with `do_pad`: the image padded to a square with the mean colour, then resized
        and cropped as the checkpoint's processor does (LLaVA-1.5's image_aspect_ratio "pad")."""
        from transformers import LlavaImageProcessorPil

        return LlavaImageProcessorPil.from_dict({**image_processor.to_dict(), "do_pad": True})

    def random_parts(self, size):
        from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaProcessor

        vision, _, tok, kw = random_llava_parts(size)
        px = vision.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            chat_template=TEMPLATE,
            patch_size=vision.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        return LlavaConfig(**kw), processor
