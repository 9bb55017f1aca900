"""neverfade: inference-time methods that keep a vision-language model's visual attention from fading."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = [
    "load",
    "attach",
    "Captioner",
    "Caption",
    "Generation",
    "DEFAULT_PROMPT",
    "METHODS",
    "Method",
    "Param",
    "Flags",
    "SequenceState",
]

_LAZY = {
    "load": "neverfade.api",
    "attach": "neverfade.api",
    "Captioner": "neverfade.api",
    "Caption": "neverfade.api",
    "DEFAULT_PROMPT": "neverfade.api",
    "Generation": "neverfade.api",
    "METHODS": "neverfade.methods",
    "Method": "neverfade.engine.contract",
    "Param": "neverfade.engine.contract",
    "Flags": "neverfade.engine.contract",
    "SequenceState": "neverfade.engine.batch",
}


def __getattr__(name: str):
    """The public names, imported on first use (torch and transformers load then, not at `import neverfade`)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'neverfade' has no attribute {name!r}")
