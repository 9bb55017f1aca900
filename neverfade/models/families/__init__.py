"""The supported model families, one module each in this package, and what methods may know about the model.

Each module here defines a `neverfade.models.family.Family` subclass decorated with `@register`; importing this
package imports every module in it (`discover`), so adding a family is adding a module. The registry is keyed by
the transformers class name (as pyvene's model cards are). A method never knows which model it runs on: it asks
`ModelInfo` for the family's defaults of its own parameters, and `ModelInfo.family` for the family's inputs.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from neverfade.models.families.llava import VICUNA_V1
from neverfade.models.family import FAMILIES, Family, PaperSetup, TokenGrid, register

__all__ = [
    "FAMILIES",
    "VICUNA_V1",
    "Family",
    "ModelInfo",
    "PaperSetup",
    "TokenGrid",
    "UnsupportedModel",
    "check_supported",
    "discover",
    "families",
    "family_of",
    "model_info",
    "register",
    "text_attention_modules",
]


def discover() -> None:
    """Import every module of this package (each registers its families); modules already imported are kept."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def families() -> list[Family]:
    """Each family once, in registration order."""
    return list(dict.fromkeys(FAMILIES.values()))


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


discover()
