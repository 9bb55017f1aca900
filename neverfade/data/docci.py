"""DOCCI (Onoe et al. 2024): images with one long human description each, `docci_descriptions.jsonlines`.

Fields read (the first present of each list wins):
  id           "example_id", "id"
  image file   "image_file", "image", "file_name", "filename"
  description  "description", "caption", "text"
  split        "split" (optional; "train", "test", "qual_dev", "qual_test" in the release)
The image is `<images_dir>/<image file>`; meta["references"] = [description], meta["split"] = split.
"""

from __future__ import annotations

from pathlib import Path

from neverfade.data.coco import AnnotationError, read_jsonl
from neverfade.data.iiw import field, sample
from neverfade.data.items import Item

ID_FIELDS = ("example_id", "id")
IMAGE_FIELDS = ("image_file", "image", "file_name", "filename")
TEXT_FIELDS = ("description", "caption", "text")


def docci(
    path: str | Path, images_dir: str | Path = "", split: str | None = "test", n: int | None = None, seed: int = 0
) -> list[Item]:
    """DOCCI records of `split` (None: all), `n` of them drawn by `seed` (None: all), in file order."""
    items, splits = [], set()
    for number, record in read_jsonl(path):
        record_split = record.get("split")
        splits.add(record_split)
        if split is not None and record_split != split:
            continue
        items.append(
            Item(
                id=field(path, number, record, ID_FIELDS, "example id"),
                image=str(Path(images_dir) / field(path, number, record, IMAGE_FIELDS, "image file")),
                meta={"references": [field(path, number, record, TEXT_FIELDS, "description")], "split": record_split},
            )
        )
    if not items:
        found = ", ".join(sorted(str(s) for s in splits)) or "none"
        raise AnnotationError(f"{path}: no records" + (f" of split {split!r} (splits found: {found})" if split else ""))
    return sample(path, items, n, seed)
