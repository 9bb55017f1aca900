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
HALF = CUDA  # bfloat16 on CUDA


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
    """`_decode_attention_op`'s two launches, with the launch settings given."""
    group = H // KVH
    g_pad, d_pad = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(D))
    m = torch.empty(B * KVH * splits * g_pad, device=DEVICE, dtype=torch.float32)
    total = torch.empty_like(m)
    acc = torch.empty(B * KVH * splits * g_pad * d_pad, device=DEVICE, dtype=torch.float32)
    out = torch.empty(B, 1, H, D, device=DEVICE, dtype=DTYPE)
    attended = mask.view(torch.uint8)
    launch = dict(num_warps=warps, num_stages=stages) if CUDA else {}

    def run():
        K._partial_kernel[(B * KVH, splits)](
            q, k, v, length, attended, m, scale if use_scale else m, m, total, acc, m,
            D**-0.5, torch.finfo(DTYPE).min,
            q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
            attended.stride(0), attended.stride(1), 0, 0, 0, scale.stride(1), 0, 0, 0, 0,
            KV_HEADS=KVH, GROUP=group, DIM=D, SPLITS=splits, G_PAD=g_pad, D_PAD=d_pad, BLOCK_N=block_n,
            MASK=2, BOOST=False, SCALE=use_scale, PROBS=False, DTYPE=K._TL_DTYPES[DTYPE],
            ROUND=HALF, IEEE=not HALF, **launch,
        )  # fmt: skip
        K._combine_kernel[(B * KVH,)](
            m, total, acc, length, out, m, out.stride(0), out.stride(2), out.stride(3), 0, 0, 0, 0, T,
            KV_HEADS=KVH, GROUP=group, DIM=D, SPLITS=splits, S_PAD=triton.next_power_of_2(splits),
            G_PAD=g_pad, D_PAD=d_pad, BLOCK_N=block_n, PROBS=False,
        )  # fmt: skip
        return out

    return run


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
