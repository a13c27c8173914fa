"""Multi-process training on PyTorch's own engine: torchrun's environment, DDP.

A process started by ``torchrun`` (or ``robust train --nproc N``) finds ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` in its environment; :func:`setup` joins the process group (nccl on CUDA, gloo on
the CPU) and pins the rank's GPU. Everything else here is small collective helpers the trainer
calls at agreed points, so every rank takes the same decisions (stop, save, fail) at the same step.

The route-aware SyncBN layers are in :mod:`robust.nn.syncbn`.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from robust.errors import CheckpointError, ConfigError, DataError, PeerFailed
from robust.runtime import resolve_device
from robust.torchrun import env_int, env_rank, env_world_size


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size, its local rank, the control group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control_group: Any = None  # a gloo group for small CPU messages (None: the default group)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


_owned_group = False


def setup(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (when WORLD_SIZE > 1) and pick this rank's device.

    Idempotent: a process group that already exists (a test harness, a second Trainer) is used
    as it is. Outside torchrun this returns the single-process context and ``resolve_device``.
    """
    global _owned_group
    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = env_int("LOCAL_RANK", rank)
    else:
        world = env_world_size()
        if world <= 1:
            return SINGLE, device
        rank, local_rank = env_rank(), env_int("LOCAL_RANK", 0)
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ConfigError(f"WORLD_SIZE={world} but {name} is not set; start with torchrun or robust train --nproc N")
        backend = backend_for(device)
        if device.type == "cuda":
            if backend == "nccl":  # nccl refuses two ranks on one GPU; gloo (ROBUST_DIST_BACKEND=gloo) shares them
                check_gpu_count(local_rank + 1)
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world)
        _owned_group = True
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return DistContext(rank, world, local_rank, control), device


def backend_for(device: torch.device) -> str:
    """nccl on CUDA, gloo on the CPU; ``ROBUST_DIST_BACKEND=gloo`` runs several CUDA ranks on one GPU (checks, not speed)."""
    asked = os.environ.get("ROBUST_DIST_BACKEND", "").strip()
    if asked:
        if asked not in ("nccl", "gloo"):
            raise ConfigError(f"ROBUST_DIST_BACKEND={asked!r} is not a backend; use nccl or gloo")
        return asked
    return "nccl" if device.type == "cuda" else "gloo"


def check_gpu_count(processes: int) -> None:
    """Refuse more processes on this machine than it has CUDA GPUs (each process trains on its own GPU)."""
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise ConfigError(f"{processes} processes on this machine need {processes} CUDA GPUs, but it has {gpus}; "
                          f"use --nproc {gpus}" + (" or fewer" if gpus > 1 else "") + ", or --device cpu")


def shutdown() -> None:
    """Leave the process group if :func:`setup` created it."""
    global _owned_group
    if _owned_group and dist.is_initialized():
        dist.destroy_process_group()
    _owned_group = False


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``t`` summed over ranks (in place); identity for a single process."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_tensors(tensors: list[torch.Tensor], ctx: DistContext) -> None:
    """Replace each tensor by its mean over ranks, in one collective (in place; a no-op in one process)."""
    if not ctx.enabled:
        return
    flat = all_reduce_sum(torch.cat([t.flatten() for t in tensors]), ctx) / ctx.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()

def control_max(values: list[int], ctx: DistContext) -> list[int]:
    """Element-wise max of small integers over ranks, on the CPU (no GPU sync)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.control_group)
    return [int(v) for v in t]


def _is_bad_input(error: BaseException) -> bool:

    return isinstance(error, (ConfigError, DataError, CheckpointError))


def agree(ctx: DistContext, error: BaseException | None) -> None:
    """Every rank calls this at the same point; if any rank failed, all raise.

    Rank 0 raises its own error, or the failing rank's message (prefixed with that rank) as
    :class:`PeerFailed`, so exactly one process prints it; the other ranks raise a silent
    :class:`PeerFailed`.
    """
    if not ctx.enabled:
        if error is not None:
            raise error
        return
    failures: list[Any] = [None] * ctx.world_size
    report = None if error is None else (str(error), _is_bad_input(error))
    dist.all_gather_object(failures, report, group=ctx.control_group)
    failed = [(r, f) for r, f in enumerate(failures) if f is not None]
    if not failed:
        return
    rank, (message, bad_input) = failed[0]
    if ctx.is_main:
        if error is not None:
            raise error
        raise PeerFailed(f"rank {rank}: {message}", bad_input)
    raise PeerFailed("", bad_input)


def average_running_stats(model: nn.Module, ctx: DistContext) -> None:
    """Average the BN running means/variances over ranks, so every rank holds the same model.

    Without SyncBN each rank's running statistics follow its own shard (DDP runs with
    ``broadcast_buffers=False``); averaging them at the end of an epoch keeps ranks identical and
    lets every shard count. (The mean of variances omits the spread of shard means: an
    approximation that --sync-bn makes unnecessary.)
    """
    if not ctx.enabled:
        return
    buffers = [b for name, b in model.named_buffers()
               if name.endswith(("running_mean", "running_var")) and b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(part.view_as(b))


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device, find_unused: bool) -> nn.Module:
    """DistributedDataParallel for the loss forward/backward.

    ``broadcast_buffers=False`` (``forward_sync_buffers=False`` in newer torch): with the default, every DDP forward overwrites the BN buffers
    with rank 0's in place. The reference's training attack runs through the adv route in
    train mode (on the unwrapped module, so without DDP hooks) and updates those buffers between
    the loss forwards, and a non-fused hybrid step makes two DDP forwards before one backward,
    the known trigger for DDP's in-place buffer errors. Buffers are instead kept equal by
    :func:`average_running_stats` at the end of each epoch (or are equal already under --sync-bn).
    """
    ddp = nn.parallel.DistributedDataParallel
    # newer torch renames the flag (and still syncs buffers once at construction, which we want)
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused, **no_sync)


def shard_rows(n: int, ctx: DistContext) -> slice:
    """This rank's contiguous part of ``n`` rows (sizes differ by at most one)."""
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (1 if ctx.rank < extra else 0))
