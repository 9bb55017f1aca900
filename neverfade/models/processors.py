"""Loading a family's processor, including on machines without torchvision.

transformers 5 builds the Qwen-VL and LLaVA-OneVision processors with a video processor, and a video processor
needs torchvision.
Captioning never needs one, so where torchvision is absent we load the same processor with images and text only.
"""

from __future__ import annotations

from transformers import AutoProcessor, LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
from transformers.utils import is_torchvision_available


class Qwen2VLImageProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen3VLImageProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without its video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class LlavaOnevisionImageProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without its video processor (the keywords it saves are named, so they load back)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens,
            vision_feature_select_strategy,
            chat_template,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


IMAGE_ONLY = {
    "Qwen2VLProcessor": Qwen2VLImageProcessor,
    "Qwen2_5_VLProcessor": Qwen2_5_VLImageProcessor,
    "Qwen3VLProcessor": Qwen3VLImageProcessor,
    "LlavaOnevisionProcessor": LlavaOnevisionImageProcessor,
}


REPLACED: dict[str, type] = {}  # processor classes whose stand-in is loaded everywhere (a family module adds its own)


def image_only(cls_name: str):
    """The stand-in for a processor class: always for one in REPLACED, and where torchvision is missing for one
    that needs it (IMAGE_ONLY); else None."""
    if cls_name in REPLACED:
        return REPLACED[cls_name]
    return None if is_torchvision_available() else IMAGE_ONLY.get(cls_name)


def load_processor(path: str, processor_class: str | None = None):
    """AutoProcessor, or the image-only processor of a Qwen-VL checkpoint where torchvision is missing."""
    stand_in = image_only(processor_class or "")
    processor = (stand_in or AutoProcessor).from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return processor
