"""Runs under `torchrun`: the process group, this process's rank, and gathering across ranks.

Outside torchrun every function here is a no-op: one process, rank 0 of 1.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group torchrun describes in the environment (a no-op outside it):
    gloo on CPU, nccl on GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def local_device() -> torch.device:
    """This process's GPU under torchrun (or the only one), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank, keeping the gradient of this rank's part."""
    if world()[1] == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x))
