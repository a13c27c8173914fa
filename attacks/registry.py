"""Attack names -> attacks: ``build_attack("pgd20", model, eps)`` returns a callable ``(x, y) -> x_adv``.

Our own PGD engine (:mod:`attacks.pgd`) serves ``fgsm``, ``pgdN`` and ``cwN``; torchattacks serves
the parameter-free attacks of Croce & Hein (APGD, APGD-T, FAB, Square and their ensemble,
AutoAttack). Like the rest of this package it knows nothing of :mod:`robust`: the model is any
``model(x) -> logits`` module with inputs in [0, 1]. The caller chooses the model's route and mode;
torchattacks calls ``model.eval()`` itself, so attack models that are already in eval mode.

Every attack's output should lie in the eps ball around x and in [0, 1];
:func:`check_perturbation` verifies that and raises :class:`PerturbationError` otherwise.
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torchattacks

from .pgd import EarlyStop, fp32_predictions, get_threat, pgd, pgd_restarts

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# AutoAttack's "standard" settings (Croce & Hein 2020): 100 iterations for APGD and FAB.
APGD_STEPS = 100
FAB_STEPS = 100
DEFAULT_QUERIES = 5000

_STEPPED = re.compile(r"^(pgd|cw)(\d+)$")
_FIXED = ("clean", "fgsm", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square", "autoattack")


class PerturbationError(RuntimeError):
    """An attack returned an input outside the eps ball or outside [0, 1]: a bug, never a result."""


def available_attacks() -> list[str]:
    """Every attack name (``N`` stands for the number of steps, e.g. pgd20)."""
    return ["clean", "fgsm", "pgdN", "cwN", *_FIXED[2:]]


@dataclass
class Attack:
    """A named attack: call it as ``attack(x, y) -> x_adv``; ``params`` records its settings."""

    name: str
    run: AttackFn
    params: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # an ensemble's seconds per stage, summed over calls
    on_stage: Callable[[str, int], None] | None = None  # told (stage, images) as an ensemble's stage starts, for progress
    iterations: dict[str, int] = field(default_factory=dict)  # our PGD's iterations_run/iterations_full, summed over calls

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(x, y)


def _unknown(name: str) -> ValueError:
    near = difflib.get_close_matches(name.strip().lower(), [*_FIXED, "pgd20", "cw20"], n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else ""
    return ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(available_attacks())} (N = steps, e.g. pgd20)"
                      + hint)


def parse_attack_name(name: str) -> tuple[str, int | None]:
    """``"pgd20"`` -> ``("pgd", 20)``, ``"square"`` -> ``("square", None)``; ValueError for unknown names."""
    key = name.strip().lower()
    match = _STEPPED.match(key)
    if match:
        steps = int(match.group(2))
        if steps < 1:
            raise ValueError(f"attack {name!r} needs at least 1 step, e.g. {match.group(1)}20")
        return match.group(1), steps
    if key in _FIXED:
        return key, None
    raise _unknown(name)


def _torchattacks_norm(threat: str) -> str:
    return {"linf": "Linf", "l2": "L2"}[get_threat(threat).name]


def _our_pgd(model: nn.Module, eps: float, threat: str, steps: int, loss: str, restarts: int,
             step_size: float | None) -> Attack:
    alpha = eps / 4 if step_size is None else step_size
    params = {"source": "attacks.pgd", "steps": steps, "step_size": alpha, "random_start": True,
              "restarts": restarts, "loss": loss}

    memo = EarlyStop()

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # exact early stop needs a step that depends on the example alone: eval mode (no batch statistics, no dropout)
        exact = not any(m.training for m in model.modules())
        memo.reset_counts()
        x_adv = pgd_restarts(model, x, y, restarts=restarts, early_stop=memo if exact else None, eps=eps, alpha=alpha,
                             steps=steps, threat=threat, random_start=True, loss=loss)
        for key, n in (memo.counts() if exact else {}).items():
            attack.iterations[key] = attack.iterations.get(key, 0) + n
        return x_adv

    attack = Attack("", run, params)
    return attack


def _fgsm(model: nn.Module, eps: float, threat: str) -> Attack:
    """Plain FGSM (Goodfellow et al. 2015): one step of size eps from x, no random start."""

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd(model, x, y, eps, alpha=eps, steps=1, threat=threat, random_start=False)

    return Attack("", run, {"source": "attacks.pgd", "steps": 1, "step_size": eps, "random_start": False, "loss": "ce"})


class FloatLogits(nn.Module):
    """``model`` with its logits in fp32, for torchattacks under bf16 autocast: the forward runs in bf16,
    while the losses, their bookkeeping (some kept as numpy arrays, which have no bf16) and the step
    decisions work on fp32 logits. Its train/eval mode is the wrapped model's own, so torchattacks,
    which switches the model to eval and back to what it found, leaves the caller's mode alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    @property
    def training(self) -> bool:  # type: ignore[override]
        inner = self.__dict__.get("_modules", {}).get("inner")
        return bool(inner.training) if inner is not None else False

    @training.setter
    def training(self, mode: bool) -> None:  # the mode lives in the wrapped model (train() reaches it)
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).float()


