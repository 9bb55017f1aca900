"""Caption results as JSONL, safe to interrupt: each batch's records are appended, flushed and fsynced together,
and a torn last line left by a killed run is cut off before the next run appends.

A file is written only by the run that holds its lock (an advisory flock, taken when it is opened and held until
it is closed): a second run on the same file refuses at once. Only a file that is a results file (every complete
line a JSON object with the record keys; a torn last line that begins like one) is appended to; anything else is
refused and left as it is.

A run of several processes (torchrun) writes one part file per rank next to the output, `OUT.parts/rank-RRRRR-of-
WWWWW.jsonl`; `merge_parts` folds them into OUT once every rank is done. It also settles records that a rerun made
again (an error retried, an item changed): the file then holds one record per (id, run)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from neverfade.jsonl import BadLine, parse_lines

RECORD_KEYS = ("id", "run")


class NotResults(ValueError):
    """The file is not a results file, so it is not written to."""


class Locked(OSError):
    """Another run holds the file's lock."""


def read_records(path: str | Path, keys: tuple[str, ...] = RECORD_KEYS) -> list[dict[str, Any]]:
    """Every complete record, read by neverfade.jsonl's policy (a torn last line is ignored with a warning); a whole
    record short of its newline is left out too, as ResultsFile cuts it off and the run writes it again. Raises
    NotResults for anything else: a line that is not a JSON object holding `keys`, or a last line that does not
    begin like one."""
    path = Path(path)
    if not path.exists():
        return []
    if path.is_dir():
        raise NotResults(f"{path} is a folder, not a results file")
    data = path.read_bytes()
    last = data.count(b"\n") + 1  # the number of the part after the last newline, blank when the file ends in one

    def refuse(number: int) -> NotResults:
        return NotResults(
            f"{path}:{number}: not a neverfade results record (a JSON object with "
            f"{', '.join(repr(k) for k in keys)}); refusing to write to this file"
        )

    tail = data[data.rfind(b"\n") + 1 :].lstrip()
    if tail and not tail.startswith(b"{"):
        raise refuse(last)
    records = []
    try:
        for number, record in parse_lines(io.BytesIO(data), path):
            if not (isinstance(record, dict) and all(k in record for k in keys)):
                raise refuse(number)
            if number != last:
                records.append(record)
    except BadLine as err:
        raise refuse(err.number) from None
    return records


def lock(path: str | Path, shared: bool = False):
    """`path` (created when missing) opened for appending and locked for as long as the file object is open; Locked
    when another process holds it (`shared`: a lock several processes can hold at once, as the shards of one run
    do, but not beside an exclusive one). The lock follows the name: when another run put a new file in its place
    (merge_parts) after this one opened it, the new file is the one locked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "ab")  # noqa: SIM115 (returned to the caller, who holds the lock while it is open)
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(f.fileno())
            f.close()
            raise Locked(f"{path} is being written by another neverfade run{holder}; wait for it to finish") from None
        except BaseException:
            f.close()
            raise
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()  # replaced or removed between open and flock: lock the file that is there now


def _lock_holder(fd: int) -> str:
    """ " (pid N)" for the process holding a flock on the file (Linux /proc/locks), "" when unknown."""
    inode = os.fstat(fd).st_ino
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and "->" not in fields and fields[-3].endswith(f":{inode}"):
                return f" (pid {fields[-4]})"
    except OSError:
        pass
    return ""


class ResultsFile:
    """Append-only results with resume, locked while open (`close`, or use it as a context manager): `records`
    holds what `path` and the files in `also` already hold. Only `path` is appended to."""

    def __init__(self, path: str | Path, also: Iterable[str | Path] = (), keys: tuple[str, ...] = RECORD_KEYS):
        self.path = Path(path)
        others = [r for a in also if Path(a) != self.path for r in read_records(a, keys)]  # checked before creating
        self._file = lock(self.path)  # created empty when missing; an existing file is only opened
        try:
            self.records = read_records(self.path, keys) + others
            self._cut_torn_tail()
        except BaseException:
            self.close()
            raise

    def _cut_torn_tail(self) -> None:
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            self._file.truncate(keep)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        lines = "".join(_line(r) for r in records)
        if not lines:
            return
        self._file.write(lines.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.extend(records)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def best_records(
    records: Iterable[dict[str, Any]],
    score: Callable[[dict[str, Any]], Any] | None = None,
    keys: tuple[str, ...] = RECORD_KEYS,
) -> dict[tuple, dict[str, Any]]:
    """One record per key: of two, the one `score` ranks higher (default: one without error over one with), the
    later one on a tie."""
    score = score or (lambda r: r.get("error") is None)
    best: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = tuple(r.get(k) for k in keys)
        if key not in best or score(r) >= score(best[key]):
            best[key] = r
    return best


def parts_folder(out: str | Path) -> Path:
    return Path(f"{out}.parts")


def part_path(out: str | Path, rank: int, world_size: int) -> Path:
    """Where rank `rank` of `world_size` appends its records for the output `out`."""
    return parts_folder(out) / f"rank-{rank:05d}-of-{world_size:05d}.jsonl"


def part_files(out: str | Path) -> list[Path]:
    """Every part file present for `out`, of any world size."""
    folder = parts_folder(out)
    return sorted(folder.glob("rank-*-of-*.jsonl")) if folder.is_dir() else []


def merge_parts(
    out: str | Path, order: Callable[[dict[str, Any]], Any], score: Callable[[dict[str, Any]], Any] | None = None
) -> int:
    """Fold every part file into `out` and keep each (id, run) once (`best_records`: by `score`, then the later
    one), sorted by `order` (stable), written to a temporary file and put in place with os.replace; the parts are
    removed only once the new `out` is on disk. Returns the number of records in `out`, or 0 when there was nothing
    to do (no parts, no key twice in `out`: `out` is left alone). The caller holds `out`'s lock (`lock`). A crash at
    any point leaves `out` and the parts as they were, or the merged `out` beside the parts, which a rerun merges
    again to the same result."""
    out, parts = Path(out), part_files(out)
    records = [r for path in [out, *parts] for r in read_records(path)]
    merged = best_records(records, score)
    if not parts and len(merged) == len(records):
        return 0
    temporary = out.with_name(out.name + ".merging")
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(_line(r) for r in sorted(merged.values(), key=order))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, out)
    _fsync_folder(out.parent)
    for path in parts:
        path.unlink()
    with contextlib.suppress(OSError):  # something else lives there; leave it
        parts_folder(out).rmdir()
    return len(merged)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
