"""Square Attack (Andriushchenko et al. 2020) in L1: a black-box random search on the margin loss, with the
official AutoAttack settings (5000 queries, p_init 0.8, the schedule not rescaled).

The start spreads the whole budget over a grid of small squares, each a signed two-lobe pattern (one half
positive, the other negative, weights falling as 1/(ring+1)^4 from each half's centre). Each query moves the
mass of a random square window (and of a second window that it empties) into a fresh pattern plus the
window's old content, gives it whatever budget the image has left, projects onto the L1 ball and the [0, 1]
box, and keeps the point where the margin fell or the model is fooled. The window side follows p, the share
of the image a window covers, which halves at fixed query counts. Every point lies in the ball of radius
eps * (1 - 1e-6) and the box, by the exact projection of :mod:`attacks.l1`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .l1 import l1_norm, project_l1_box
from .pgd import fp32_predictions, logit_margin

Model = Callable[[torch.Tensor], torch.Tensor]

# query counts after which p halves (the official schedule for 10000 queries; 5000 stop at /128)
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@dataclass(frozen=True)
class SquareSettings:
    """One Square attack in L1 (the official standard version: 5000 queries, p_init 0.8, 1 restart)."""

    eps: float
    queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    seed: int = 0


def square_share(p_init: float, query: int) -> float:
    """p, the share of the image a window covers at ``query`` (0-based): p_init halved once per halving passed."""
    return p_init / 2 ** sum(query > q for q in P_HALVINGS)


def window_side(p: float, height: int, width: int) -> int:
    """The side of a window covering share ``p`` of an image: odd and at least 3, then cut to the image's side."""
    side = max(int(round(math.sqrt(p * height * width))), 3)
    side += 1 - side % 2
    return min(side, height, width)


