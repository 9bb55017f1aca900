"""Caption files as `neverfade caption` writes them: JSONL, one record per image and run.

A record needs "id" and "caption"; "error", "run", "image", "model" and "methods" are read when present. One file
may hold several runs (method settings, e.g. with --vs-baseline); each is scored on its own. A record with an error
or a null caption is skipped by every metric (counted). When an id repeats within a run (a retried image), its last
successful record counts. A torn last line (a killed run) is ignored with a warning (neverfade.jsonl).
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
    run: str | None = None

    @property
    def model(self) -> str | None:
        return next((r.get("model") for r in self.records.values()), None)

    @property
    def methods(self) -> list | None:
        return next((r.get("methods") for r in self.records.values()), None)

    def describe(self) -> dict[str, Any]:
        return {
            "captions": self.path,
            "run": self.run,
            "model": self.model,
            "methods": self.methods,
            "n_captions": len(self.records),
            "n_skipped": len(self.skipped),
        }


def method_label(methods: list | None) -> str:
    """ "sparc+locore", or "baseline" for no method."""
    return "+".join(str(m.get("name", m)) if isinstance(m, dict) else str(m) for m in methods or []) or "baseline"


def load_runs(path: str | Path) -> list[Captions]:
    """One Captions per run in the file, in order of first appearance."""
    runs: dict[str | None, Captions] = {}
    for number, record in read_jsonl(path):
        if "id" not in record:
            raise AnnotationError(f"{path}: line {number} has no 'id' field")
        run = runs.setdefault(record.get("run"), Captions(str(path), {}, run=record.get("run")))
        key, caption = str(record["id"]), record.get("caption")
        if record.get("error") or not isinstance(caption, str):
            if key not in run.records:
                run.skipped[key] = str(record.get("error") or "no caption")
            continue
        run.records[key] = record
        run.skipped.pop(key, None)
    found = [run for run in runs.values() if run.records]
    if not found:
        skipped = sum(len(run.skipped) for run in runs.values())
        raise AnnotationError(f"{path}: no record with a caption ({skipped} skipped)")
    return found


def load(path: str | Path) -> Captions:
    """The captions of a file that holds one run."""
    runs = load_runs(path)
    if len(runs) > 1:
        raise AnnotationError(
            f"{path}: holds {len(runs)} runs ({', '.join(method_label(r.methods) for r in runs)}); use load_runs"
        )
    return runs[0]
