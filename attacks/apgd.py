"""APGD (Croce & Hein 2020, 2021) for the Linf, L2 and L1 threat models, with the official settings.

One run takes ``steps`` steps from a random start with a step size that halves at checkpoints where the loss
stopped rising (Linf, L2, with momentum 0.75) or, in L1, a sparse step on the gradient's largest coordinates
whose share and size adapt to the sparsity of the best point so far. L1 with ``larger_eps`` runs the
official schedule: 30% of the steps at 3 eps, 30% at 2 eps, 40% at eps, each stage starting from the
previous stage's best point projected onto the smaller ball. The loss is cross-entropy, DLR, or (targeted)
the targeted DLR towards each of the ``target_classes`` most likely wrong classes in turn; ``eot``
forwards are averaged per gradient for randomized models. Each restart attacks only the examples no
earlier run fooled, and the random stream is seeded once per call, as the official code does it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .l1 import l1_norm, project_l1_box

Model = Callable[[torch.Tensor], torch.Tensor]
LOSSES = ("ce", "dlr", "dlr-targeted")


@dataclass(frozen=True)
class APGDSettings:
    """One APGD attack's settings (the official defaults: 100 steps, rho 0.75)."""

    eps: float
    threat: str = "linf"
    loss: str = "ce"  # ce, dlr or dlr-targeted
    steps: int = 100
    restarts: int = 1
    target_classes: int = 9  # dlr-targeted: the most likely wrong classes attacked in turn
    eot: int = 1
    seed: int = 0
    larger_eps: bool = False  # L1 only: the 3 eps, 2 eps, eps schedule
    rho: float = 0.75

    def __post_init__(self) -> None:
        if self.threat not in ("linf", "l2", "l1") or self.loss not in LOSSES:
            raise ValueError(f"APGD takes threat linf, l2 or l1 and loss {', '.join(LOSSES)}, "
                             f"got {self.threat!r} and {self.loss!r}")
        if self.larger_eps and self.threat != "l1":
            raise ValueError("APGD's larger-eps schedule is for the l1 threat model only")


def _shape(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example, the difference-of-logits ratio: -(z_y - max_{i != y} z_i) / (z_1 - z_3), sorted z."""
    z, order = logits.sort(dim=1)
    top_is_y = (order[:, -1] == y).float()
    rows = torch.arange(len(y), device=y.device)
    return -(logits[rows, y] - z[:, -2] * top_is_y - z[:, -1] * (1.0 - top_is_y)) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_targeted_loss(target: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The targeted DLR towards ``target``: -(z_y - z_t) / (z_1 - (z_3 + z_4) / 2), sorted z."""

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = logits.sort(dim=1)[0]
        rows = torch.arange(len(y), device=y.device)
        return -(logits[rows, y] - logits[rows, target]) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)

    return loss


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _unit(t: torch.Tensor, threat: str) -> torch.Tensor:
    """``t`` scaled to norm 1 per example (plus 1e-12 in the divisor), in the threat's norm."""
    rows = t.reshape(t.shape[0], -1)
    norm = {"linf": lambda: rows.abs().amax(dim=1), "l2": lambda: (rows ** 2).sum(dim=1).sqrt(),
            "l1": lambda: rows.abs().sum(dim=1)}[threat]()
    return t / (_shape(norm, t) + 1e-12)


def _gradient(model: Model, loss_fn, x_adv: torch.Tensor, y: torch.Tensor, eot: int):
    """The loss gradient averaged over ``eot`` forwards, with the last forward's logits and per-example loss."""
    x_adv = x_adv.detach().requires_grad_(True)
    grad = torch.zeros_like(x_adv)
    for _ in range(eot):
        with torch.enable_grad():
            logits = model(x_adv).float()
            loss = loss_fn(logits, y)
        grad += torch.autograd.grad(loss.sum(), [x_adv])[0].detach()
    return grad / float(eot), logits.detach(), loss.detach()


