"""Projected gradient descent (Madry et al. 2018), FGSM with random start (Wong et al. 2020) and
N-FGSM (de Jorge et al. 2022), plus the KL loss TRADES's attack ascends (Zhang et al. 2019).

The only contract with the model is ``model(x) -> logits`` with x in [0, 1]; eps is in pixel
units. A threat model (:class:`LinfBall`, :class:`L2Ball`, :class:`attacks.l1.L1Ball`) owns the random start, the ascent step
and the projection; one PGD loop uses them. The caller chooses train/eval mode and precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .l1 import L1Ball

Model = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LinfBall:
    """The L-infinity ball of radius eps: sign-gradient steps, clamping projection."""

    name = "linf"

    @staticmethod
    def random_start(x: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.empty_like(x).uniform_(-eps, eps)

    @staticmethod
    def step(grad: torch.Tensor, alpha: float) -> torch.Tensor:
        return alpha * grad.sign()

    @staticmethod
    def project(delta: torch.Tensor, eps: float) -> torch.Tensor:
        return delta.clamp(-eps, eps)

    @staticmethod
    def distance(delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1).abs().amax(dim=1)


class L2Ball:
    """The L2 ball of radius eps: normalized-gradient steps, rescaling projection."""

    name = "l2"

    @staticmethod
    def _norm(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))

    @classmethod
    def random_start(cls, x: torch.Tensor, eps: float) -> torch.Tensor:
        """A uniform radius in [0, eps] along a uniformly random direction."""
        direction = torch.randn_like(x)
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        return direction / cls._norm(direction) * radius * eps

    @classmethod
    def step(cls, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        return alpha * grad / cls._norm(grad)

    @classmethod
    def project(cls, delta: torch.Tensor, eps: float) -> torch.Tensor:
        return delta * (eps / cls._norm(delta)).clamp(max=1.0)

    @staticmethod
    def distance(delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1).norm(dim=1)


THREATS = {"linf": LinfBall, "l2": L2Ball, "l1": L1Ball}


def get_threat(name: str):
    """The threat model class for ``name`` ('linf', 'l2' or 'l1')."""
    try:
        return THREATS[name]
    except KeyError:
        raise ValueError(f"unknown threat model {name!r}; valid: {', '.join(THREATS)}") from None


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy, so the per-example gradient does not shrink with the batch size."""
    return F.cross_entropy(logits.float(), y, reduction="sum")


def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example, in fp32: the true logit minus the best wrong one (below 0: misclassified)."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return true - wrong


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed Carlini-Wagner margin: best wrong logit minus the true logit."""
    return (-logit_margin(logits, y)).sum()


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_margin_loss}


def input_gradient(model: Model, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, eot: int = 1) -> torch.Tensor:
    """``d loss_fn(model(x), y) / dx`` for an ``x`` that requires grad, never weakened by fp16; with ``eot`` > 1 the
    mean of that gradient over ``eot`` forwards (expectation over transformation: a randomized model draws its
    randomness anew in each, so the attack follows the expected loss instead of one sample of it).

    Under fp16 autocast the forward and backward of the attack run in fp32: the softmax gradient
    ``p - onehot`` of a confident example lies below fp16's smallest number (6e-8), so its input
    gradient would be exactly 0 and the example never perturbed. A loss scale would not do in
    general: no single factor lifts a confident example's gradient without overflowing a doubtful
    one's in the same batch, and a per-example scale changes the gradient of a train-mode (batch-
    statistics) forward. bf16 has fp32's exponent range and is left as it is.
    """
    if eot == 1:
        return _one_gradient(model, loss_fn, x, y)
    total = _one_gradient(model, loss_fn, x, y)
    for _ in range(eot - 1):
        total = total + _one_gradient(model, loss_fn, x, y)
    return total / eot


def _one_gradient(model: Model, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One forward's input gradient (:func:`input_gradient`'s fp16 rule)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
        with torch.autocast(device, enabled=False):
            return torch.autograd.grad(loss_fn(model(x.float()), y), x)[0]
    return torch.autograd.grad(loss_fn(model(x), y), x)[0]


@torch.no_grad()
def forward_is_deterministic(model: Model, x: torch.Tensor) -> bool:
    """Whether two forwards of ``x`` give the same bits: False for a randomized model (input noise, dropout kept on,
    random transforms), whose attack step is then no function of the iterate alone."""
    return torch.equal(model(x), model(x))


def pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    threat: str = "linf",
    random_start: bool = True,
    loss: str | LossFn = "ce",
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Untargeted PGD: ``steps`` ascent steps of size ``alpha`` on ``loss`` inside the eps ball.

    Returns ``x_adv`` (detached) with ``||x_adv - x|| <= eps`` and ``x_adv`` in [0, 1].
    Gradients are taken w.r.t. the input only (``autograd.grad``), so no parameter gradient is
    computed or accumulated. eps = 0 or steps = 0 without random start returns ``x`` itself.
    ``start`` is an initial perturbation (TRADES and MART start from ``0.001 * N(0, 1)``); it
    replaces the threat model's random start. :func:`pgd_with` takes the settings as one :class:`PGDSettings`,
    the number of forwards each gradient averages (``eot``) included.
    """
    return pgd_with(model, x, y, PGDSettings(eps, alpha, steps, threat, random_start, loss), start)


