"""The model used when none is named: the embedded one, once it ships."""

from __future__ import annotations

from pathlib import Path

EMBEDDED = Path(__file__).resolve().parent.parent / "embedded"


def default_model() -> tuple[str, str]:
    if (EMBEDDED / "config.json").exists():
        return str(EMBEDDED), "neverfade-embedded"
    raise FileNotFoundError(
        "no embedded model ships with this build yet; pass --model (a local path, a hub id, "
        "or random:llava for a tiny random-weight model)"
    )
