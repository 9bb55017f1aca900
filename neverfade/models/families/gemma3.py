"""Gemma 3: a SigLIP tower whose patches are average-pooled to `mm_tokens_per_image` tokens (256, a 16 x 16 grid,
row-major), and a language model whose layers alternate sliding-window and global attention. In the prompt the
image is `<start_of_image>`, its tokens, `<end_of_image>`; `token_type_ids` marks the image tokens (they attend to
each other both ways during the prefill), so it goes with the image in PAI's image-free branch. Each kind of layer
gets its own mask (sliding or full), in generate's own loop as in the static decode loop (which builds one per
`layer_types` entry); under neverfade the sliding layers keep every key, their masks still windowed."""

from __future__ import annotations

import math

import numpy as np
from transformers import Gemma3Processor

from neverfade.models.family import Family, TokenGrid, register
from neverfade.models.processors import REPLACED

TEMPLATE = (  # the random models' chat template, Gemma's format
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MARKS = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}


class Gemma3ImageOnly(Gemma3Processor):
    """Gemma3Processor taking one image per prompt as a flat list, as the other families' processors do (Gemma 3's
    reads a flat list as all the images of one prompt), and loading the PIL image processor by its class (the auto
    classes ask for torchvision). Saved under the real class name, as a hub checkpoint has it; neverfade loads it in
    its place everywhere."""

    def __call__(self, images=None, text=None, **kwargs):
        flat = isinstance(images, list) and not any(isinstance(i, list | tuple) for i in images)
        one_each = isinstance(text, list) and all(t.count(self.boi_token) == 1 for t in text)
        if flat and one_each and len(images) == len(text) > 1:
            images = [[i] for i in images]
        return super().__call__(images=images, text=text, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, path, processor_dict=None, **kwargs):
        from transformers import AutoTokenizer
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        return [Gemma3ImageProcessorPil.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path, **kwargs)]

    def to_dict(self):
        return {**super().to_dict(), "processor_class": "Gemma3Processor"}


REPLACED["Gemma3Processor"] = Gemma3ImageOnly


@register
class Gemma3(Family):
    architectures = ("Gemma3ForConditionalGeneration",)
    name = "gemma-3"
    random_name = "gemma3"
    paper_layers = 34  # Gemma 3 4B
    # In neither paper: the layer at LLaVA's relative depth (20 of 32 = 21 of 34), LLaVA-1.5's tau (a fixed number of
    # image tokens from one resized square, as LLaVA-1.5) and LocoRE's LLaVA-1.5 beta. Unvalidated: `neverfade tune`.
    method_defaults = {"sparc": {"layer": 21, "tau": 1.5}, "locore": {"beta": 0.15}}
    unvalidated = frozenset({"sparc", "locore"})
    image_inputs = ("pixel_values", "token_type_ids")

    def token_grid(self, config, inputs, count):
        """The pooled tokens, row-major: side x side with side = sqrt(mm_tokens_per_image) (16 x 16)."""
        side = math.isqrt(config.mm_tokens_per_image)
        if side * side != config.mm_tokens_per_image or count != side * side:
            return None
        return TokenGrid(side, side, np.arange(count), f"Gemma 3 {side}x{side} pooled tokens")

    def random_weights(self, model):
        """The image projection, which Gemma 3 initialises to zero (every image token alike, the image unseen)."""
        import torch

        weight = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            weight.normal_(std=weight.shape[0] ** -0.5)

    def random_parts(self, size):
        """Tiny, or Gemma 3 4B's configuration for both small and 7b (Gemma 3 1B has no vision): its numbers as a public
        test fixture copies its config.json, and its 4,300,079,472 parameters (the hub's safetensors metadata, as public
        repos record it), built here exactly."""
        from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        from neverfade.models.random import tokenizer

        tiny = size == "tiny"
        specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *MARKS.values()]
        tok = tokenizer(specials, 512 if tiny else 1024)
        tok = type(tok)(tokenizer_object=tok.backend_tokenizer, padding_side="left", extra_special_tokens=MARKS)
        tok.pad_token, tok.eos_token, tok.bos_token = "<pad>", "<eos>", "<bos>"
        vision = SiglipVisionConfig(  # Gemma 3 4B: SigLIP so400m, 896 px, patch 14
            hidden_size=32 if tiny else 1152,
            intermediate_size=64 if tiny else 4304,
            num_hidden_layers=2 if tiny else 27,
            num_attention_heads=4 if tiny else 16,
            image_size=32 if tiny else 896,
            patch_size=4 if tiny else 14,
            vision_use_head=False,
        )
        layers = 4 if tiny else 34
        text = Gemma3TextConfig(  # Gemma 3 4B: five sliding-window layers to each global one
            hidden_size=64 if tiny else 2560,
            intermediate_size=128 if tiny else 10240,
            num_hidden_layers=layers,
            num_attention_heads=4 if tiny else 8,
            num_key_value_heads=2 if tiny else 4,
            head_dim=16 if tiny else 256,
            query_pre_attn_scalar=16 if tiny else 256,
            vocab_size=512 if tiny else 262208,
            max_position_embeddings=4096 if tiny else 131072,
            sliding_window=8 if tiny else 1024,  # tiny: shorter than the prompts, so the window matters
            layer_types=(  # tiny: SPARC's layer (2 of 4) global, so it sees the image past the window
                ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
                if tiny
                else ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(layers)]
            ),
            initializer_range=0.2 if tiny else 0.02,
            tie_word_embeddings=not tiny,  # tiny: tied, the random model repeats the prompt's special tokens
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        tokens = 16 if tiny else 256
        config = Gemma3Config(
            vision_config=vision,
            text_config=text,
            mm_tokens_per_image=tokens,
            boi_token_index=tok.convert_tokens_to_ids(MARKS["boi_token"]),
            eoi_token_index=tok.convert_tokens_to_ids(MARKS["eoi_token"]),
            image_token_index=tok.convert_tokens_to_ids(MARKS["image_token"]),
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=not tiny,
        )
        px = vision.image_size
        image_processor = Gemma3ImageProcessorPil(size={"height": px, "width": px})
        return config, Gemma3ImageOnly(image_processor, tok, chat_template=TEMPLATE, image_seq_length=tokens)
