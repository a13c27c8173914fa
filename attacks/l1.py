"""The L1 threat model: its random start, its (sparse) ascent step, and the exact projection onto the
intersection of the L1 ball and the [0, 1] box that APGD-L1 (Croce & Hein 2021) takes.

The projection of a point ``x + y`` (``x`` the clean input in [0, 1], ``y`` the perturbation) is, per
coordinate, ``z_i = sign(y_i) * clip(|y_i| - lam, 0, b_i)`` where ``b_i`` is the room the box leaves in
the direction of ``y_i`` (``1 - x_i`` upwards, ``x_i`` downwards) and ``lam >= 0`` is the smallest
shrinkage that brings ``sum |z_i|`` down to eps. The sum is piecewise linear in ``lam`` with kinks at
``|y_i| - b_i`` and ``|y_i|``: sorting the kinks gives ``lam`` exactly, with no iteration.
"""

from __future__ import annotations

import torch


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def l1_norm(t: torch.Tensor) -> torch.Tensor:
    """Per example, the sum of absolute values."""
    return _rows(t).abs().sum(dim=1)


def shrinkage(a: torch.Tensor, room: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per row, the ``lam >= 0`` with ``sum clip(a - lam, 0, room) = eps`` (0 where the box alone suffices).

    ``a`` and ``room`` are (rows, n) and non-negative. ``g(lam) = sum clip(a - lam, 0, room)`` falls as lam
    grows; its slope between two kinks is minus the number of coordinates whose ``a_i - room_i < lam < a_i``.
    """
    n = a.shape[1]
    kinks = torch.cat([a - room, a], dim=1)
    # each kink a_i starts a coordinate's linear piece as lam falls (+1 to the count), each a_i - room_i ends it
    change = torch.cat([-torch.ones_like(a), torch.ones_like(a)], dim=1)
    kinks, order = kinks.sort(dim=1, descending=True)
    count = change.gather(1, order).cumsum(dim=1)  # coordinates on their linear piece just below each kink
    gaps = kinks[:, :-1] - kinks[:, 1:]
    # g at each kink, descending kinks: g rises by count * gap from one kink to the next
    g = torch.cat([torch.zeros_like(kinks[:, :1]), (count[:, :-1] * gaps).cumsum(dim=1)], dim=1)
    # the last kink where g is still <= eps; lam lies between it and the next (or at/below it, clipped at 0)
    k = ((g <= eps[:, None]).sum(dim=1) - 1).clamp(0, 2 * n - 1)
    g_k, kink_k, count_k = (t.gather(1, k[:, None]).squeeze(1) for t in (g, kinks, count))
    lam = kink_k - (eps - g_k) / count_k.clamp_min(1)
    return lam.clamp_min(0)


def project_l1_box(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """The perturbation ``z`` nearest (in L2) to ``delta`` with ``||z||_1 <= eps`` and ``x + z`` in [0, 1].

    The Euclidean projection of ``x + delta`` onto the intersection of the L1 ball around ``x`` and the
    box, for ``x`` in [0, 1]; computed in fp32 (or the inputs' wider type).
    """
    dtype = torch.promote_types(delta.dtype, torch.float32)
    xr, d = _rows(x).to(dtype), _rows(delta).to(dtype)
    a = d.abs()
    room = torch.where(d >= 0, 1 - xr, xr).clamp_min(0)
    fits = torch.minimum(a, room).sum(dim=1) <= eps
    lam = shrinkage(a, room, torch.full_like(a[:, 0], eps))
    lam = torch.where(fits, torch.zeros_like(lam), lam)
    z = d.sign() * torch.minimum((a - lam[:, None]).clamp_min(0), room)
    return z.view(delta.shape).to(delta.dtype)


def project_l1_ball(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """The Euclidean projection of ``delta`` onto the L1 ball of radius eps (no box)."""
    d = _rows(delta)
    a = d.abs()
    lam = shrinkage(a, a, torch.full_like(a[:, 0], eps))  # no box: each coordinate may shrink to 0
    lam = torch.where(a.sum(dim=1) <= eps, torch.zeros_like(lam), lam)
    return (d.sign() * (a - lam[:, None]).clamp_min(0)).view(delta.shape)


def sparse_sign(grad: torch.Tensor, fraction: torch.Tensor | float) -> torch.Tensor:
    """APGD-L1's step direction: the sign of the gradient on its largest ``fraction`` of coordinates (per
    example, ties kept), scaled to L1 norm 1."""
    g = _rows(grad).abs()
    n = g.shape[1]
    fraction = torch.as_tensor(fraction, dtype=torch.float32, device=grad.device).expand(g.shape[0])
    index = ((1 - fraction) * n).clamp(0, n - 1).long()
    threshold = g.sort(dim=1)[0].gather(1, index[:, None])
    direction = grad.sign() * (_rows(grad).abs() >= threshold).view(grad.shape).to(grad.dtype)
    return direction / (_per_row(l1_norm(direction), grad) + 1e-10)


class L1Ball:
    """The L1 ball of radius eps: sparse sign steps (the top 20% of the gradient), the exact projection
    onto the ball (with ``x``, onto the ball and the [0, 1] box together)."""

    name = "l1"
    top_fraction = 0.2

    @staticmethod
    def random_start(x: torch.Tensor, eps: float) -> torch.Tensor:
        """A uniform radius in [0, eps] along a random (Laplace) direction."""
        direction = torch.distributions.Laplace(0.0, 1.0).sample(x.shape).to(x.device, x.dtype)
        radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype)
        return direction / _per_row(l1_norm(direction).clamp_min(1e-12), x) * _per_row(radius, x) * eps

    @classmethod
    def step(cls, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        return alpha * sparse_sign(grad, cls.top_fraction)

    @staticmethod
    def project(delta: torch.Tensor, eps: float, x: torch.Tensor | None = None) -> torch.Tensor:
        """Onto the L1 ball; with the clean ``x``, onto the ball's intersection with the [0, 1] box."""
        return project_l1_ball(delta, eps) if x is None else project_l1_box(x, delta, eps)

    @staticmethod
    def distance(delta: torch.Tensor) -> torch.Tensor:
        return l1_norm(delta)
