"""Data-parallel training under torchrun: one process per GPU (or per CPU slot), each
holding the whole model and a disjoint part of every global batch.

torchrun describes the job in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
...); outside it every function here answers as a world of one, so the single-process
path needs no branches.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun set up: NCCL between GPUs, gloo on CPUs. Each process
    takes the GPU of its local rank, so `engine.device()` ("cuda") means that one."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that logs to MLflow and writes checkpoints."""
    return rank() == 0


def local_part(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (of indices); all of it alone."""
    if not dist.is_initialized():
        return batch
    return batch.tensor_split(world_size())[rank()]


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over every rank (itself alone outside torchrun)."""
    if not dist.is_initialized():
        return list(values)
    dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()
