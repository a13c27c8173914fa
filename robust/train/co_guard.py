"""The catastrophic-overfitting guard of one-step methods (as Wong et al.'s fast_adversarial does).

One-step training (``fast``, ``nfgsm``) can collapse within an epoch: accuracy on one-step
examples stays high while accuracy under PGD drops to about zero. After every epoch the guard
measures PGD-5 accuracy (step eps/4, random start; :func:`robust.eval.accuracy.correct_under_attack`'s
definition) of the adv route, in eval mode, on one fixed training batch; when it falls by more
than ``drop`` percentage points below the previous epoch's, training stops and the previous
epoch's weights are the result. fast_adversarial checks the first batch of each epoch in train
mode; we use a fixed batch (the first of the training split, not augmented) so that epochs are
compared on the same images and a resumed run measures exactly what an uninterrupted one does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from robust.attacks import pgd
from robust.eval.accuracy import correct_under_attack
from robust.nn.norms import bn_mode, use_route
from robust.runtime import autocast

GUARD_STEPS = 5


GUARD_DROP = 20.0  # percentage points, fast_adversarial's threshold (0.2)


class COGuard:
    """``check(model)`` after each epoch; ``previous`` is the last good epoch's PGD accuracy (%)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = GUARD_STEPS,
                 drop: float = GUARD_DROP, previous: float | None = None) -> None:
        self.x, self.y, self.eps, self.steps, self.drop, self.previous = x, y, float(eps), steps, drop, previous
        self.good: dict[str, Any] | None = None  # the last good epoch's state, once remembered

    def accuracy(self, model: nn.Module, seed: int, amp: torch.dtype | None = None, attack_all: bool = False) -> float:
        """PGD accuracy (%) of the adv route on the guard's batch; the global RNG is left as it was. ``attack_all``:
        attack every example, the misclassified too (what the check costs once the model classifies them all:
        the time budget's probe times that)."""
        devices = [self.x.device] if self.x.device.type == "cuda" else []
        every = torch.ones_like(self.y, dtype=torch.bool) if attack_all else None
        with torch.random.fork_rng(devices=devices), use_route(model, "adv"), bn_mode(model, False), \
                autocast(self.x.device, amp):
            torch.manual_seed(seed)
            _, robust = correct_under_attack(model, self.x, self.y, lambda xa, ya: pgd(
                model, xa, ya, self.eps, self.eps / 4, self.steps, random_start=True), clean=every)
        return 100.0 * robust.float().mean().item()

    def check(self, model: nn.Module, seed: int, amp: torch.dtype | None = None) -> dict[str, Any]:
        """Measure; ``collapsed`` when the accuracy fell by more than ``drop`` points. Updates ``previous`` otherwise."""
        acc = self.accuracy(model, seed, amp)
        collapsed = self.previous is not None and acc < self.previous - self.drop
        report = {"pgd_acc": acc, "previous": self.previous, "collapsed": collapsed}
        if not collapsed:
            self.previous = acc
        return report

    def remember(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, **extra: Any) -> None:
        """Keep a copy of the state a collapse in the next epoch goes back to (training moves on), with ``extra``."""
        self.good = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                     "scaler": copy.deepcopy(scaler.state_dict()) if scaler is not None else None, **extra}

    def roll_back(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> dict[str, Any] | None:
        """Put the remembered state back into ``model``, ``optimizer`` and ``scaler``; return it (None if none was kept)."""
        good = self.good
        if good is None:
            return None
        model.load_state_dict(good["model"])
        optimizer.load_state_dict(good["optimizer"])
        if scaler is not None and good["scaler"] is not None:
            scaler.load_state_dict(good["scaler"])
        return good
