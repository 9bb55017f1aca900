"""The embedded default model: a small LLaVA (CLIP-style vision tower, MLP projector, Llama decoder) built from code.

`build_processor(texts)` trains a byte-level BPE tokenizer and wraps it, with a PIL CLIP image processor and a
LLaVA-1.5-style chat template, in a `LlavaProcessor`; `build_model(processor)` makes the untrained
`LlavaForConditionalGeneration`. The trained weights ship in `neverfade/embedded/` (`embedded_model_path()`).
"""

from __future__ import annotations

from pathlib import Path

from .generator import IMAGE_SIZE

PATCH_SIZE = 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS dropped ("default" feature selection)
PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>")
VOCAB_SIZE = 1024
# Renders [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}] as
# "<s>USER: <image>\n... ASSISTANT:"; an assistant turn is " text</s>". Content may also be a plain string.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}ASSISTANT: {% elif message['role'] == 'user' %}USER: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Architecture (see docs/embedded.md).
VISION = dict(hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=4)
TEXT = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)


def embedded_model_path() -> Path:
    """The packaged model directory, for `from_pretrained`."""
    return Path(__file__).resolve().parent.parent / "embedded"


def train_tokenizer(texts, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`, with SPECIAL_TOKENS as ids 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def build_processor(texts, vocab_size: int = VOCAB_SIZE):
    """LlavaProcessor: BPE tokenizer trained on `texts` (left padding), 192-pixel CLIP PIL image processor."""
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pad, bos, eos, image = SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(texts, vocab_size),
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        image_token=image,
        extra_special_tokens=[image],
        padding_side="left",
        model_max_length=1024,
    )
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


def build_model(processor, **text_overrides):
    """An untrained LlavaForConditionalGeneration sized for CPU use, matching `processor`'s tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION)
    text = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **{**TEXT, **text_overrides},
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=IMAGE_TOKENS,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.update(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=400,
        do_sample=False,
    )
    return model
