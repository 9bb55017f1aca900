"""Caption files as `neverfade caption` writes them: JSONL, one record per image.

A record needs "id" and "caption"; "error", "image", "model" and "methods" are read when present. A record with an
error or a null caption is skipped by every metric (counted). When an id repeats (a resumed run), its last
successful record counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neverfade.data.coco import AnnotationError, read_jsonl


@dataclass
class Captions:
    path: str
    records: dict[str, dict[str, Any]]  # id -> record with a caption
    skipped: dict[str, str] = field(default_factory=dict)  # id -> why (the record's error, or "no caption")

    @property
    def model(self) -> str | None:
        return next((r.get("model") for r in self.records.values()), None)

    @property
    def methods(self) -> list | None:
        return next((r.get("methods") for r in self.records.values()), None)

    def describe(self) -> dict[str, Any]:
        return {"captions": self.path, "model": self.model, "methods": self.methods,
                "n_captions": len(self.records), "n_skipped": len(self.skipped)}


def load(path: str | Path) -> Captions:
    captions = Captions(str(path), {})
    for number, record in read_jsonl(path):
        if "id" not in record:
            raise AnnotationError(f"{path}: line {number} has no 'id' field")
        key = str(record["id"])
        caption = record.get("caption")
        if record.get("error") or not isinstance(caption, str):
            if key not in captions.records:
                captions.skipped[key] = str(record.get("error") or "no caption")
            continue
        captions.records[key] = record
        captions.skipped.pop(key, None)
    if not captions.records:
        raise AnnotationError(f"{path}: no record with a caption ({len(captions.skipped)} skipped)")
    return captions
