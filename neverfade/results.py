"""Caption results as JSONL, safe to interrupt: each batch's records are appended, flushed and fsynced together,
and a torn last line left by a killed run is cut off before the next run appends."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


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
    """Append-only results with resume: `done` holds the (id, run) keys already recorded."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = read_records(self.path)
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
