"""Tiny COCO 2014 annotation files written by the tests, with hand-checked contents."""

from __future__ import annotations

import json
from pathlib import Path

CATEGORIES = [
    "person",
    "bicycle",
    "car",
    "dog",
    "cat",
    "train",
    "cup",
    "dining table",
    "toilet",
    "sink",
    "bed",
    "teddy bear",
    "cell phone",
    "chair",
    "hot dog",
    "bird",
]


def file_name(image_id: int, split: str = "val") -> str:
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def write_coco(root: Path, images: dict[int, tuple[list[str], list[str]]], split: str = "val") -> Path:
    """Write instances_<split>2014.json and captions_<split>2014.json: image id -> (instance names, captions)."""
    root.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "x"} for i, name in enumerate(CATEGORIES)]
    ids = {name: i + 1 for i, name in enumerate(CATEGORIES)}
    entries = [{"id": i, "file_name": file_name(i, split), "width": 64, "height": 48} for i in images]
    instances = [
        {"id": n, "image_id": i, "category_id": ids[name], "bbox": [0, 0, 1, 1]}
        for n, (i, name) in enumerate((i, name) for i, (names, _) in images.items() for name in names)
    ]
    captions = [
        {"id": n, "image_id": i, "caption": text}
        for n, (i, text) in enumerate((i, t) for i, (_, texts) in images.items() for t in texts)
    ]
    (root / f"instances_{split}2014.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": entries, "annotations": instances, "categories": categories})
    )
    (root / f"captions_{split}2014.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": entries, "annotations": captions})
    )
    return root


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
