"""Route-aware SyncBatchNorm: each route's statistics synchronized over the processes of a DDP run.

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

import torch
import torch.distributed as dist
import torch.nn as nn

from robust.nn.norms import ROUTES, DualBatchNorm2d, SandwichBatchNorm2d, SharedBatchNorm2d, routed_norms


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
