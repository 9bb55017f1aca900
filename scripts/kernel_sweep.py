"""Time the fused decode-attention kernel's two launches alone, over launch settings (splits, key block, warps,
pipeline stages), with and without a per-key scale (what SPARC, naive and LocoRE add), at one decode shape.

    SHAPE=8,32,32,128,1112,900 python scripts/kernel_sweep.py            # B,H,KVH,D,capacity,filled: full grid
    SMALL=1 SHAPE=32,28,4,128,1112,900 python scripts/kernel_sweep.py    # default splits; 2/4 warps, 2/3 stages
    TRITON_INTERPRET=1 python scripts/kernel_sweep.py                    # a CPU: one tiny setting, checks the launch

Writes $OUT/sweep_<shape>.json (or /tmp): microseconds per layer (CUDA-graph timed) and each setting's largest
difference from the kernel's own launch (`decode_attention`). Session 9's results are in
docs/findings/bench_h200_session9.json ("kernel_sweep").
"""

from __future__ import annotations

import itertools
import json
import os

import torch
import triton

import neverfade.kernels.decode_attention as K

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPE = os.environ.get("SHAPE", "8,32,32,128,1112,900" if CUDA else "2,4,2,16,80,60")
B, H, KVH, D, T, L = map(int, SHAPE.split(","))
DTYPE = torch.bfloat16 if CUDA else torch.float32


def inputs():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(B, H, 1, D, device=DEVICE, dtype=DTYPE, generator=g)
    k = torch.randn(B, KVH, T, D, device=DEVICE, dtype=DTYPE, generator=g)
    v = torch.randn(B, KVH, T, D, device=DEVICE, dtype=DTYPE, generator=g)
    mask = torch.ones(B, T, device=DEVICE, dtype=torch.bool)
    mask[:, :5] = False  # left padding
    scale = (1.0 + torch.rand(1, T, device=DEVICE, generator=g)).float()
    return q, k, v, mask, scale, torch.tensor([L], device=DEVICE)


def launcher(q, k, v, mask, scale, length, splits, block_n, warps, stages, use_scale):
    """The kernel's own launch (`decode_attention.launch`), with the launch settings given."""
    launch = dict(num_warps=warps, num_stages=stages) if CUDA else {}
    chosen = scale if use_scale else None
    return lambda: K.launch(q, k, v, D**-0.5, length, mask, None, chosen, False, splits, block_n, **launch)[0]


def main() -> None:
    q, k, v, mask, scale, length = inputs()
    reference, _ = K.decode_attention(q, k, v, D**-0.5, length, mask, None, scale)
    default = K.default_splits(B, KVH, T, 64, torch.device(DEVICE))
    if not CUDA:
        grid = [(2, 32, 4, 3)]
    elif os.environ.get("SMALL"):
        grid = itertools.product((default,), (64,), (2, 4), (2, 3))
    else:
        grid = itertools.product((1, 2, 4), (32, 64), (2, 4), (2, 3))
    rows = []
    for splits, block_n, warps, stages in grid:
        row = {"splits": splits, "block_n": block_n, "warps": warps, "stages": stages}
        for use_scale in (False, True):
            run = launcher(q, k, v, mask, scale, length, splits, block_n, warps, stages, use_scale)
            out = run()
            if use_scale:
                row["max_err"] = float((out.float() - reference.float()).abs().max())
            us = 1000 * triton.testing.do_bench_cudagraph(run, rep=30) if CUDA else 0.0
            row["us_scale" if use_scale else "us_plain"] = round(us, 2)
        rows.append(row)
        print(row, flush=True)
    path = f"{os.environ.get('OUT', '/tmp')}/sweep_{SHAPE.replace(',', '_')}.json"
    with open(path, "w") as f:
        json.dump({"shape": [B, H, KVH, D, T, L], "default_splits": default, "rows": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
