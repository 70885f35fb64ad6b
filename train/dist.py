"""torch.distributed for the trainer: the same code runs alone or under torchrun.

    torchrun --nproc_per_node 2 -m train.loop ...      (gloo for CPU tensors, nccl for CUDA tensors)

Data parallelism only (DDP): each rank takes its shard of every global batch, gradients are
averaged by DDP. Losses are sums over the shard divided by the *global* count (the callers divide by the global batch size, `global_sum` for a count that varies by rank),
so the averaged gradient equals the single-process gradient of the same global batch.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def backend_for(device: str | torch.device) -> str:
    """The collective backend for tensors on `device`: NCCL reduces CUDA tensors only, gloo CPU
    ones. It follows where the caller keeps its tensors, not what the machine has (a CPU trainer on
    a GPU machine with NCCL would fail at its first all_reduce)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device: str | torch.device = "cpu") -> tuple[int, int]:
    """Joins the process group when launched by torchrun (WORLD_SIZE set), with the backend for
    tensors on `device`. Returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return rank(), world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: list, r: int | None = None, w: int | None = None) -> list:
    """Rank r's contiguous share of a global batch (sizes differ by at most one)."""
    r, w = rank() if r is None else r, world_size() if w is None else w
    n = len(items)
    lo, hi = n * r // w, n * (r + 1) // w
    return items[lo:hi]


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP when distributed, the model itself otherwise. find_unused_parameters: HF encoders carry
    a pooler the RM does not use."""
    if world_size() == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def global_sum(x: float | torch.Tensor) -> float:
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if world_size() > 1:
        dist.all_reduce(t)
    return float(t)


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_list(items: list) -> list:
    """Concatenation of every rank's list, in rank order."""
    if world_size() == 1:
        return list(items)
    out: list = [None] * world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
