"""Inputs given by path: one image file, a folder of images, or a JSONL manifest."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from neverfade.data.items import Item

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MANIFEST_SUFFIXES = {".jsonl", ".json"}


class InputError(ValueError):
    """The input as a whole cannot be read (missing, empty, malformed)."""


class ImageError(ValueError):
    """One image cannot be read; recorded for that image while the others proceed."""


def read_items(source: str | Path) -> list[Item]:
    """Items from an image file, a folder (its images, sorted, not recursive) or a JSONL manifest."""
    path = Path(source)
    if not path.exists():
        raise InputError(f"no such file or folder: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"no images in folder {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        return [Item(id=p.name, image=str(p)) for p in files]
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return read_manifest(path)
    return [Item(id=path.name, image=str(path))]


def read_manifest(path: Path) -> list[Item]:
    """A JSONL manifest: one object per line with `image` (a path, relative to the manifest's folder),
    optional `id` (default: the image path) and optional `prompt`; other fields are kept in `meta`."""
    items, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise InputError(f"{path}:{number}: each line needs an \"image\" field with a path")
        image = record.pop("image")
        item_id = str(record.pop("id", image))
        if item_id in seen:
            raise InputError(f"{path}:{number}: duplicate id {item_id!r}")
        seen.add(item_id)
        prompt = record.pop("prompt", None)
        items.append(Item(id=item_id, image=str((path.parent / image)), prompt=prompt, meta=record))
    if not items:
        raise InputError(f"{path}: the manifest lists no images")
    return items


def load_image(path: str | Path) -> Image.Image:
    """The image as RGB, or ImageError saying why not."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"no such image: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot read image {path}: {err}") from None
