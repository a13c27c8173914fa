"""FAB and FAB-T (Croce & Hein 2020) in L1, with the official AutoAttack driver's settings.

torchattacks' FAB single runs (one run of 100 iterations towards the decision boundary, untargeted or
towards one target class) carry the L1 branch of the official code: the L1 distance to each linearized
boundary, the projection onto a hyperplane within the box in L1, the L1 extrapolation. Only torchattacks'
driver (``FAB.perturb``) fails in L1: its final distance check computes the distance for Linf and L2 only.
:func:`fab_l1` is that driver for L1: restarts (a random start from the second on), target classes 2, 3, ...
by the clean logits' rank (FAB-T), each run on the examples no earlier run fooled, the random stream seeded
once per call, and a point kept only when it is misclassified in fp32, within eps in L1 and in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torchattacks

from .l1 import l1_norm
from .pgd import fp32_predictions

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FABSettings:
    """One FAB attack in L1 (the official defaults: 100 iterations, alpha_max 0.1, eta 1.05, beta 0.9)."""

    eps: float
    steps: int = 100
    restarts: int = 1
    target_classes: int | None = None  # FAB-T: the classes ranked 2..target_classes+1 by the clean logits; None: untargeted
    seed: int = 0
    num_classes: int = 10


def accepted(model: Model, x: torch.Tensor, y: torch.Tensor, candidate: torch.Tensor, eps: float) -> torch.Tensor:
    """Per example, whether ``candidate`` is an adversarial point of the L1 ball: misclassified in fp32, within
    eps of ``x`` in L1, in [0, 1]."""
    rows = candidate.reshape(len(candidate), -1)
    in_box = (rows >= 0).all(dim=1) & (rows <= 1).all(dim=1)
    return (fp32_predictions(model, candidate) != y) & (l1_norm(candidate - x) <= eps) & in_box


def _single_runs(model: nn.Module, s: FABSettings) -> torchattacks.FAB:
    """torchattacks' FAB set to L1, whose single runs we drive (its logits in fp32 via ``model``)."""
    return torchattacks.FAB(model, norm="L1", eps=s.eps, steps=s.steps, n_restarts=1, seed=s.seed, verbose=False,
                            multi_targeted=s.target_classes is not None, n_classes=s.num_classes)


def fab_l1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: FABSettings) -> torch.Tensor:
    """FAB (``target_classes`` None) or FAB-T in L1 against ``model``: adversarial inputs, ``x`` itself where none
    was found within eps. ``model`` returns fp32 logits (the caller wraps a low-precision one)."""
    x = x.detach().float()
    adv = x.clone()
    if s.eps == 0:
        return adv
    robust = fp32_predictions(model, x) == y
    runs = _single_runs(model, s)
    runs.set_device(x.device)  # where its bookkeeping tensors live: the inputs' device, whatever the model holds
    torch.manual_seed(s.seed)
    targets = [None] if s.target_classes is None else list(range(2, s.target_classes + 2))
    with torch.no_grad():
        for target in targets:
            for restart in range(s.restarts):
                idx = robust.nonzero().squeeze(1)
                if len(idx) == 0:
                    return adv
                if target is None:
                    candidate = runs.attack_single_run(x[idx], y[idx], use_rand_start=restart > 0)
                else:
                    runs.target_class = target
                    candidate = runs.attack_single_run_targeted(x[idx], y[idx], use_rand_start=restart > 0)
                fooled = accepted(model, x[idx], y[idx], candidate, s.eps)
                adv[idx[fooled]] = candidate[fooled]
                robust[idx[fooled]] = False
    return adv
