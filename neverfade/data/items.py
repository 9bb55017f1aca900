"""The unit every reader yields: one image to describe, with an id unique within its dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Item:
    id: str  # unique within a dataset; the key for resuming and for joining captions with references
    image: str  # path to the image file
    prompt: str | None = None  # per-item prompt (manifests, POPE questions); None means the run's prompt
    meta: dict[str, Any] = field(default_factory=dict)  # reader-specific extras (references, objects, ...)
