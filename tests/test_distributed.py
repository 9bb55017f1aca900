"""Data-parallel captioning under torchrun, on the CPU with the gloo backend: two ranks give exactly the records of
one process, merged in its order; after a rank is killed, a rerun describes only what is missing; part files of
another world size are finished by any later run; the merge is atomic and idempotent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_images

from neverfade import distributed
from neverfade.cli import main
from neverfade.distributed import Ranks
from neverfade.results import merge_parts, part_files, part_path, read_records

N_IMAGES = 21  # 11 batches of 2: rank 0 gets 6, rank 1 gets 5
FIELDS = ("id", "run", "methods", "caption", "new_tokens", "error")


def write_folder(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        make_images()[i % 3].rotate(90 * (i // 3)).save(folder / f"img{i:03d}.png")
    return folder


def essentials(records: list[dict]) -> list[tuple]:
    return [tuple(json.dumps(r[f]) for f in FIELDS) for r in records]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        "-m",
        "neverfade",
        "caption",
        *args,
    ]


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker of `rank` among the descendants of torchrun's process `parent` (Linux /proc)."""
    todo = [parent]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != parent and f"RANK={rank}".encode() in environ:
            return pid
        todo += [int(c) for c in children]
    return None


def lines_of(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_two_ranks_equal_one_process_and_a_rerun_finishes_a_killed_rank(tiny_models, tmp_path):
    folder = write_folder(tmp_path / "images", N_IMAGES)
    args = [
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets for its workers
    single = tmp_path / "single.jsonl"
    subprocess.run(
        [sys.executable, "-m", "neverfade", "caption", *args, "--out", str(single)],
        env=env,
        check=True,
        capture_output=True,
    )
    expected = read_records(single)
    assert len(expected) == 2 * N_IMAGES

    out = tmp_path / "two.jsonl"
    proc = subprocess.run(torchrun(2, *args, "--out", str(out)), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"2 ranks described {2 * N_IMAGES} new; {2 * N_IMAGES} records in {out}" in proc.stderr
    assert essentials(read_records(out)) == essentials(expected)  # same records, same order, each once
    assert not Path(f"{out}.parts").exists()

    # kill rank 1 as soon as it has written its first batch; torchrun then stops rank 0 too
    out = tmp_path / "killed.jsonl"
    run = subprocess.Popen(
        torchrun(2, *args, "--out", str(out)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    part, deadline, killed = part_path(out, 1, 2), time.time() + 120, None
    while run.poll() is None and time.time() < deadline:
        if lines_of(part) >= 1:
            killed = rank_pid(run.pid, 1)
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert killed is not None and run.wait(timeout=120) != 0
    survivors = [r for p in part_files(out) for r in read_records(p)]
    assert out.read_bytes() == b"", "nothing merged (rank 0 made --out, empty, to hold its lock)"
    assert 0 < len(survivors) < 2 * N_IMAGES, len(survivors)
    assert len({(r["id"], r["run"]) for r in survivors}) == len(survivors)

    proc = subprocess.run(torchrun(2, *args, "--out", str(out)), env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = 2 * N_IMAGES - len(survivors)
    assert f"2 ranks described {missing} new; {2 * N_IMAGES} records in {out}" in proc.stderr
    merged = read_records(out)
    assert essentials(merged) == essentials(expected)
    assert all(r in merged for r in survivors)  # kept as they were (timings too), not described again
    assert not Path(f"{out}.parts").exists()


def test_a_run_of_another_world_size_finishes_the_parts(tiny_models, tmp_path, monkeypatch, capsys):
    """Parts of a 3-rank run (one with a torn last line) and an earlier output: one process describes only what
    none of them holds, then merges everything into the output."""
    from neverfade.api import Captioner

    folder = write_folder(tmp_path / "images", 9)
    args = ["caption", str(folder), "--model", tiny_models["llava"], "--max-new-tokens", "6", "--batch-size", "2"]
    whole = tmp_path / "whole.jsonl"
    assert main([*args, "--out", str(whole)]) == 0
    expected = read_records(whole)

    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in expected[7:9]))
    for rank, records in enumerate([expected[0:2], expected[2:3], expected[4:5]]):
        path = part_path(out, rank, 3)
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with open(part_path(out, 1, 3), "a") as f:
        f.write('{"id": "img003.png", "capt')  # a kill in the middle of a write
    kept = expected[0:3] + expected[4:5] + expected[7:9]

    real, described = Captioner.caption, []
    monkeypatch.setattr(
        Captioner, "caption", lambda self, images, *a, **kw: (described.extend(images), real(self, images, *a, **kw))[1]
    )
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    assert f"resuming: {len(kept)} records already done" in capsys.readouterr().err
    assert len(described) == len(expected) - len(kept)
    merged = read_records(out)
    assert essentials(merged) == essentials(expected)
    assert all(r in merged for r in kept)
    assert not Path(f"{out}.parts").exists()


def record(i: int, run: str = "r", error: str | None = None) -> dict:
    return {"id": f"im{i}", "run": run, "caption": None if error else f"caption {i}", "error": error}


def test_merge_keeps_each_record_once_in_order_and_can_be_repeated(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in [record(9, "other"), record(2, error="no such image")]))
    part_path(out, 0, 2).parent.mkdir()
    part_path(out, 0, 2).write_text(json.dumps(record(2)) + "\n" + json.dumps(record(0)) + "\n")
    part_path(out, 1, 2).write_text(json.dumps(record(1)) + "\n" + json.dumps(record(3, error="oom")) + '\n{"id"')
    order = {"im0": 0, "im1": 1, "im2": 2, "im3": 3}
    key = lambda r: (0,) if r["run"] != "r" else (1, order[r["id"]])  # noqa: E731

    assert merge_parts(out, key) == 5
    merged = read_records(out)
    assert merged == [record(9, "other"), record(0), record(1), record(2), record(3, error="oom")]
    assert part_files(out) == [] and not Path(f"{out}.parts").exists()
    # a crash after the merged output is in place but before the parts are gone: merging again changes nothing
    for rank in (0, 1):
        part_path(out, rank, 2).parent.mkdir(exist_ok=True)
        part_path(out, rank, 2).write_text("".join(json.dumps(r) + "\n" for r in merged[rank::2]))
    assert merge_parts(out, key) == 5 and read_records(out) == merged
    assert not list(tmp_path.glob("*.merging"))
    assert merge_parts(out, key) == 0  # nothing to merge: the output is left alone


def test_each_rank_gets_its_gpu_and_nccl(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ranks = Ranks.from_env()
    assert ranks == Ranks(7, 8, 3) and ranks.parallel
    assert [ranks.device(asked) for asked in (None, "cuda", "cuda:0", "cpu")] == ["cuda:3", "cuda:3", "cuda:0", "cpu"]

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    distributed.start(ranks, "cuda:3")
    distributed.start(ranks, "cpu")
    distributed.start(Ranks(), "cuda:0")  # one process: no process group
    assert calls == [
        ("set_device", "cuda:3"),
        ("nccl", {"timeout": distributed.TIMEOUT, "device_id": torch.device("cuda:3")}),
        ("gloo", {"timeout": distributed.TIMEOUT, "device_id": None}),
    ]


@pytest.mark.parametrize("env", [{}, {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}], ids=["plain", "torchrun-1"])
def test_one_process_needs_no_process_group(env, monkeypatch):
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: pytest.fail("no group wanted"))
    ranks = Ranks.from_env()
    distributed.start(ranks, "cpu")
    assert not ranks.parallel and distributed.sum_over_ranks(ranks, 4, 1) == [4, 1]
