"""Inputs given by path: one image file, a folder of images, or a JSONL manifest."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from neverfade.data.items import Item
from neverfade.jsonl import BadLine, read_jsonl

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MANIFEST_SUFFIXES = {".jsonl", ".json"}


class InputError(ValueError):
    """The input as a whole cannot be read (missing, empty, malformed)."""


class ImageError(ValueError):
    """One image cannot be read; recorded for that image while the others proceed."""


class ImageTooLarge(ImageError):
    """The image has more pixels than is safe to decode."""


def read_items(source: str | Path) -> list[Item]:
    """Items from an image file, a folder (its images, sorted, not recursive) or a JSONL manifest."""
    path = Path(source)
    if not path.exists():
        raise InputError(f"no such file or folder: {path}")
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()  # a broken link is listed, to be recorded as an error
            if (p.is_file() or p.is_symlink() and not p.exists()) and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise InputError(f"no images in folder {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        return [Item(id=p.name, image=str(p)) for p in files]
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return read_manifest(path)
    return [Item(id=path.name, image=str(path))]


def read_manifest(path: Path) -> list[Item]:
    """A JSONL manifest (read by neverfade.jsonl's policy): one object per line with `image` (a path, relative to
    the manifest's folder), optional `id` (default: the image path) and optional `prompt`; other fields are kept in
    `meta`."""
    items, seen = [], set()
    try:
        records = list(read_jsonl(path))  # a torn last line is ignored with a warning
    except BadLine as err:
        raise InputError(str(err)) from None
    for number, record in records:
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise InputError(f'{path}:{number}: each line needs an "image" field with a path')
        image = record.pop("image")
        item_id = str(record.pop("id", image))
        if item_id in seen:
            raise InputError(f"{path}:{number}: duplicate id {item_id!r}")
        seen.add(item_id)
        prompt = record.pop("prompt", None)
        if prompt is not None and not isinstance(prompt, str):
            raise InputError(f'{path}:{number}: "prompt" must be a text, got {json.dumps(prompt)}')
        if prompt is not None and not prompt.strip():
            raise InputError(f"{path}:{number}: empty prompt")
        items.append(Item(id=item_id, image=str(path.parent / image), prompt=prompt, meta=record))
    if not items:
        raise InputError(f"{path}: the manifest lists no images")
    return items


def load_image(source: str | Path | bytes) -> Image.Image:
    """The image (a path, or an image file's bytes) as RGB, or ImageError saying why not. Images beyond PIL's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS, twice over) are refused (ImageTooLarge). The one loader of the
    command line and the demo."""
    path = "the uploaded file" if isinstance(source, bytes) else source
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))  # upright, as a photo viewer shows it
    except FileNotFoundError:
        raise ImageError(f"no such image: {path}") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image too large {path}: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot read image {path}: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the model's processor would make it: transparency composited onto white (as transformers'
    convert_to_rgb does), 16-bit greyscale scaled to 8 bits (PIL's convert would clip it), CMYK, palette and
    greyscale through PIL's convert."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        image = image.point(lambda v: v / 257, "F").convert("L")  # 0..65535 -> 0..255
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")