def ring_pattern(rows: int, cols: int) -> torch.Tensor:
    """A ``rows`` x ``cols`` patch of concentric square rings around its centre, ring k weighing
    sum_{j >= k} 1/(j+1)^4, scaled to L1 norm 1."""
    ci, cj = rows // 2, cols // 2
    rings = max(rows // 2 + 1, cols // 2 + 1)
    i = (torch.arange(rows) - ci).abs()[:, None]
    j = (torch.arange(cols) - cj).abs()[None, :]
    ring = torch.maximum(i, j)
    tail = (1.0 / torch.arange(1, rings + 1, dtype=torch.float32) ** 4).flip(0).cumsum(0).flip(0)
    patch = tail[ring.clamp(max=rings - 1)]
    return patch / patch.sum().clamp_min(1e-12)


def two_lobes(side: int, transpose: bool) -> torch.Tensor:
    """A ``side`` x ``side`` pattern of L1 norm 1: a positive ring patch on the top half, a negative one on the
    bottom half (left and right halves when ``transpose``)."""
    top = side // 2
    lobe = torch.cat([ring_pattern(top, side), -ring_pattern(side - top, side)]) if top else -ring_pattern(side, side)
    lobe = lobe / lobe.abs().sum()
    return lobe.t() if transpose else lobe


def _uniform(*shape: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform draws in [0, 1) from the CPU random stream (on every device, as the official code draws them), so a
    seed gives the same search everywhere."""
    return torch.rand(shape).to(device)


def _transposed() -> bool:
    return bool(_uniform(1) > 0.5)


def _signs(n: int, channels: int, device: torch.device) -> torch.Tensor:
    """A random sign per example and channel."""
    return (2 * _uniform(n, channels, 1, 1, device=device) - 1).sign()


def _corner(size: int, side: int) -> int:
    """A window's first row (or column): uniform over the ``size - side`` positions before the last (0 when the
    window fills the image), the official draw."""
    return int(_uniform(1) * (size - side))


def _start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The first point: a grid of (h // 5)-sided two-lobe patterns, random sign per example and channel,
    projected onto the ball (radius eps * (1 - 1e-6)) and the box."""
    n, c, h, w = x.shape
    side = max(h // 5, 1)
    offset = (h - 5 * side) // 2
    delta = torch.zeros_like(x)
    for a in range(h // side):
        for b in range(w // side):
            top, left = offset + a * side, offset + b * side
            pattern = two_lobes(side, _transposed()).to(x.device)
            patch = delta[:, :, top:top + side, left:left + side]
            patch += (pattern * _signs(n, c, x.device))[:, :, :patch.shape[2], :patch.shape[3]]
    return _in_ball(x, delta, eps)


def _in_ball(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` plus the projection of ``delta`` onto the ball of radius eps * (1 - 1e-6) and the box, pulled towards
    ``x`` where fp32 left it outside: the projection's shrinkage comes from sums of ``delta``'s entries, whose
    rounding (relative 1e-7 of sums far larger than eps when ``delta`` is) can exceed the 1e-6 margin."""
    radius = eps * (1 - 1e-6)
    point = x + project_l1_box(x, delta, radius)
    norm = l1_norm(point - x)
    scale = torch.where(norm > radius, radius / norm.clamp_min(1e-30), torch.ones_like(norm))
    return x + (point - x) * scale.view(-1, *[1] * (x.dim() - 1))


def margin(model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example, the true class's logit minus the largest other logit (below 0: fooled)."""
    return logit_margin(model(x), y)


def _proposal(x: torch.Tensor, best: torch.Tensor, eps: float, side: int) -> torch.Tensor:
    """One query's candidate: window 1's mass and the budget left (and window 2's mass, emptied) go into window
    1 as a fresh pattern plus window 1's old content, each at L1 norm 1, per example and channel."""
    n, c, h, w = x.shape
    t1, l1, t2, l2 = (_corner(size, side) for size in (h, w, h, w))
    delta = best - x
    window = delta[:, :, t1:t1 + side, l1:l1 + side]
    union = torch.zeros_like(delta[:1, :1])
    union[..., t1:t1 + side, l1:l1 + side] = 1
    union[..., t2:t2 + side, l2:l2 + side] = 1
    room = (eps - l1_norm(delta)).clamp_min(0).view(-1, 1, 1, 1)
    mass = (delta * union).abs().sum(dim=(2, 3), keepdim=True)
    fresh = two_lobes(side, _transposed()).to(x.device) * _signs(n, c, x.device)
    fresh = fresh + window / (window.abs().sum(dim=(2, 3), keepdim=True) + 1e-12)
    fresh = fresh / (fresh.abs().sum(dim=(2, 3), keepdim=True) + 1e-12) * (room + c * mass)
    delta[:, :, t2:t2 + side, l2:l2 + side] = 0
    delta[:, :, t1:t1 + side, l1:l1 + side] = fresh
    return _in_ball(x, delta, eps)


def _single_run(model: Model, x: torch.Tensor, y: torch.Tensor, s: SquareSettings) -> torch.Tensor:
    """One run of ``s.queries`` queries: the lowest-margin point per example (a fooling one where found)."""
    best = _start(x, s.eps)
    best_margin = margin(model, best, y)
    for query in range(s.queries):
        idx = (best_margin > 0).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        side = window_side(square_share(s.p_init, query), x.shape[2], x.shape[3])
        candidate = _proposal(x[idx], best[idx], s.eps, side)
        m = margin(model, candidate, y[idx])
        better = m < best_margin[idx]
        best[idx[better]], best_margin[idx[better]] = candidate[better], m[better]
    return best


def square_l1(model: Model, x: torch.Tensor, y: torch.Tensor, s: SquareSettings) -> torch.Tensor:
    """Square in L1 against ``model``: adversarial inputs (misclassified in fp32, within eps in L1, in [0, 1]),
    ``x`` itself where none was found. ``restarts`` runs, each on the examples no earlier run fooled; the random
    stream is seeded once per call."""
    x = x.detach().float()
    adv = x.clone()
    if s.eps == 0:
        return adv
    robust = fp32_predictions(model, x) == y
    torch.manual_seed(s.seed)
    with torch.no_grad():
        for _ in range(s.restarts):
            idx = robust.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            candidate = _single_run(model, x[idx], y[idx], s)
            fooled = (fp32_predictions(model, candidate) != y[idx]) & (l1_norm(candidate - x[idx]) <= s.eps)
            adv[idx[fooled]] = candidate[fooled]
            robust[idx[fooled]] = False
    return adv
