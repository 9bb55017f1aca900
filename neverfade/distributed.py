"""Data-parallel runs under torchrun: which process this is, its device, and the process group around a run.

torchrun (or `accelerate launch`) starts one process per GPU and sets RANK, WORLD_SIZE and LOCAL_RANK; without
them this is the one process of a world of one, and nothing here starts a process group. Each rank describes its
own share of the batches (`neverfade.runner`), writes its own part file (`neverfade.results`), and rank 0 merges the
parts once every rank is done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

# Ranks meet only at the start and at the end of a run; at the end, a rank that finished early waits for the slowest
# one, which can take more than the default 10 (NCCL) or 30 (gloo) minutes on a large run.
TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def device(self, asked: str | None) -> str | None:
        """The device this rank runs on: cuda:LOCAL_RANK when started by torchrun with `cuda` asked or nothing
        asked on a machine with GPUs; otherwise what was asked (None: the library's default)."""
        if "LOCAL_RANK" in os.environ and asked in (None, "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return asked


def start(ranks: Ranks, device: str | None) -> None:
    """Join the process group (nccl on CUDA, gloo on the CPU) when there is more than one rank."""
    if not ranks.parallel:
        return
    import torch.distributed as dist

    on_cuda = device is not None and device.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if on_cuda else "gloo", timeout=TIMEOUT, device_id=torch.device(device) if on_cuda else None
    )


def barrier(ranks: Ranks) -> None:
    if ranks.parallel:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(ranks: Ranks, *counts: int) -> list[int]:
    """Each count summed over the ranks (and a barrier: every rank gets here first)."""
    if not ranks.parallel:
        return list(counts)
    import torch.distributed as dist

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(total)
    return total.tolist()


def stop(ranks: Ranks) -> None:
    import torch.distributed as dist

    if ranks.parallel and dist.is_initialized():
        dist.destroy_process_group()
