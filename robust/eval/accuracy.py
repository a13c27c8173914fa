"""The one definition of robust accuracy, used by training validation and ``robust.evaluate``.

An example is robust when the model is right on the clean input **and** right on the attack's
adversarial example (the AutoAttack / RobustBench convention). Examples already wrong on the
clean input are not attacked: they count as non-robust whatever an attack would return, so a
weak attack can never make robust accuracy exceed clean accuracy.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def correct_under_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                         clean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example boolean masks ``(clean correct, robust)`` of one batch.

    ``attack(x, y) -> x_adv`` sees only the clean-correct examples; pass ``clean`` (the clean
    mask) when it is already known, to skip the clean forward.
    """
    if clean is None:
        with torch.no_grad():
            clean = model(x).argmax(1) == y
    robust = clean.clone()
    idx = clean.nonzero().squeeze(1)
    if len(idx):
        x_adv = attack(x[idx], y[idx])
        with torch.no_grad():
            robust[idx] = model(x_adv).argmax(1) == y[idx]
    return clean, robust
