"""Crash safety: `neverfade caption` killed with SIGKILL at random points, several times in a row and resumed each
time, ends with exactly the records of an uninterrupted run, with no torn or repeated line."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import make_images

N_IMAGES, KILLS = 32, 4


def write_folder(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        make_images()[i % 3].rotate(90 * (i // 3)).save(folder / f"img{i:03d}.png")
    return folder


def lines_of(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def strict_records(path: Path) -> list[dict]:
    """Every line of the file, each required to be one whole JSON record ending in a newline."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def whole_lines(path: Path) -> list[dict]:
    """The records of a file that a kill may have left with a torn last line (the next run cuts it off)."""
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]


def kill_at_random_point(cmd: list[str], out: Path, rng: random.Random) -> int | None:
    """Start the run, wait until it has appended something, then SIGKILL it after a random delay (0 to 0.3 s).
    Returns the exit status, None when it finished before the kill."""
    start_lines = lines_of(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and lines_of(out) == start_lines and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.3))
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    status = proc.wait(timeout=60)
    return None if finished else status


def test_killed_again_and_again_then_resumed_gives_the_uninterrupted_records(tiny_models, tmp_path):
    folder = write_folder(tmp_path / "images", N_IMAGES)
    cmd = [
        sys.executable,
        "-m",
        "neverfade",
        "caption",
        str(folder),
        "--model",
        tiny_models["llava"],
        "--method",
        "sparc",
        "--sparc-tau",
        "0.05",
        "--vs-baseline",
        "--max-new-tokens",
        "48",
        "--batch-size",
        "2",
    ]
    whole = tmp_path / "whole.jsonl"
    subprocess.run(cmd + ["--out", str(whole)], check=True, capture_output=True)
    expected = strict_records(whole)
    assert len(expected) == 2 * N_IMAGES

    out, rng = tmp_path / "out.jsonl", random.Random(20261123)
    statuses, kept = [], []
    for _ in range(KILLS):
        statuses.append(kill_at_random_point(cmd + ["--out", str(out)], out, rng))
        keys = [(r["id"], r["run"]) for r in whole_lines(out)]
        assert len(keys) == len(set(keys)), "a record was written twice"
        kept.append(len(keys))
    assert statuses.count(-signal.SIGKILL) >= KILLS - 1, statuses  # killed mid-run, not after the end
    assert kept == sorted(kept) and kept[-1] < 2 * N_IMAGES, kept  # each run kept what it found, work was left
    subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True)

    records = strict_records(out)
    keys = [(r["id"], r["run"]) for r in records]
    assert len(keys) == len(set(keys)) == 2 * N_IMAGES
    fields = ("id", "run", "methods", "caption", "new_tokens", "error")
    assert {tuple(json.dumps(r[f]) for f in fields) for r in records} == {
        tuple(json.dumps(r[f]) for f in fields) for r in expected
    }
