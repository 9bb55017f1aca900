"""Caption results as JSONL, safe to interrupt: each batch's records are appended, flushed and fsynced together,
and a torn last line left by a killed run is cut off before the next run appends.

A run of several processes (torchrun) writes one part file per rank next to the output, `OUT.parts/rank-RRRRR-of-
WWWWW.jsonl`; `merge_parts` folds them into OUT once every rank is done."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record; a torn (unterminated or unparsable) last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines[:-1], 1):  # the part after the last newline is torn or empty
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON record; is this a neverfade results file?") from None
    return records


class ResultsFile:
    """Append-only results with resume: `records` holds what `path` and the files in `also` already hold, `done`
    their (id, run) keys. Only `path` is appended to."""

    def __init__(self, path: str | Path, also: Iterable[str | Path] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = [r for p in [self.path, *(Path(a) for a in also if Path(a) != self.path)]
                        for r in read_records(p)]
        self.done = {(r.get("id"), r.get("run")) for r in self.records}
        self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not lines:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records.append(r)
            self.done.add((r.get("id"), r.get("run")))


def parts_folder(out: str | Path) -> Path:
    return Path(f"{out}.parts")


def part_path(out: str | Path, rank: int, world_size: int) -> Path:
    """Where rank `rank` of `world_size` appends its records for the output `out`."""
    return parts_folder(out) / f"rank-{rank:05d}-of-{world_size:05d}.jsonl"


def part_files(out: str | Path) -> list[Path]:
    """Every part file present for `out`, of any world size."""
    folder = parts_folder(out)
    return sorted(folder.glob("rank-*-of-*.jsonl")) if folder.is_dir() else []


def merge_parts(out: str | Path, order: Callable[[dict[str, Any]], Any]) -> int:
    """Fold every part file into `out`: each (id, run) once (a record without error wins over one with, a later
    one over an earlier one), sorted by `order` (stable), written to a temporary file and put in place with
    os.replace; the parts are removed only once the new `out` is on disk. Returns the number of records in `out`.
    A crash at any point leaves `out` and the parts as they were, or the merged `out` beside the parts, which a
    rerun merges again to the same result."""
    out, parts = Path(out), part_files(out)
    if not parts:
        return 0
    merged: dict[tuple, dict[str, Any]] = {}
    for path in [out, *parts]:
        for r in read_records(path):
            key = (r.get("id"), r.get("run"))
            if key not in merged or r.get("error") is None or merged[key].get("error") is not None:
                merged[key] = r
    temporary = out.with_name(out.name + ".merging")
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(merged.values(), key=order))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, out)
    _fsync_folder(out.parent)
    for path in parts:
        path.unlink()
    try:
        parts_folder(out).rmdir()
    except OSError:  # something else lives there; leave it
        pass
    return len(merged)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