def _torchattacks_attack(kind: str, model: nn.Module, eps: float, threat: str, restarts: int,
                         queries: int, seed: int, num_classes: int):
    """One torchattacks attack object with AutoAttack's standard settings."""

    norm = _torchattacks_norm(threat)
    model = FloatLogits(model)
    common = dict(norm=norm, eps=eps, seed=seed, verbose=False)
    if kind in ("apgd-ce", "apgd-dlr"):
        return torchattacks.APGD(model, steps=APGD_STEPS, n_restarts=restarts, loss=kind[5:], **common)
    if kind == "apgd-t":
        return torchattacks.APGDT(model, steps=APGD_STEPS, n_restarts=restarts, n_classes=num_classes, **common)
    if kind in ("fab", "fab-t"):
        return torchattacks.FAB(model, steps=FAB_STEPS, n_restarts=restarts, multi_targeted=kind == "fab-t",
                                n_classes=num_classes, **common)
    if kind == "square":
        # the official standard version's Square: no rescaled schedule (torchattacks' default is True)
        return torchattacks.Square(model, n_queries=queries, n_restarts=restarts, p_init=0.8, loss="margin",
                                   resc_schedule=False, **common)
    raise _unknown(kind)  # pragma: no cover (parse_attack_name filters names first)


def _torchattacks_params(kind: str, restarts: int, queries: int, seed: int, num_classes: int) -> dict[str, Any]:
    params: dict[str, Any] = {"source": "torchattacks", "restarts": restarts, "seed": seed}
    if kind.startswith("apgd"):
        params.update(steps=APGD_STEPS, loss={"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "targeted dlr"}[kind])
    if kind == "apgd-t" or kind == "fab-t":
        params["target_classes"] = num_classes - 1
    if kind.startswith("fab"):
        params["steps"] = FAB_STEPS
    if kind == "square":
        params.update(queries=queries, p_init=0.8, resc_schedule=False)
    return params


def _wrap_torchattacks(kind: str, model: nn.Module, eps: float, threat: str, restarts: int, queries: int,
                       seed: int, num_classes: int) -> Attack:
    atk = _torchattacks_attack(kind, model, eps, threat, restarts, queries, seed, num_classes)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if eps == 0:  # torchattacks divides by eps in places; at eps 0 the only input is x itself
            return x.detach().clone()
        return atk(x, y).detach()

    return Attack("", run, _torchattacks_params(kind, restarts, queries, seed, num_classes))


def _autoattack(model: nn.Module, eps: float, threat: str, restarts: int, queries: int, seed: int,
                num_classes: int) -> Attack:
    """AutoAttack, standard version: APGD-CE, APGD-T, FAB-T, Square, each run on the survivors.

    Built from torchattacks' components with AutoAttack's own settings (100 iterations, 9 target
    classes, 5000 queries); torchattacks.AutoAttack itself uses 10 iterations.
    """
    parts = ("apgd-ce", "apgd-t", "fab-t", "square")
    attacks = [_wrap_torchattacks(p, model, eps, threat, restarts, queries, seed, num_classes) for p in parts]

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x.detach().clone()
        alive = fp32_predictions(model, x) == y
        for part, attack in zip(parts, attacks):
            idx = alive.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            if ensemble.on_stage is not None:
                ensemble.on_stage(part, len(idx))
            start = time.perf_counter()
            candidate = attack(x[idx], y[idx])
            fooled = fp32_predictions(model, candidate) != y[idx]  # a stage's verdict is fp32 whatever it searched in
            x_adv[idx[fooled]] = candidate[fooled]
            alive[idx[fooled]] = False
            ensemble.stage_seconds[part] = ensemble.stage_seconds.get(part, 0.0) + time.perf_counter() - start
        return x_adv

    params = {"source": "torchattacks", "version": "standard", "parts": list(parts), "restarts": restarts,
              "seed": seed, "steps": APGD_STEPS, "queries": queries, "target_classes": num_classes - 1}
    ensemble = Attack("", run, params)
    return ensemble


def build_attack(name: str, model: nn.Module, eps: float, threat: str = "linf", restarts: int = 1,
                 queries: int = DEFAULT_QUERIES, seed: int = 0, num_classes: int = 10,
                 step_size: float | None = None) -> Attack:
    """The attack called ``name`` against ``model`` within the ``threat`` ball of radius ``eps``.

    ``pgdN``/``cwN`` take N steps of ``step_size`` (default eps/4) from a random start, keeping
    the first of ``restarts`` runs that fools the model; ``fgsm`` is one step of size eps.
    Raises ValueError for an unknown name or threat model, naming the valid ones.
    """
    kind, steps = parse_attack_name(name)
    threat = get_threat(threat).name
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if restarts < 1 or queries < 1:
        raise ValueError(f"restarts and queries must be >= 1, got {restarts} and {queries}")
    if kind == "clean":
        attack = Attack("", lambda x, y: x.detach().clone(), {"source": "identity"})
    elif kind == "fgsm":
        attack = _fgsm(model, eps, threat)
    elif kind in ("pgd", "cw"):
        attack = _our_pgd(model, eps, threat, steps, "ce" if kind == "pgd" else "cw", restarts, step_size)
    elif kind == "autoattack":
        attack = _autoattack(model, eps, threat, restarts, queries, seed, num_classes)
    else:
        attack = _wrap_torchattacks(kind, model, eps, threat, restarts, queries, seed, num_classes)
    attack.name = name.strip().lower()
    attack.params = {"threat": threat, "eps": eps, **attack.params}
    return attack


def check_perturbation(x: torch.Tensor, x_adv: torch.Tensor, eps: float, threat: str = "linf",
                       tol: float = 1e-6, name: str = "attack") -> None:
    """Raise PerturbationError unless every ``x_adv`` is finite, in [0, 1] and within eps of ``x``."""
    if x_adv.shape != x.shape:
        raise PerturbationError(f"{name} returned shape {tuple(x_adv.shape)} for inputs of shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x_adv).all()):
        raise PerturbationError(f"{name} returned non-finite inputs")
    low, high = x_adv.min().item(), x_adv.max().item()
    if low < -tol or high > 1 + tol:
        raise PerturbationError(f"{name} left [0, 1]: inputs range over [{low:.6g}, {high:.6g}]")
    distance = get_threat(threat).distance((x_adv - x).float()).max().item()
    if distance > eps + tol * max(1.0, eps):
        raise PerturbationError(f"{name} left the {threat} ball: distance {distance:.8g} > eps {eps:.8g}")