def _random_start(x: torch.Tensor, eps: float, threat: str) -> torch.Tensor:
    """The official random start: uniform in the Linf ball's surface scaling, Gaussian direction in L2,
    a Gaussian draw projected onto the L1 ball and the box in L1."""
    if threat == "linf":
        return x + eps * torch.ones_like(x) * _unit(2 * torch.rand(x.shape, device=x.device) - 1, "linf")
    t = torch.randn(x.shape, device=x.device)
    if threat == "l2":
        return x + eps * torch.ones_like(x) * _unit(t, "l2")
    return x + project_l1_box(x, t, eps)


def _step_linf_l2(x, x_adv, x_old, grad, step, eps, threat, a):
    """The Linf/L2 step with momentum ``a`` (1 at the first step), projected onto the ball and the box."""

    def project(z: torch.Tensor) -> torch.Tensor:
        if threat == "linf":
            return torch.clamp(torch.min(torch.max(z, x - eps), x + eps), 0.0, 1.0)
        d = z - x
        norm = _shape((d ** 2).reshape(d.shape[0], -1).sum(dim=1).sqrt(), d)
        return torch.clamp(x + _unit(d, "l2") * torch.min(eps * torch.ones_like(x), norm), 0.0, 1.0)

    direction = grad.sign() if threat == "linf" else _unit(grad, "l2")
    z = project(x_adv + step * direction)
    return project(x_adv + (z - x_adv) * a + (x_adv - x_old) * (1 - a))


def _step_l1(x, x_adv, grad, step, eps, top):
    """The official L1 step: the sign of the gradient on its top ``top`` share of coordinates, L1-normalized,
    then the exact projection onto the L1 ball and the box."""
    n = grad[0].numel()
    rows = torch.arange(len(x), device=x.device)
    kth = grad.abs().reshape(len(x), -1).sort(dim=-1)[0][rows, ((1.0 - top) * n).clamp(0, n - 1).long()]
    sparse = grad * (grad.abs() >= _shape(kth, grad)).float()
    moved = x_adv + step * sparse.sign() / (_shape(l1_norm(sparse.sign()), x) + 1e-10)
    return x + project_l1_box(x, moved - x, eps)


@dataclass
class _Run:
    """The state of one APGD run that its checkpoints read and change."""

    step: torch.Tensor
    x_best: torch.Tensor
    grad_best: torch.Tensor
    loss_best: torch.Tensor


def _single_run(model: Model, x: torch.Tensor, y: torch.Tensor, loss_fn, s: APGDSettings, eps: float, steps: int,
                x_init: torch.Tensor | None = None):
    """One APGD run of ``steps`` steps at radius ``eps``: (highest-loss point, still robust, its loss, the
    adversarial point found for fooled examples). The random start is drawn even with ``x_init``, as the
    official code draws it, so the random stream is the same."""
    start = _random_start(x, eps, s.threat)
    x_adv = (start if x_init is None else x_init.clone()).clamp(0.0, 1.0)
    x_best_adv = x_adv.clone()
    loss_steps = torch.zeros(steps, len(x), device=x.device)
    grad, logits, loss = _gradient(model, loss_fn, x_adv, y, s.eot)
    acc = logits.argmax(1) == y
    run = _Run(torch.full((len(x), *[1] * (x.dim() - 1)), (1.0 if s.threat == "l1" else 2.0) * eps, device=x.device),
               x_adv.clone(), grad.clone(), loss.clone())
    alpha = 1.0 if s.threat == "l1" else 2.0
    n = x[0].numel()
    if s.threat == "l1":
        k = max(int(0.04 * steps), 1)
        sparsity = (x_adv - x != 0).reshape(len(x), -1).sum(dim=1)
        top = torch.full((len(x),), 0.2, device=x.device) if x_init is None else sparsity / n / 1.5
        sparse_old = torch.full((len(x),), float(n), device=x.device) if x_init is None else sparsity
    else:
        k = max(int(0.22 * s.steps), 1)
    best_at_check, reduced_at_check = run.loss_best.clone(), torch.ones_like(run.loss_best)
    x_old, since_check = x_adv.clone(), 0
    for i in range(steps):
        with torch.no_grad():
            previous, x_old = x_old, x_adv.clone()
            if s.threat == "l1":
                x_adv = _step_l1(x, x_adv, grad, run.step, eps, top)
            else:
                x_adv = _step_linf_l2(x, x_adv, previous, grad, run.step, eps, s.threat, 0.75 if i > 0 else 1.0)
        grad, logits, loss = _gradient(model, loss_fn, x_adv, y, s.eot)
        fooled = logits.argmax(1) != y
        acc &= ~fooled
        x_best_adv[fooled] = x_adv[fooled]
        better = loss > run.loss_best
        loss_steps[i] = loss
        run.x_best[better], run.grad_best[better], run.loss_best[better] = x_adv[better], grad[better], loss[better]
        since_check += 1
        if since_check < k:
            continue
        since_check = 0
        if s.threat == "l1":
            sparsity = (run.x_best - x != 0).reshape(len(x), -1).sum(dim=1)
            back = sparsity / sparse_old < 0.95
            top, sparse_old = sparsity / n / 1.5, sparsity.clone()
            run.step[back] = alpha * eps
            run.step[~back] /= 1.5
            run.step.clamp_(alpha * eps / 10.0, alpha * eps)
        else:
            rises = sum((loss_steps[i - c] > loss_steps[i - c - 1]).float() for c in range(k))
            back = (rises <= k * s.rho) | ((reduced_at_check == 0) & (best_at_check >= run.loss_best))
            reduced_at_check, best_at_check = back.float(), run.loss_best.clone()
            run.step[back] /= 2.0
            k = max(k - max(int(0.03 * s.steps), 1), max(int(0.06 * s.steps), 1))
        x_adv[back], grad[back] = run.x_best[back].clone(), run.grad_best[back].clone()
    return run.x_best, acc, run.loss_best, x_best_adv


