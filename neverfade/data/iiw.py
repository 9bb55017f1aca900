"""IIW-400 (Garg et al. 2024, ImageInWords): 400 DOCCI images with one human-authored detailed description each.

The published `IIW-400/data.jsonl` has one JSON object a line. Fields read (the first present of each list wins):
  image name   "image/key", "image_key", "key", "image", "image_file", "file_name", "filename"
  description  "IIW", "iiw", "description", "caption", "text"
The image name is a DOCCI image key ("aar_test_04600") or a file name; ".jpg" is added when it has no extension,
and the image is `<images_dir>/<name>`. Item.id is the name without extension; meta["references"] = [description].
"""

from __future__ import annotations

import random
from pathlib import Path

from neverfade.data.coco import AnnotationError, read_jsonl
from neverfade.data.items import Item

NAME_FIELDS = ("image/key", "image_key", "key", "image", "image_file", "file_name", "filename")
TEXT_FIELDS = ("IIW", "iiw", "description", "caption", "text")


def field(path: str | Path, number: int, record: dict, names: tuple[str, ...], what: str) -> str:
    """The first of `names` that `record` holds as a non-empty string (or number), else an AnnotationError."""
    for name in names:
        value = record.get(name)
        if isinstance(value, (str, int)) and str(value).strip():
            return str(value)
    raise AnnotationError(f"{path}: line {number} has no {what} (looked for {', '.join(names)})")


def iiw400(path: str | Path, images_dir: str | Path = "", n: int | None = None, seed: int = 0) -> list[Item]:
    """The records, `n` of them drawn by `seed` (None: all), in file order."""
    items = []
    for number, record in read_jsonl(path):
        name = field(path, number, record, NAME_FIELDS, "image name")
        file_name = name if Path(name).suffix else name + ".jpg"
        items.append(
            Item(
                id=Path(name).stem if Path(name).suffix else name,
                image=str(Path(images_dir) / file_name),
                meta={"references": [field(path, number, record, TEXT_FIELDS, "description")]},
            )
        )
    if not items:
        raise AnnotationError(f"{path}: no records")
    return sample(path, items, n, seed)


def sample(path: str | Path, items: list[Item], n: int | None, seed: int) -> list[Item]:
    """`n` of `items` drawn without replacement by `seed`, in their original order; all of them when n is None."""
    if n is None:
        return items
    if n > len(items):
        raise AnnotationError(f"{path}: {n} records asked for, {len(items)} found")
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [item for i, item in enumerate(items) if i in keep]
