"""torch.distributed for the trainer: the same code runs alone or under torchrun.

    torchrun --nproc_per_node 2 -m train.loop ...      (gloo for CPU tensors, nccl for CUDA tensors)

Data parallelism: each rank takes its shard of every global batch, gradients are averaged over
ranks (DDP's all-reduce, or FSDP2's reduce-scatter). Losses are sums over the shard divided by the
*global* count (the callers divide by the global batch size, `global_sum` for a count that varies
by rank), so the averaged gradient equals the single-process gradient of the same global batch.

FSDP2 (`fully_shard`) trains a sharded copy of a module: gradients and Adam's moments, 3 of the 4
copies of the weights that training holds, are split across ranks. The module itself stays whole
on every rank, because rollouts (serve.engine), scoring and saving read plain full weights; `synced`
moves the weights between the two around each stretch of optimiser steps.
"""
from __future__ import annotations

import copy
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .config import PARALLEL


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


def wrap(model: torch.nn.Module, parallel: str = "ddp") -> torch.nn.Module:
    """The module to run the training steps on: the model itself in one process; under torchrun
    DDP around it ("ddp": the same parameters; find_unused_parameters because HF encoders carry a
    pooler the RM does not use) or an FSDP2-sharded copy of it ("fsdp"; train inside `synced`).
    Build the optimiser on the returned module's parameters."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if world_size() == 1:
        return model
    if parallel == "fsdp":
        return sharded_copy(model)
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


def sharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of model under FSDP2: each block of its top-level layer lists (transformer layers of
    the HF families we train) is one unit, gathered only while it runs; the rest (embeddings, tied
    LM head, value or reward head) is the root unit, so tied weights stay in one unit."""
    # FSDP2 and its state-dict helpers are imported where they are used: ~1.2 s of import on a 2-core
    # EPYC that every trainer command and --help paid, and only torchrun --*.parallel fsdp runs them
    from torch.distributed.fsdp import fully_shard

    shard = copy.deepcopy(model)
    inside: set[int] = set()
    for m in shard.modules():
        if isinstance(m, torch.nn.ModuleList) and id(m) not in inside:
            for block in m:
                inside.update(id(x) for x in block.modules())
                fully_shard(block)
    fully_shard(shard)
    return shard


def is_sharded_copy(trained: torch.nn.Module) -> bool:
    if "torch.distributed.fsdp" not in sys.modules:   # not imported: nothing was sharded (see sharded_copy)
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(trained, FSDPModule)


@contextmanager
def synced(trained: torch.nn.Module, model: torch.nn.Module):
    """Around optimiser steps on trained = wrap(model): an FSDP2 copy first takes model's weights
    (each rank keeps its shard of them) and gives them back all-gathered at the end, so model is
    the trained one on every rank and the copy keeps Adam's state for the next stretch. Nothing to
    do for DDP or one process: they train model's own parameters."""
    if not is_sharded_copy(trained):
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(trained, model.state_dict(), options=full)
    yield
    with torch.no_grad():
        model.load_state_dict(get_model_state_dict(trained, options=full))


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
