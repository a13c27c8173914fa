"""Weight averaging: an exponential moving average of the weights, as the modern recipes evaluate.

After every optimizer step ``avg = d * avg + (1 - d) * live`` for every parameter, with the decay
warming up as DM-Improves-AT's and imrahulr/adversarial_robustness_pytorch's code do:
``d = min(tau, (1 + t) / (10 + t))`` at update ``t`` (0-based), so the first updates follow the live
weights closely. The averaged model is a whole model, and its floating buffers (both routes'
running means and variances) are averaged with the same decay; integer buffers (batch counts) are
copied. Averaged statistics belong to the averaged trajectory the weights come from; the live
model's statistics (what DM-Improves-AT copies) belong to the last weights only. Measured once on
the demo budget: the averaged statistics scored 58.7 PGD-20 against 56.4 with copied ones
(docs/results.md, "Weight averaging: buffers").
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn


def ema_decay(tau: float, updates: int) -> float:
    """The decay of update ``updates`` (0-based): the warm-up ``(1 + t) / (10 + t)``, at most ``tau``."""
    return min(tau, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """The averaged copy of ``model`` (``average``), updated with :meth:`update` after each optimizer step."""

    def __init__(self, model: nn.Module, tau: float) -> None:
        self.tau, self.updates = float(tau), 0
        self.average = copy.deepcopy(model).eval()
        for p in self.average.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average toward ``model``: parameters and floating buffers averaged, counts copied."""
        d = ema_decay(self.tau, self.updates)
        live = dict(model.named_parameters())
        for name, p in self.average.named_parameters():
            p.mul_(d).add_(live[name].detach(), alpha=1 - d)
        live_buffers = dict(model.named_buffers())
        for name, b in self.average.named_buffers():
            if b.is_floating_point():
                b.mul_(d).add_(live_buffers[name], alpha=1 - d)
            else:
                b.copy_(live_buffers[name])
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights (a model state dict, copied to the CPU) and the update count, for checkpoints."""
        model = {k: v.detach().to("cpu", copy=True) for k, v in self.average.state_dict().items()}
        return {"tau": self.tau, "updates": self.updates, "model": model}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state["model"])
        self.updates = int(state["updates"])
