"""Per-family facts, as data, keyed by the transformers class name (as pyvene's model cards are).

A method never knows which model it runs on: it asks `ModelInfo` for the family's defaults of its own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PaperSetup:
    """How the SPARC authors ran a family (`paper=True`, `--paper`): weights' dtype, prompt format, image padding."""
    source: str
    dtype: str | None = None  # None: the authors do not say; the usual default stays
    conversation: str | None = None  # the whole prompt, with {image} and {prompt}; None: the checkpoint's template
    pad_to_square: bool = False  # LLaVA-1.5's image_aspect_ratio "pad": a square, filled with the mean colour


# LLaVA's `vicuna_v1` conversation, as the authors' dataset_loader.py builds it (the tokenizer adds <s>)
VICUNA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions. USER: {image}\n{prompt} ASSISTANT:")


@dataclass(frozen=True)
class Family:
    name: str
    paper_layers: int  # depth of the model the paper's defaults were tuned on (7B)
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    unvalidated: frozenset[str] = frozenset()  # methods whose defaults here are our extrapolation, not a paper's
    paper: PaperSetup | None = None  # None: the SPARC authors did not run this family


FAMILIES: dict[str, Family] = {
    "LlavaForConditionalGeneration": Family(
        "llava-1.5", 32, {"sparc": {"layer": 20, "tau": 1.5}, "locore": {"beta": 0.15}},
        paper=PaperSetup("the authors' code: LLaVA's codebase, float16, vicuna_v1, image_aspect_ratio pad", "float16",
                         VICUNA_V1, pad_to_square=True)),
    # LocoRE's paper has no LLaVA-NeXT: LLaVA-1.5's gain, unvalidated.
    "LlavaNextForConditionalGeneration": Family(
        "llava-next", 32, {"sparc": {"layer": 20, "tau": 4.0}, "locore": {"beta": 0.15}},
        unvalidated=frozenset({"locore"}),
        paper=PaperSetup("the authors' code: LLaVA's codebase, float16, vicuna_v1, anyres", "float16", VICUNA_V1)),
    "Qwen2VLForConditionalGeneration": Family(
        "qwen2-vl", 28, {"sparc": {"layer": 18, "tau": 3.0}, "locore": {"beta": 0.20}},
        paper=PaperSetup("the paper (its Qwen2-VL code is not public): the prompt only, in the chat template")),
    # In neither paper: Qwen2-VL's values, unvalidated.
    "Qwen2_5_VLForConditionalGeneration": Family(
        "qwen2.5-vl", 28, {"sparc": {"layer": 18, "tau": 3.0}, "locore": {"beta": 0.20}},
        unvalidated=frozenset({"sparc", "locore"})),
}


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    """What methods may know about the model they are attached to."""

    family: Family
    num_layers: int
    image_token_id: int

    def default(self, method: str, param: str) -> Any:
        """The family's default for a method parameter, or None. Layer indices scale with depth:
        a model as deep as the paper's gets the paper's layer; a shallower or deeper one the same relative depth."""
        value = self.family.method_defaults.get(method, {}).get(param)
        if value is not None and param == "layer":
            value = min(self.num_layers - 1, round(value * self.num_layers / self.family.paper_layers))
        return value


def family_of(architecture: str) -> Family:
    family = FAMILIES.get(architecture)
    if family is None:
        supported = ", ".join(f"{f.name} ({c})" for c, f in FAMILIES.items())
        raise UnsupportedModel(f"{architecture} is not supported; supported architectures: {supported}")
    return family


def check_supported(config) -> Family:
    """The checkpoint's family, from its config; refuses an unsupported architecture before the weights load."""
    names = list(getattr(config, "architectures", None) or [])
    return family_of(next((n for n in names if n in FAMILIES), names[0] if names else type(config).__name__))


def model_info(model) -> ModelInfo:
    family = family_of(type(model).__name__)
    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index
    return ModelInfo(family, config.get_text_config().num_hidden_layers, int(image_token_id))


def text_attention_modules(model) -> list:
    """The self-attention module of each language-model layer, in order."""
    return [layer.self_attn for layer in model.get_decoder().layers]
