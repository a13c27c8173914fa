"""The one adversarial training step, used by the trainer, ``robust analyze`` and ``robust bench``.

A step reads as: make examples (the objective's attack, adv route), loss, backward, optimizer step.

``loss = w * CE(clean route, x) + (1 - w) * objective(adv route)`` with ``w`` the clean weight
(``--clean-weight``); with ``w = 0`` the clean route is not run at all. The objective's forwards
run entirely in the adv route. With ``fused`` (and ``w > 0``) the clean route's forward shares one
forward with an adv-route forward through :func:`robust.nn.norms.split_routes` (each half normalized
by its own route's batch statistics, so the result equals separate forwards up to float
summation order): ``[x | x_adv]`` for objectives whose loss only needs ``f(x_adv)`` (pgd, fast,
nfgsm), ``[x | x]`` followed by a separate ``f(x_adv)`` for those that also need the adv route's
``f(x)`` (trades, mart: their ``f(x)`` and ``f(x_adv)`` stay separate forwards, as in the official code).

AWP (:mod:`robust.train.awp`), when on, perturbs the weights between the attack and the loss and puts
them back exactly before the optimizer step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from robust.nn.factory import unwrap
from robust.nn.norms import bn_mode, frozen_statistics, split_routes, use_route
from robust.config import TrainConfig
from robust.objectives import Objective, alias_settings, get_objective, hard_labels
from robust.plan import TrainPlan, plan_of
from robust.runtime import autocast
from robust.train.awp import weight_perturbation


def attack_bn_flags(mode: str) -> dict[str, bool]:
    """--attack-bn as StepSettings' two flags: train (batch statistics, updating the running ones), eval
    (running statistics) or frozen (batch statistics, the running ones left as they were)."""
    return {"attack_train_mode": mode in ("train", "frozen"), "attack_frozen": mode == "frozen"}


@dataclass
class StepSettings:
    """What one training step needs to know, read from the run's plan."""

    objective: Objective
    clean_weight: float = 0.0
    attack_train_mode: bool = True
    attack_frozen: bool = False  # train mode, running statistics restored after the attack (--attack-bn frozen)
    fused: bool = True
    amp: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    awp_gamma: float = 0.0

    @classmethod
    def from_plan(cls, plan: TrainPlan, amp: torch.dtype | None, device: torch.device) -> "StepSettings":
        """The step of a run's plan: its objective (with the method's options), clean weight and attack BN mode."""
        return cls(objective=plan.objective, clean_weight=plan.clean_weight, **attack_bn_flags(plan.attack_bn),
                   fused=plan.fused, amp=amp, device=device, awp_gamma=plan.awp_gamma)

    @classmethod
    def from_config(cls, config: TrainConfig | TrainPlan, amp: torch.dtype | None, device: torch.device) -> "StepSettings":
        """:meth:`from_plan` of a config, resolved (and so checked) into its plan first."""
        return cls.from_plan(plan_of(config), amp, device)

    @classmethod
    def of(cls, method: str, eps: float, alpha: float | None = None, steps: int = 7, attack_bn: str | None = None,
           options: dict | None = None, **fields) -> "StepSettings":
        """Settings from plain values (tests, notebooks): ``options`` are the method's own (trades: beta),
        ``attack_bn`` defaults to the objective's, an alias brings its settings (hybrid: clean-weight 0.5)."""
        kind = get_objective(method)
        objective = kind(eps, eps / 4 if alpha is None else alpha, steps, **(options or {}))
        fields = {**alias_settings(method), **fields}
        return cls(objective=objective, **attack_bn_flags(attack_bn or kind.attack_bn), **fields)


@contextlib.contextmanager
def input_gradients_only(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients for the block: an attack needs d loss / d x only, and a
    compiled backward would otherwise compute every weight gradient too. Restored on exit."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def make_adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: StepSettings) -> torch.Tensor:
    """The objective's training examples, made through the adv route in the configured BN mode."""
    frozen = frozen_statistics(model) if s.attack_frozen else contextlib.nullcontext()
    with use_route(model, "adv"), bn_mode(model, s.attack_train_mode), frozen, autocast(s.device, s.amp), \
            input_gradients_only(model):
        return s.objective.examples(model, x, hard_labels(y))


def step_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, s: StepSettings):
    """The step's loss and the adv-route logits of ``x_adv`` (for the running accuracy)."""
    w, objective, n = s.clean_weight, s.objective, len(x)
    clean_logits = natural_logits = None
    with autocast(s.device, s.amp):
        if w > 0 and s.fused:
            with split_routes(model, n):
                both = model(torch.cat([x, x if objective.uses_natural else x_adv]))
            clean_logits, second = both[:n], both[n:]
            if objective.uses_natural:
                natural_logits = second
                with use_route(model, "adv"):
                    adv_logits = model(x_adv)
            else:
                adv_logits = second
        else:
            if w > 0:
                with use_route(model, "clean"):
                    clean_logits = model(x)
            with use_route(model, "adv"):
                if objective.uses_natural:
                    natural_logits = model(x)
                adv_logits = model(x_adv)
        loss = objective.loss(adv_logits, y, natural_logits)
        if w > 0:
            loss = w * objective.ce(clean_logits, y) + (1 - w) * loss
    return loss, adv_logits


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, x: torch.Tensor, y: torch.Tensor,
               s: StepSettings, attack_model: nn.Module | None = None, loss_scale: float = 1.0, awp: bool = False,
               reduce: Callable[[list[torch.Tensor]], None] | None = None):
    """One optimizer step; returns the loss and the adv-route logits, both still on the device.

    ``model`` computes the loss (a DDP wrapper in distributed runs); the attack (and AWP's ascent)
    runs on ``attack_model`` (default: ``model`` without its DDP wrapper, so their forwards and
    gradients never touch DDP's hooks). ``loss_scale`` weights this rank's part of the global
    batch; the returned loss is unscaled. ``awp`` turns the weight perturbation on for this step
    (``s.awp_gamma`` > 0); ``reduce`` averages AWP's ascent gradients over ranks.
    """
    attack_model = attack_model if attack_model is not None else unwrap(model, keep_compiled=True)
    x_adv = make_adversarial(attack_model, x, y, s)                                   # 1. examples
    model.train()
    perturbation = None
    if awp and s.awp_gamma > 0:
        perturbation = weight_perturbation(
            attack_model, lambda: step_loss(attack_model, x, x_adv, y, s)[0] * loss_scale, s.awp_gamma, reduce,
            loss_scale=scaler.get_scale() if scaler is not None else 1.0).apply()
    loss, adv_logits = step_loss(model, x, x_adv, y, s)                               # 2. loss
    optimizer.zero_grad(set_to_none=True)
    objective = loss * loss_scale if loss_scale != 1.0 else loss
    if scaler is not None:                                                            # 3. backward, 4. step
        scaler.scale(objective).backward()
        if perturbation is not None:
            perturbation.restore()
        scaler.step(optimizer)
        scaler.update()
    else:
        objective.backward()
        if perturbation is not None:
            perturbation.restore()
        optimizer.step()
    return loss.detach(), adv_logits.detach()
