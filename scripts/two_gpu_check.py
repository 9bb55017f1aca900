"""The two-GPU data-parallel check (issue 9): one GPU against two, a rank killed mid-run, the rerun, token equality.

    NCCL_NVLS_ENABLE=0 python scripts/two_gpu_check.py --out /tmp/dp          # on a 2-GPU machine: 7B, SPARC, 256
    python scripts/two_gpu_check.py --device cpu --model random:llava --per-rank 6 --tokens 8 --batch-size 2 \
        --out /tmp/dp                                                         # the same steps on a CPU (gloo)

Steps: write 2 x per-rank synthetic images; caption them in one process (GPU 0) and, timed, with torchrun on two
ranks; run torchrun again into a fresh output, SIGKILL rank 1 once its part holds a batch, rerun; then check that
the merged output holds each image exactly once and equals the one-process captions (text and token count). Writes
DIR/report.json and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def caption_args(args, folder: Path, out: Path) -> list[str]:
    return [
        "-m",
        "neverfade",
        "caption",
        str(folder),
        "--model",
        args.model,
        "--method",
        "sparc",
        "--max-new-tokens",
        str(args.tokens),
        "--min-new-tokens",
        str(args.tokens),
        "--batch-size",
        str(args.batch_size),
        "--out",
        str(out),
    ] + (["--device", "cpu"] if args.device == "cpu" else [])


def torchrun(args, rest: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        *rest,
    ]


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - start


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the descendants of `parent`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().split()
        except OSError:
            continue
        if (
            f"RANK={rank}".encode() in environ
            and b"LOCAL_RANK=" + str(rank).encode() in environ
            and b"TORCHELASTIC_RUN_ID" in b"".join(environ)
            and int(stat[3]) == parent
        ):
            return int(proc.name)
    return None


def kill_rank_mid_run(cmd: list[str], env: dict, part: Path, rank: int = 1) -> int:
    """Start `cmd`, SIGKILL worker `rank` once its part file holds a record; returns the records it had."""
    launcher = subprocess.Popen(cmd, env=env)
    try:
        while not (part.exists() and part.read_text().count("\n") >= 1):
            if launcher.poll() is not None:
                raise RuntimeError("the run ended before rank 1 wrote a batch; use more images or tokens")
            time.sleep(0.2)
        pid = rank_pid(launcher.pid, rank)
        if pid is None:
            raise RuntimeError(f"no worker with RANK={rank} under pid {launcher.pid}")
        os.kill(pid, signal.SIGKILL)
        kept = part.read_text().count("\n")
        launcher.wait(timeout=600)
        return kept
    finally:
        if launcher.poll() is None:
            launcher.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:llava:7b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--per-rank", type=int, default=64, help="images per rank (default 64)")
    p.add_argument("--tokens", type=int, default=256, help="forced caption length (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="a fresh folder for images, outputs and report.json")
    args = p.parse_args()
    root = Path(args.out)
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=False)
    rng = np.random.default_rng(0)
    for i in range(2 * args.per_rank):
        Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.png")
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    one_gpu = {**env, "CUDA_VISIBLE_DEVICES": "0"} if args.device == "cuda" else env
    report = {"model": args.model, "images": 2 * args.per_rank, "tokens": args.tokens, "batch_size": args.batch_size}
    report["one_seconds"] = timed([sys.executable, *caption_args(args, folder, root / "one.jsonl")], one_gpu)
    report["two_seconds"] = timed(torchrun(args, caption_args(args, folder, root / "two_clean.jsonl")), env)
    out = root / "two.jsonl"
    report["records_of_rank1_at_kill"] = kill_rank_mid_run(
        torchrun(args, caption_args(args, folder, out)), env, Path(f"{out}.parts") / "rank-00001-of-00002.jsonl"
    )
    report["rerun_seconds"] = timed(torchrun(args, caption_args(args, folder, out)), env)
    one = {r["id"]: (r["caption"], r["new_tokens"]) for r in records(root / "one.jsonl")}
    for name in ("two_clean", "two"):
        got = records(root / f"{name}.jsonl")
        ids = [r["id"] for r in got]
        report[f"{name}_each_once"] = len(ids) == len(set(ids)) == len(one)
        report[f"{name}_equals_one"] = {r["id"]: (r["caption"], r["new_tokens"]) for r in got} == one
    n_tokens = 2 * args.per_rank * args.tokens
    report["tokens_per_s_one"] = round(n_tokens / report["one_seconds"], 1)
    report["tokens_per_s_two"] = round(n_tokens / report["two_seconds"], 1)
    (root / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    ok = all(v for k, v in report.items() if k.endswith(("_each_once", "_equals_one")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
