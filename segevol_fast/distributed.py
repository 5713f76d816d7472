"""Multi-process runs through PyTorch's own engine (torchrun; DistributedDataParallel in training).

    torchrun --nproc-per-node 2 [--nnodes M ...] -m segevol_fast finetune ...
    torchrun --nproc-per-node 2 -m segevol_fast segment cohort.csv ...

Shared by training and cohort inference, so it sits below both.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env` reads
them and joins the process group (NCCL on CUDA, gloo on CPU). Without them (a plain `python`
run) it is a single process and joins nothing. The helpers below are no-ops in a single process,
so their callers call them unconditionally.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .errors import InvalidArgumentError


class DistEnv(NamedTuple):
    """Where this process sits: rank in [0, world_size), local_rank on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise InvalidArgumentError(f"environment variable {name}={value!r} is not an integer") from exc


def init_from_env(device: str | None = None, backend: str | None = None) -> DistEnv:
    """Join torchrun's process group when its environment is set; else a single process.

    Args:
        device: "cpu" or "cuda" to force one; default CUDA when available.
        backend: process-group backend; default "nccl" on CUDA, "gloo" on CPU.

    Returns:
        DistEnv(rank, world_size, local_rank, device); the device is cuda:<local_rank> on CUDA.
        Calling it again after the group is up returns the same answer without re-joining.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise InvalidArgumentError("device 'cuda' was asked for, but no CUDA device is available")
    if world < 1 or not 0 <= rank < world:
        raise InvalidArgumentError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    dev = torch.device("cuda", local % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise InvalidArgumentError(f"WORLD_SIZE={world} but {name} is not set: launch with torchrun")
        dist.init_process_group(
            backend or ("nccl" if use_cuda else "gloo"), init_method="env://", rank=rank, world_size=world
        )
    return DistEnv(rank, world, local, dev)


def is_active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs, shows progress and writes checkpoints."""
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place and return it (unchanged in a single process)."""
    if is_active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects); [obj] in a single process."""
    if not is_active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's obj on every rank."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_active():
        dist.barrier()


def shutdown(clean: bool = True) -> None:
    """Leave the process group at the end of a torchrun job; call it last, before the process ends.

    clean: every rank got here normally. Then the ranks first meet in a barrier: gloo frees a
    finished collective's tensors on its own worker thread a moment after the caller has its
    result, and a process that starts to exit inside that moment aborts ("terminate called without
    an active exception": the worker wants the GIL of an interpreter that is shutting down). The
    barrier hands that thread the GIL, and a round trip of time, before exit. On an error path
    (clean=False) the other ranks may never arrive, so the group is left without waiting.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
