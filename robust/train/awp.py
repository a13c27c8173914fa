"""Adversarial weight perturbation (AWP, Wu et al. 2020, csdongxian/AWP), an option of every objective.

Before the training step's loss, every conv and linear weight ``w`` (the parameters with more than
one dimension, as the official code) moves by ``v = gamma * ||w|| * g / ||g||``, ``g`` the
gradient of the step's own loss at ``w`` (one ascent step, normalized per layer). The step's
gradient is taken at ``w + v``; then the weights are put back to the very tensors they were (a
copy, bit-exact) **before** the optimizer step, so momentum and weight decay act on ``w``. (The
official code subtracts ``v`` after the optimizer step, which differs by rounding and by weight
decay on ``v``.) The ascent's forward uses batch statistics like the step, but leaves the running
statistics as they were.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from robust.nn.norms import frozen_statistics


def perturbed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights AWP perturbs: conv and linear weights (more than one dimension)."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]


class WeightPerturbation:
    """The perturbation of one step: :meth:`apply` it, take the loss's gradient, :meth:`restore`."""

    def __init__(self, params: list[nn.Parameter], deltas: list[torch.Tensor]) -> None:
        self.params, self.deltas = params, deltas
        self.saved: list[torch.Tensor] | None = None

    def apply(self) -> "WeightPerturbation":
        with torch.no_grad():
            self.saved = [p.detach().clone() for p in self.params]
            for p, d in zip(self.params, self.deltas):
                p.add_(d)
        return self

    def restore(self) -> None:
        """Put back the exact weights of before :meth:`apply` (gradients are kept)."""
        if self.saved is None:
            return
        with torch.no_grad():
            for p, w in zip(self.params, self.saved):
                p.copy_(w)
        self.saved = None


def weight_perturbation(model: nn.Module, loss_fn: Callable[[], torch.Tensor], gamma: float,
                        reduce: Callable[[list[torch.Tensor]], None] | None = None,
                        loss_scale: float = 1.0) -> WeightPerturbation:
    """AWP's perturbation of ``model``'s weights for the loss ``loss_fn()`` (not applied yet).

    ``reduce`` (distributed runs) averages the ascent gradients over ranks in place, so every rank
    perturbs alike. ``loss_scale`` (fp16: the grad scaler's power of two) multiplies the loss so its
    fp16 backward does not underflow; the per-layer normalization cancels it exactly. A scaled
    backward that overflows is taken again unscaled.
    """
    params = perturbed_parameters(model)
    with frozen_statistics(model):
        grads = list(torch.autograd.grad(loss_fn() * loss_scale, params, allow_unused=True))
        if loss_scale != 1.0 and not bool(torch.stack([torch.isfinite(g).all() for g in grads if g is not None]).all()):
            grads = list(torch.autograd.grad(loss_fn(), params, allow_unused=True))
    grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
    if reduce is not None:
        reduce(grads)
    deltas = []
    for p, g in zip(params, grads):  # a zero gradient gives a zero perturbation (no division by zero, no sync)
        deltas.append((g * (gamma * p.detach().norm() / g.norm().clamp_min(1e-30))).to(p.dtype))
    return WeightPerturbation(params, deltas)