def _larger_eps_run(model: Model, x: torch.Tensor, y: torch.Tensor, loss_fn, s: APGDSettings):
    """The official L1 schedule: ceil(30%) of the steps at 3 eps, ceil(30%) at 2 eps, the rest at eps."""
    radii = [3.0 * s.eps, 2.0 * s.eps, 1.0 * s.eps]
    steps = [math.ceil(0.3 * s.steps), math.ceil(0.3 * s.steps)]
    steps.append(s.steps - sum(steps))
    x_init = x + torch.randn_like(x)
    x_init = x + project_l1_box(x, x_init - x, radii[0])
    result = None
    for eps, n in zip(radii, steps):
        x_init = x + project_l1_box(x, x_init - x, eps)
        result = _single_run(model, x, y, loss_fn, s, eps, n, x_init=x_init)
        x_init = result[0]
    return result


def _attack(model: Model, x: torch.Tensor, y: torch.Tensor, loss_fn, s: APGDSettings):
    return _larger_eps_run(model, x, y, loss_fn, s) if s.larger_eps else _single_run(
        model, x, y, loss_fn, s, s.eps, s.steps)


def apgd(model: Model, x: torch.Tensor, y: torch.Tensor, s: APGDSettings) -> torch.Tensor:
    """APGD with settings ``s`` against ``model``: the adversarial inputs (``x`` itself where none was found).

    Untargeted (ce, dlr): ``restarts`` runs, each on the examples still robust. Targeted (dlr-targeted):
    for each of the ``target_classes`` most likely wrong classes in turn, ``restarts`` runs towards it.
    """
    x = x.detach().float()
    with torch.no_grad():
        acc = model(x).float().argmax(1) == y
    adv = x.clone()
    if s.eps == 0:
        return adv
    torch.manual_seed(s.seed)
    targets = range(2, s.target_classes + 2) if s.loss == "dlr-targeted" else [None]
    for target in targets:
        for _ in range(s.restarts):
            idx = acc.nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            if target is None:
                loss_fn = _ce if s.loss == "ce" else dlr_loss
            else:
                with torch.no_grad():
                    loss_fn = dlr_targeted_loss(model(x[idx]).float().sort(dim=1)[1][:, -target])
            _, still, _, found = _attack(model, x[idx], y[idx], loss_fn, s)
            fooled = ~still
            acc[idx[fooled]] = False
            adv[idx[fooled]] = found[fooled]
    return adv