def pgd_with(model: Model, x: torch.Tensor, y: torch.Tensor, settings: "PGDSettings",
             start: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`pgd` with ``settings``; ``settings.eot`` > 1 averages each step's gradient over that many forwards
    (:func:`input_gradient`), for a randomized model."""
    eps, alpha = settings.eps, settings.alpha
    ball = get_threat(settings.threat)
    loss_fn = LOSSES[settings.loss] if isinstance(settings.loss, str) else settings.loss
    x = x.detach()
    if eps == 0:
        return x.clone()
    if start is not None:
        delta = start.detach()
    else:
        delta = ball.random_start(x, eps) if settings.random_start else torch.zeros_like(x)
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(settings.steps):
        x_adv.requires_grad_(True)
        grad = input_gradient(model, loss_fn, x_adv, y, settings.eot)
        delta = ball.project(x_adv.detach() + ball.step(grad, alpha) - x, eps)
        x_adv = (x + delta).clamp(0, 1)
    return x_adv.detach()


def fgsm_rs(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float | None = None) -> torch.Tensor:
    """FGSM with a uniform random start, step ``1.25 * eps`` ("fast" AT, Wong et al. 2020)."""
    return pgd(model, x, y, eps, 1.25 * eps if alpha is None else alpha, steps=1, random_start=True)


def gaussian_start(x: torch.Tensor, scale: float = 0.001) -> torch.Tensor:
    """The small Gaussian start of TRADES's and MART's attacks: ``scale * N(0, 1)`` per pixel."""
    return scale * torch.randn_like(x)


def kl_loss_from(clean_logits: torch.Tensor) -> LossFn:
    """TRADES's attack loss: ``sum KL(softmax(clean_logits) || softmax(logits))`` (labels unused).

    The clean distribution is fixed (detached): the attack moves only the adversarial input.
    """
    p = F.softmax(clean_logits.detach().float(), dim=1)
    log_p = F.log_softmax(clean_logits.detach().float(), dim=1)

    def kl(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (p * (log_p - F.log_softmax(logits.float(), dim=1))).sum()

    return kl


def nfgsm(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, noise: float | None = None,
          alpha: float | None = None) -> torch.Tensor:
    """N-FGSM (de Jorge et al. 2022): noise ``U[-noise, noise]`` (default 2 eps), one signed step of
    ``alpha`` (default eps) on the cross-entropy, and **no** projection back to the eps ball: the
    result may lie up to ``noise + alpha`` (3 eps) from x. Only [0, 1] is enforced.
    """
    noise = 2 * eps if noise is None else noise
    alpha = eps if alpha is None else alpha
    x = x.detach()
    x_start = (x + torch.empty_like(x).uniform_(-noise, noise)).clamp(0, 1).requires_grad_(True)
    grad = input_gradient(model, ce_loss, x_start, y)
    return (x_start.detach() + alpha * grad.sign()).clamp(0, 1)


@torch.no_grad()
def fp32_predictions(model: Model, x: torch.Tensor) -> torch.Tensor:
    """The model's predicted classes from an fp32 forward, autocast off: the verdict on an
    adversarial example, whatever precision the attack searched it in."""
    with torch.autocast(x.device.type, enabled=False):
        return model(x.float()).argmax(1)


def pgd_restarts(
    model: Model, x: torch.Tensor, y: torch.Tensor, restarts: int = 1, early_stop: "EarlyStop | None" = None, **kwargs
) -> torch.Tensor:
    """PGD run ``restarts`` times; each example keeps the first restart that fools the model (in fp32).

    With ``early_stop`` (an :class:`EarlyStop`, for a deterministic model in eval mode and the "ce" or "cw" loss)
    an example stops when its iterates enter a cycle or once an earlier restart fooled it; the result
    is bit for bit the full run's (:func:`_pgd_active`), and ``early_stop`` counts the steps saved.
    """
    settings = PGDSettings(**kwargs)

    def run(active: torch.Tensor) -> torch.Tensor:
        if early_stop is None:
            return pgd_with(model, x, y, settings)
        return _pgd_active(model, x, y, settings, active=active, early_stop=early_stop)

    best = run(torch.ones(len(x), dtype=torch.bool, device=x.device))
    if restarts <= 1:
        return best
    fooled = fp32_predictions(model, best) != y
    for _ in range(restarts - 1):
        if bool(fooled.all()):
            break
        candidate = run(~fooled)  # the full run attacks every example again and keeps only the unfooled ones'
        now_fooled = fp32_predictions(model, candidate) != y
        take = now_fooled & ~fooled
        best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), candidate, best)
        fooled |= now_fooled
    return best


# ---- exact early stop ------------------------------------------------------------------------------

WINDOW = 8  # iterates kept per example to recognise a cycle of period up to WINDOW ...
RING_BYTES = 512 * 2**20  # ... fewer where WINDOW copies of the batch would take more memory than this
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64,
         torch.float16: torch.int16, torch.bfloat16: torch.int16}


class EarlyStop:
    """Counts and memory of exact early stopping across the calls of one attack.

    ``run`` counts the example-gradients computed (padding and checks included), ``full`` those the
    full run computes (every example, every step, every restart it runs). ``sizes`` remembers, per
    (batch size, smaller size, threads, autocast), whether a gradient computed on a smaller batch was
    bit-identical to the full batch's: only then does a step run on the smaller batch.
    """

    def __init__(self) -> None:
        self.run = 0
        self.full = 0
        self.sizes: dict[tuple, bool] = {}

    def counts(self) -> dict[str, int]:
        return {"iterations_run": self.run, "iterations_full": self.full}

    def reset_counts(self) -> None:
        self.run = self.full = 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns (equal exactly when the values are the same floats, -0 and NaN included)."""
    return t.contiguous().view(_BITS[t.dtype]) if t.dtype in _BITS else t


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, whether ``a`` and ``b`` hold the same bits."""
    return (_bits(a) == _bits(b)).flatten(1).all(dim=1)


class _Gradients:
    """Input gradients of some rows of a batch of ``full`` rows, computed on fewer rows only where that
    was checked to give the full batch's bits.

    A kernel's arithmetic may depend on the batch size (a GEMM with few rows takes another path, and
    its sums round differently), so a smaller batch is used only after one step computed both ways
    gave identical gradients for the rows that matter. Sizes halve (``full``, ``full/2``, ...); the
    rows are padded with others (whose results are dropped) up to the size.
    """

    def __init__(self, model: Model, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, memo: EarlyStop,
                 eot: int = 1) -> None:
        self.model, self.loss_fn, self.x, self.y, self.memo, self.eot = model, loss_fn, x, y, memo, eot
        self.full = len(x)

    def _key(self, size: int) -> tuple:
        device = self.x.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return (self.full, size, torch.get_num_threads(), device, autocast, self.x.dtype)

    def _on(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        zr = z[rows].requires_grad_(True)
        self.memo.run += len(rows) * self.eot
        return input_gradient(self.model, self.loss_fn, zr, self.y[rows], self.eot)

    def __call__(self, z: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The gradients of rows ``active`` (indices) of the iterates ``z`` (all ``full`` rows)."""
        sizes = [self.full]
        while sizes[-1] > 1 and (sizes[-1] + 1) // 2 >= len(active):
            sizes.append((sizes[-1] + 1) // 2)
        size = next(s for s in reversed(sizes) if s == self.full or self.memo.sizes.get(self._key(s)) is not False)
        if size == self.full:
            everything = torch.arange(self.full, device=z.device)
            return self._on(z, everything)[active]
        idle = torch.ones(self.full, dtype=torch.bool, device=z.device)
        idle[active] = False
        rows = torch.cat([active, idle.nonzero().squeeze(1)[:size - len(active)]])
        small = self._on(z, rows)[:len(active)]
        key = self._key(size)
        if key not in self.memo.sizes:  # checked once: the full batch's bits, or never this size again
            reference = self._on(z, torch.arange(self.full, device=z.device))[active]
            self.memo.sizes[key] = bool(_same_rows(small, reference).all())
            return reference
        return small


@dataclass(frozen=True)
class PGDSettings:
    """One PGD run's settings, named as :func:`pgd` takes them (its ``start`` aside: the early-stopped run
    draws the threat model's own start), and ``eot``, the forwards each gradient averages."""

    eps: float
    alpha: float
    steps: int
    threat: str = "linf"
    random_start: bool = True
    loss: str | LossFn = "ce"
    eot: int = 1


def _pgd_active(model: Model, x: torch.Tensor, y: torch.Tensor, settings: PGDSettings, *, active: torch.Tensor,
                early_stop: EarlyStop) -> torch.Tensor:
    """:func:`pgd`'s result with ``settings`` on the rows ``active`` (a mask), bit for bit, computing fewer steps.

    The step is a function of the iterate alone (fixed step size, a per-example loss, a model in eval
    mode), so an iterate equal in every bit to one ``p`` steps earlier repeats the same ``p`` iterates
    forever: the final one is known (``z[t - p + (steps - t) mod p]``) and the example stops. The other
    rows (inactive) are returned as their start: the caller discards them. The random start is drawn
    for every row, as :func:`pgd` draws it, so the random stream is the full run's.
    """
    eps, alpha, steps, loss = settings.eps, settings.alpha, settings.steps, settings.loss
    if loss not in LOSSES:
        raise ValueError(f"early stop needs a per-example loss ({', '.join(LOSSES)}), got {loss!r}")
    ball = get_threat(settings.threat)
    x = x.detach()
    if eps == 0:
        return x.clone()
    delta = ball.random_start(x, eps) if settings.random_start else torch.zeros_like(x)
    z = (x + delta).clamp(0, 1)
    early_stop.full += len(x) * steps * settings.eot
    rows = active.nonzero().squeeze(1)
    if steps == 0 or len(rows) == 0:
        return z
    gradients = _Gradients(model, LOSSES[loss], x, y, early_stop, settings.eot)
    out = z.clone()
    window = max(1, min(WINDOW, steps, RING_BYTES // (z.numel() * z.element_size())))
    ring = torch.empty((window + 1, *x.shape), dtype=z.dtype, device=z.device)
    ring[0] = z
    for t in range(1, steps + 1):
        grad = torch.zeros_like(z)
        grad[rows] = gradients(z, rows)
        # the step and projection on the whole batch, as the full run computes them: a per-row norm may
        # sum in another order on fewer rows; the finished rows' results are dropped
        new = (x + ball.project(z + ball.step(grad, alpha) - x, eps)).clamp(0, 1)[rows]
        z[rows] = new
        done = torch.zeros(len(rows), dtype=torch.bool, device=z.device)
        for lag in range(1, min(len(ring), t + 1)):
            hit = _same_rows(ring[(t - lag) % len(ring)][rows], new) & ~done
            if bool(hit.any()):
                final = t - lag + (steps - t) % lag  # in [t - lag, t - 1]: still in the ring
                out[rows[hit]] = ring[final % len(ring)][rows[hit]]
                done |= hit
        ring[t % len(ring)][rows] = new
        rows = rows[~done]
        if len(rows) == 0:
            break
    out[rows] = z[rows]
    return out.detach()
