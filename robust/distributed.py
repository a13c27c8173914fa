"""Multi-process training on PyTorch's own engine: torchrun's environment, DDP, route-aware SyncBN.

A process started by ``torchrun`` (or ``robust train --nproc N``) finds ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` in its environment; :func:`setup` joins the process group (nccl on CUDA, gloo on
the CPU) and pins the rank's GPU. Everything else here is small collective helpers the trainer
calls at agreed points, so every rank takes the same decisions (stop, save, fail) at the same step.

Route-aware SyncBatchNorm: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` would replace our
routed norms wholesale (losing the route state and split mode), and ``nn.SyncBatchNorm`` refuses
CPU tensors. :func:`convert_sync_batchnorm` instead swaps only the plain batch norms *inside* the
routed norms (``DualBatchNorm2d.bns[r]``, ``SandwichBatchNorm2d.stats[r]``) for
:class:`SyncBatchNorm2d`, so each route's statistics are synchronized separately; the shared BN
(``SharedBatchNorm2d``, itself a BatchNorm2d) becomes :class:`SyncSharedBatchNorm2d`, which keeps
its split mode (each half of the fused clean+adv batch is synchronized on its own). Parameter and
buffer names do not change, so checkpoints load into unconverted models.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ConfigError
from .engine import resolve_device
from .norms import ROUTES, DualBatchNorm2d, SandwichBatchNorm2d, SharedBatchNorm2d, routed_norms


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


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer; it is set by torchrun") from None


def env_rank() -> int:
    """This process's rank as torchrun sets it (0 outside torchrun)."""
    return _env_int("RANK", 0)


def env_world_size() -> int:
    """The world size as torchrun sets it (1 outside torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def setup(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (when WORLD_SIZE > 1) and pick this rank's device.

    Idempotent: a process group that already exists (a test harness, a second Trainer) is used
    as it is. Outside torchrun this returns the single-process context and ``resolve_device``.
    """
    global _owned_group
    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        world = env_world_size()
        if world <= 1:
            return SINGLE, device
        rank, local_rank = env_rank(), _env_int("LOCAL_RANK", 0)
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ConfigError(f"WORLD_SIZE={world} but {name} is not set; start with torchrun or robust train --nproc N")
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        _owned_group = True
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return DistContext(rank, world, local_rank, control), device


def shutdown() -> None:
    """Leave the process group if :func:`setup` created it."""
    global _owned_group
    if _owned_group and dist.is_initialized():
        dist.destroy_process_group()
    _owned_group = False


# ---- collectives at agreed points ---------------------------------------------------------------


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """``t`` summed over ranks (in place); identity for a single process."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def control_max(values: list[int], ctx: DistContext) -> list[int]:
    """Element-wise max of small integers over ranks, on the CPU (no GPU sync)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.control_group)
    return [int(v) for v in t]


class PeerFailed(RuntimeError):
    """A rank failed; rank 0 carries its message, the other ranks an empty one and stop quietly.

    ``bad_input`` tells the CLI which exit code to use (2 for bad input, 1 otherwise).
    """

    def __init__(self, message: str, bad_input: bool) -> None:
        super().__init__(message)
        self.bad_input = bad_input


def _is_bad_input(error: BaseException) -> bool:
    from .checkpoint import CheckpointError
    from .data import DataError

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


# ---- route-aware synchronized batch norm ---------------------------------------------------------


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient: d(sum over ranks) is shared."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:  # noqa: D102
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sync_active(group=None) -> bool:
    """True when a process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def synced_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, group=None) -> torch.Tensor:
    """Training-mode batch norm of ``x`` with mean and variance over the batches of all ranks.

    One all-reduce of per-channel ``[sum, sum of squares, count]`` (shifted by the running mean,
    which keeps the variance free of cancellation), differentiable through the all-reduce, so
    the gradient is that of one big batch. Updates ``bn``'s running statistics like BatchNorm2d.
    """
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    shape = (1, c) + (1,) * (x.dim() - 2)
    xf = x.float()
    shift = bn.running_mean.detach().float().clone() if bn.running_mean is not None else xf.new_zeros(c)
    centered = xf - shift.view(shape)
    count = xf.new_full((1,), x.numel() // c)
    total = _SumOverRanks.apply(torch.cat([centered.sum(dims), centered.square().sum(dims), count]), group)
    n = total[-1]
    mean_shifted = total[:c] / n
    var = (total[c:2 * c] / n - mean_shifted.square()).clamp_min(0)
    mean = mean_shifted + shift
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
            unbiased = var.detach() * (n / (n - 1).clamp_min(1))
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    y = (xf - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    return y.to(x.dtype)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose training statistics span all ranks (any device, gloo or nccl).

    Same parameters and buffers as BatchNorm2d; in eval mode, or without a process group of
    more than one rank, it is exactly BatchNorm2d.
    """

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and sync_active(self.process_group):
            return synced_batch_norm(self, x, self.process_group)
        return super().forward(x)


class SyncSharedBatchNorm2d(SharedBatchNorm2d):
    """The shared BN with synchronized statistics, keeping the route state and split mode.

    Replacing SharedBatchNorm2d with a plain SyncBatchNorm would lose the split mode of the fused
    hybrid step (the clean half and the adv half normalized by their own statistics); here each
    half is synchronized on its own, as two separate synchronized forwards would be.
    """

    process_group = None

    def normalize(self, x: torch.Tensor, route: str) -> torch.Tensor:
        if self.training and sync_active(self.process_group):
            return synced_batch_norm(self, x, self.process_group)
        return nn.BatchNorm2d.forward(self, x)


def _sync_copy(bn: nn.BatchNorm2d, cls: type[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats)
    if isinstance(new, SyncSharedBatchNorm2d):
        new.route, new.split_at = bn.route, bn.split_at
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    new = new.to(ref.device) if ref is not None else new
    new.load_state_dict(bn.state_dict())
    return new.train(bn.training)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Route-aware SyncBN, in place: each route's inner BN (and the shared BN) is synchronized.

    Returns ``model``; the state_dict keys are unchanged.
    """
    for norm in list(routed_norms(model)):
        if isinstance(norm, DualBatchNorm2d):
            for r in ROUTES:
                if not isinstance(norm.bns[r], SyncBatchNorm2d):
                    norm.bns[r] = _sync_copy(norm.bns[r], SyncBatchNorm2d)
        elif isinstance(norm, SandwichBatchNorm2d):
            for r in ROUTES:
                if not isinstance(norm.stats[r], SyncBatchNorm2d):
                    norm.stats[r] = _sync_copy(norm.stats[r], SyncBatchNorm2d)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SharedBatchNorm2d) and not isinstance(child, SyncSharedBatchNorm2d):
                setattr(parent, name, _sync_copy(child, SyncSharedBatchNorm2d))
    return model
