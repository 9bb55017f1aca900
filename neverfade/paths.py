"""Where neverfade keeps what it can make again: $NEVERFADE_CACHE, else ~/.cache/neverfade."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """neverfade's cache folder (not created here)."""
    return Path(os.environ.get("NEVERFADE_CACHE", Path.home() / ".cache" / "neverfade"))
