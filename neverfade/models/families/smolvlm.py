"""SmolVLM: a SigLIP tower whose patches are pixel-shuffled `scale_factor` x `scale_factor` into one token each, and
image splitting. An image larger than one crop is resized to whole crops, split into rows x cols crops, and followed
by the whole image shrunk to one crop (the global view); a smaller one is one crop. In the prompt each crop is
`<fake_token_around_image><row_r_col_c>` and its tokens, each row of crops ends with a newline, and the global view
comes last after `<global-img>`. All of them are image tokens (SPARC's, PAI's and the probes' masks); the markers
stay in PAI's image-free prompt. `pixel_values` is (prompts, crops, 3, H, W), with all-zero crops padding a prompt
that has fewer crops than the batch's longest (the model skips them, so VCD leaves them zero)."""

from __future__ import annotations

import numpy as np
from transformers import SmolVLMProcessor
from transformers.processing_utils import ProcessorMixin

from neverfade import compat
from neverfade.models.family import Family, TokenGrid, register
from neverfade.models.processors import REPLACED

TEMPLATE = (  # the random models' chat template, SmolVLM's format
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
CROP_GAP = 2  # tokens between two crops of a row: <fake_token_around_image><row_r_col_c>; a new row adds a newline


class SmolVLMImageOnly(SmolVLMProcessor):
    """SmolVLMProcessor for images: without its video processor, which needs torchvision, and num2words, which only
    videos use; and taking one image per prompt as a flat list, as the other families' processors do (SmolVLM's
    reads a flat list as all the images of one prompt). Saved under the real class name, as a hub checkpoint has it;
    neverfade loads it in its place everywhere."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        self.image_seq_len = image_seq_len
        ProcessorMixin.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, **kwargs):
        flat = isinstance(images, list) and not any(isinstance(i, list | tuple) for i in images)
        one_each = isinstance(text, list) and all(t.count(self.image_token) == 1 for t in text)
        if flat and one_each and len(images) == len(text) > 1:
            images = [[i] for i in images]
        return super().__call__(images=images, text=text, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, path, processor_dict=None, **kwargs):
        """The image processor by its class (not through the auto classes, see compat) and the tokenizer."""
        from transformers import AutoTokenizer

        return [
            compat.smolvlm_image_processor().from_pretrained(path, **kwargs),
            AutoTokenizer.from_pretrained(path, **kwargs),
        ]

    def to_dict(self):
        return {**super().to_dict(), "processor_class": "SmolVLMProcessor"}


REPLACED["SmolVLMProcessor"] = SmolVLMImageOnly


def crop_side(config) -> int:
    """Tokens along a side of one crop."""
    vision = config.vision_config
    return vision.image_size // vision.patch_size // config.scale_factor


@register
class SmolVLM(Family):
    architectures = ("SmolVLMForConditionalGeneration",)
    name = "smolvlm"
    random_name = "smolvlm"
    paper_layers = 30  # SmolVLM-256M's SmolLM2-135M; SmolVLM-2.2B's 24 layers get the same relative depth
    # In neither paper: the layer at LLaVA's relative depth (20 of 32), tau from LLaVA-NeXT (crops and a global view,
    # like its any-resolution tiles and base image), LocoRE's LLaVA-1.5 beta. Unvalidated: `neverfade tune`.
    method_defaults = {"sparc": {"layer": 19, "tau": 4.0}, "locore": {"beta": 0.15}}
    unvalidated = frozenset({"sparc", "locore"})
    image_inputs = ("pixel_values", "pixel_attention_mask")

    def token_grid(self, config, inputs, count):
        """The crops tiled as on the image (the global view, a shrunk copy, left out); one crop when not split."""
        k = crop_side(config)
        where = np.flatnonzero(np.asarray(inputs["input_ids"][0]) == config.image_token_id)
        runs = np.split(where, np.flatnonzero(np.diff(where) > 1) + 1)
        if len(where) != count or any(len(r) != k * k for r in runs):
            return None
        if len(runs) == 1:
            return TokenGrid(k, k, np.arange(count), f"SmolVLM one crop {k}x{k}")
        gaps = np.array([b[0] - a[-1] - 1 for a, b in zip(runs[:-2], runs[1:-1])])
        if not np.isin(gaps, (CROP_GAP, CROP_GAP + 1)).all():
            return None
        rows = 1 + int((gaps == CROP_GAP + 1).sum())
        cols = (len(runs) - 1) // rows
        if rows * cols != len(runs) - 1:
            return None
        r, c = np.divmod(np.arange(rows * k * cols * k), cols * k)
        index = ((r // k) * cols + c // k) * k * k + (r % k) * k + c % k
        return TokenGrid(
            rows * k, cols * k, index, f"SmolVLM {rows}x{cols} crops of {k}x{k} (the global view left out)"
        )

    def pixel_padding(self, inputs):
        """The all-zero crops that pad a prompt's crops to the batch's most: the model skips exactly these."""
        pixels = inputs["pixel_values"]
        return (pixels == 0).flatten(2).all(-1)[..., None, None, None]

    def random_parts(self, size):
        """Tiny, or SmolVLM-256M's configuration for both small and 7b (the family's smallest): its 256,484,928
        parameters (the hub's metadata for SmolVLM-256M-Instruct, as public repos record it) built here exactly, untied
        embeddings; rope_theta and max_position_embeddings (no weight) not confirmed."""
        from transformers import LlamaConfig, SmolVLMConfig, SmolVLMVisionConfig

        from neverfade.models.random import tokenizer

        tiny = size == "tiny"
        rows = 3 if tiny else 4  # most crops along a side: `size` / `max_image_size`
        specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>"]
        specials += ["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
        tok = tokenizer(specials, 512 if tiny else 1024)
        tok.pad_token = tok.eos_token = "<|endoftext|>"
        tok.add_special_tokens({"additional_special_tokens": specials[1:]})
        vision = SmolVLMVisionConfig(  # SmolVLM-256M: SigLIP base, 512 px, patch 16
            hidden_size=32 if tiny else 768,
            intermediate_size=64 if tiny else 3072,
            num_hidden_layers=2 if tiny else 12,
            num_attention_heads=4 if tiny else 12,
            image_size=32 if tiny else 512,
            patch_size=4 if tiny else 16,
        )
        text = LlamaConfig(  # SmolLM2-135M
            hidden_size=64 if tiny else 576,
            intermediate_size=128 if tiny else 1536,
            num_hidden_layers=4 if tiny else 30,
            num_attention_heads=4 if tiny else 9,
            num_key_value_heads=2 if tiny else 3,
            vocab_size=512 if tiny else 49280,
            max_position_embeddings=4096 if tiny else 8192,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0 if tiny else 100000.0},
            initializer_range=0.2 if tiny else 0.02,
            pad_token_id=tok.pad_token_id,
        )
        scale = 2 if tiny else 4
        config = SmolVLMConfig(
            vision_config=vision,
            text_config=text,
            scale_factor=scale,
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            pad_token_id=tok.pad_token_id,
        )
        image_processor = compat.smolvlm_image_processor()(
            size={"longest_edge": rows * vision.image_size},
            max_image_size={"longest_edge": vision.image_size},
            do_image_splitting=True,
        )
        seq = crop_side(config) ** 2
        return config, SmolVLMImageOnly(image_processor, tok, image_seq_len=seq, chat_template=TEMPLATE)
