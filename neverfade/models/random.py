"""Random-weight models of each supported family, saved like a hub checkpoint.

Two uses: small models for the tests (`size="tiny"`, built in seconds on a CPU and saved/loaded through the real
`from_pretrained` path), and real-size configurations for `neverfade bench` (`size="7b"`). The weights are random,
so the text is meaningless; the shapes, the processors and the timings are real.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
)

from neverfade.models.processors import image_only

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")

_LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>",
                  "<|vision_end|>", "<|video_pad|>"]


def _tokenizer(specials: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Please describe this image in detail.", "USER: ASSISTANT: user assistant system",
              "A photo of a cat, a dog and a red car on a street under a blue sky with clouds."]
    tok.train_from_iterator(corpus * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left")


def _llava_parts(size: str, next_: bool):
    tiny = size == "tiny"
    vision = CLIPVisionConfig(
        hidden_size=32 if tiny else 1024, intermediate_size=64 if tiny else 4096,
        num_hidden_layers=2 if tiny else 24, num_attention_heads=4 if tiny else 16,
        image_size=32 if tiny else 336, patch_size=8 if tiny else 14, projection_dim=32 if tiny else 768,
    )
    text = LlamaConfig(
        hidden_size=64 if tiny else 4096, intermediate_size=128 if tiny else 11008,
        num_hidden_layers=4 if tiny else 32, num_attention_heads=4 if tiny else 32,
        num_key_value_heads=2 if tiny else 32, vocab_size=512 if tiny else 32064,
        max_position_embeddings=4096, initializer_range=0.2 if tiny else 0.02,
    )
    tok = _tokenizer(_LLAVA_SPECIALS, 512 if tiny else 1024)
    tok.pad_token, tok.bos_token, tok.eos_token = "<pad>", "<s>", "</s>"
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    kw = dict(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
              pad_token_id=tok.pad_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default")
    size_px = vision.image_size
    if next_:
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        grid = [[size_px, size_px], [size_px, 2 * size_px], [2 * size_px, size_px]]
        config = LlavaNextConfig(image_grid_pinpoints=grid, **kw)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size_px}, crop_size={"height": size_px, "width": size_px}, image_grid_pinpoints=grid)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, chat_template=_LLAVA_TEMPLATE,
                                       patch_size=vision.patch_size, vision_feature_select_strategy="default",
                                       num_additional_image_tokens=1)
    else:
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        config = LlavaConfig(**kw)
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size_px},
                                                crop_size={"height": size_px, "width": size_px})
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=_LLAVA_TEMPLATE,
                                   patch_size=vision.patch_size, vision_feature_select_strategy="default",
                                       num_additional_image_tokens=1)
    return config, processor


def _qwen_parts(size: str, v25: bool):
    from transformers import Qwen2VLImageProcessorPil

    tiny = size == "tiny"
    tok = _tokenizer(_QWEN_SPECIALS, 512 if tiny else 1024)
    tok.pad_token = tok.eos_token = "<|endoftext|>"
    tok.add_special_tokens({"additional_special_tokens": _QWEN_SPECIALS[1:]})
    ids = {name: tok.convert_tokens_to_ids(tok_) for name, tok_ in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    head_dim = 16 if tiny else 128
    text = dict(
        hidden_size=64 if tiny else 3584, intermediate_size=128 if tiny else 18944,
        num_hidden_layers=4 if tiny else 28, num_attention_heads=4 if tiny else 28,
        num_key_value_heads=2 if tiny else 4, vocab_size=512 if tiny else 152064,
        max_position_embeddings=4096 if tiny else 32768, initializer_range=0.2 if tiny else 0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": [head_dim // 8, head_dim // 8 * 1.5, head_dim // 8 * 1.5]},
    )
    text["rope_parameters"]["mrope_section"] = [int(x) for x in text["rope_parameters"]["mrope_section"]]
    text.update(bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(depth=2 if tiny else 32, embed_dim=32 if tiny else 1280, hidden_size=32 if tiny else 1280,
                  num_heads=4 if tiny else 16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=text["hidden_size"], in_chans=3)
    if v25:
        vision.update(intermediate_size=64 if tiny else 3420, fullatt_block_indexes=[1] if tiny else [7, 15, 23, 31],
                      window_size=112)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, pad_token_id=tok.pad_token_id, **ids)
    else:
        vision.update(mlp_ratio=2 if tiny else 4, hidden_size=text["hidden_size"])  # the merger's output width
        config = Qwen2VLConfig(text_config=text, vision_config=vision, pad_token_id=tok.pad_token_id, **ids)
    pixels = 56 * 56
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels if tiny else 256 * 28 * 28, max_pixels=4 * pixels if tiny else 1280 * 28 * 28,
        patch_size=14, merge_size=2, temporal_patch_size=2)
    name = "Qwen2_5_VLProcessor" if v25 else "Qwen2VLProcessor"
    stand_in = image_only(name)  # where torchvision is missing, no video processor can be built
    if stand_in is not None:
        processor = stand_in(image_processor=image_processor, tokenizer=tok, chat_template=_QWEN_TEMPLATE)
    else:
        video = transformers.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
        processor = getattr(transformers, name)(image_processor=image_processor, tokenizer=tok,
                                                video_processor=video, chat_template=_QWEN_TEMPLATE)
    return config, processor


def random_model(family: str, size: str = "tiny", seed: int = 0, dtype=torch.float32, device="cpu"):
    """A random-weight (model, processor) of `family`, built in memory on `device` (a 7B model in seconds on a GPU;
    the same seed gives the same weights on the same kind of device)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if size not in ("tiny", "7b"):
        raise ValueError(f"unknown size {size!r}; choose tiny or 7b")
    if family.startswith("llava"):
        config, processor = _llava_parts(size, family == "llava_next")
    else:
        config, processor = _qwen_parts(size, family == "qwen2_5_vl")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor


def build_random(family: str, path: str | Path, size: str = "tiny", seed: int = 0, dtype=torch.float32) -> Path:
    """Build a random-weight model of `family` with its processor and save both under `path`."""
    model, processor = random_model(family, size, seed, dtype)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    _record_processor_class(path, processor)
    return path


def _record_processor_class(path: Path, processor) -> None:
    """Save an image-only stand-in under the real class name, as a hub checkpoint has it."""
    real = type(processor).__mro__[1].__name__ if type(processor).__module__ == image_only.__module__ else None
    if real is None:
        return
    import json

    for name in ("processor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.exists():
            data = json.loads(file.read_text())
            if "processor_class" in data:
                data["processor_class"] = real
                file.write_text(json.dumps(data, indent=2))


def cached_random(family: str) -> Path:
    """A tiny random model of `family`, built once into the user's cache directory."""
    import os

    root = Path(os.environ.get("NEVERFADE_CACHE", Path.home() / ".cache" / "neverfade")) / "random"
    path = root / f"{family}-tiny"
    if not (path / "config.json").exists():
        tmp = root / f".{family}-tiny.{os.getpid()}"
        build_random(family, tmp)
        tmp.replace(path) if not path.exists() else None
    return path
