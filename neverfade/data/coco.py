"""COCO 2014: the annotation files (instances_*.json, captions_*.json) and the papers' 500-image sample of val2014.

Layout expected: `<annotations>/captions_val2014.json`, `<annotations>/instances_val2014.json` (and the train files
where a metric wants them), images under `<images>/` named as the annotation files' `file_name`
(COCO_val2014_000000123456.jpg).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from neverfade import jsonl
from neverfade.data.items import Item
from neverfade.errors import UserError


class AnnotationError(UserError):
    """A missing or malformed annotation or reference file; the message names the file and the fault."""


def read_json(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object from `path` holding the keys `required`, or an AnnotationError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object, found {type(data).__name__}")
    missing = [key for key in required if key not in data]
    if missing:
        raise AnnotationError(f"{path}: not a COCO annotation file (no {', '.join(repr(k) for k in missing)} key)")
    return data


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each line, by neverfade.jsonl's policy (a torn last line is ignored with a
    warning); AnnotationError for a missing file, a line that is not JSON and one that is not a JSON object."""
    if not Path(path).is_file():
        raise AnnotationError(f"{path}: no such file")
    try:
        for number, record in jsonl.read_jsonl(path):
            if not isinstance(record, dict):
                raise AnnotationError(f"{path}: line {number} is not a JSON object")
            yield number, record
    except jsonl.BadLine as err:
        raise AnnotationError(f"{path}: line {err.number} is {err.why}") from None


def _entries(path: Path, data: dict, key: str, read: Callable[[dict], Any]) -> Iterator[Any]:
    if not isinstance(data[key], list):
        raise AnnotationError(f"{path}: '{key}' should be a list, found {type(data[key]).__name__}")
    for i, entry in enumerate(data[key]):
        try:
            yield read(entry)
        except KeyError as err:
            raise AnnotationError(f"{path}: {key}[{i}] has no {err} field") from None
        except (TypeError, ValueError) as err:
            raise AnnotationError(f"{path}: {key}[{i}] is malformed ({err})") from None


def load_instances(path: str | Path) -> tuple[dict[int, str], dict[int, set[str]]]:
    """(image id -> file name, image id -> the category names of its instances) from an instances_*.json file."""
    path = Path(path)
    data = read_json(path, ("images", "annotations", "categories"))
    names = dict(_entries(path, data, "categories", lambda c: (int(c["id"]), str(c["name"]))))
    files = dict(_entries(path, data, "images", lambda im: (int(im["id"]), str(im["file_name"]))))
    objects: dict[int, set[str]] = {i: set() for i in files}
    for image_id, category in _entries(path, data, "annotations", lambda a: (int(a["image_id"]), a["category_id"])):
        if category not in names:
            raise AnnotationError(f"{path}: an annotation names category_id {category}, which 'categories' lacks")
        objects.setdefault(image_id, set()).add(names[category])
    return files, objects


def load_captions(path: str | Path) -> tuple[dict[int, str], dict[int, list[str]]]:
    """(image id -> file name, image id -> its reference captions) from a captions_*.json file."""
    path = Path(path)
    data = read_json(path, ("images", "annotations"))
    files = dict(_entries(path, data, "images", lambda im: (int(im["id"]), str(im["file_name"]))))
    captions: dict[int, list[str]] = {i: [] for i in files}
    for image_id, caption in _entries(path, data, "annotations", lambda a: (int(a["image_id"]), str(a["caption"]))):
        captions.setdefault(image_id, []).append(caption)
    return files, captions


def coco2014(
    annotations_dir: str | Path, images_dir: str | Path, n: int | None = 500, seed: int = 0, split: str = "val"
) -> list[Item]:
    """COCO `split`2014 images, `n` of them drawn uniformly without replacement by `seed` (None: all), by id.

    Item.id is the COCO image id as a string; meta holds `coco_id` (int) and `references` (the human captions).
    """
    path = Path(annotations_dir) / f"captions_{split}2014.json"
    files, captions = load_captions(path)
    ids = sorted(files)
    if n is not None:
        if n > len(ids):
            raise AnnotationError(f"{path}: {n} images asked for, the file lists {len(ids)}")
        ids = sorted(random.Random(seed).sample(ids, n))
    images_dir = Path(images_dir)
    return [
        Item(id=str(i), image=str(images_dir / files[i]), meta={"coco_id": i, "references": captions[i]}) for i in ids
    ]
