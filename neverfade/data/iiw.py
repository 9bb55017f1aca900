"""IIW-400 (Garg et al. 2024, ImageInWords): 400 DOCCI images with one human-authored detailed description each.

The published `IIW-400/data.jsonl` has one JSON object a line. Fields read (the first present of each list wins):
  image name   "image/key", "image_key", "key", "image", "image_file", "file_name", "filename"
  description  "IIW", "iiw", "description", "caption", "text"
The image name is a DOCCI image key ("aar_test_04600") or a file name; ".jpg" is added when it has no extension,
and the image is `<images_dir>/<name>`. Item.id is the name without extension; meta["references"] = [description].
"""

from __future__ import annotations

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


def iiw400(path: str | Path, images_dir: str | Path = "") -> list[Item]:
    items = []
    for number, record in read_jsonl(path):
        name = field(path, number, record, NAME_FIELDS, "image name")
        file_name = name if Path(name).suffix else name + ".jpg"
        items.append(Item(id=Path(name).stem if Path(name).suffix else name, image=str(Path(images_dir) / file_name),
                          meta={"references": [field(path, number, record, TEXT_FIELDS, "description")]}))
    if not items:
        raise AnnotationError(f"{path}: no records")
    return items
