"""Faults during training: signals, non-finite losses, the in-epoch save timer, and their errors.

- SIGINT/SIGTERM (:class:`SignalCatcher`) finish the current step; the trainer then writes
  last.pt (with the position inside the epoch) and raises :class:`TrainingInterrupted`.
- A non-finite loss (:class:`FiniteWatch`) raises :class:`NonFiniteLoss` naming the epoch and
  step, before anything is saved over the last good checkpoint; the watch keeps its state on the
  device, so there is no host sync per step.
- :class:`SaveTimer` says when last.pt is due inside an epoch (``save_every`` seconds).
"""

from __future__ import annotations

import signal
import threading
import time

import torch

from robust.train import distributed as dist_

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class SignalCatcher:
    """While installed, SIGINT/SIGTERM are noted (``signum``) instead of stopping the process.

    A third signal stops at once (KeyboardInterrupt). torchrun forwards the signal a terminal
    already sent to every worker, so two are normal.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.signum, self._count, self._saved = enabled, 0, 0, {}

    def install(self) -> None:
        self.signum, self._count, self._saved = 0, 0, {}
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNAL_NAMES:
            self._saved[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self._count += 1
        if self._count >= 3:
            self.restore()
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}


class SaveTimer:
    """last.pt inside an epoch at most every ``every_s`` seconds (None: at epoch ends only)."""

    def __init__(self, every_s: float | None) -> None:
        self.every_s = every_s or None
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.every_s is not None and time.monotonic() - self.last >= self.every_s

    def saved(self) -> None:
        self.last = time.monotonic()


class FiniteWatch:
    """Finds the first step with a non-finite loss without a host sync per step.

    On the device it keeps "all losses finite so far" and the count of leading finite steps;
    :meth:`first_bad` reads them (one sync) at the trainer's check points.
    """

    def __init__(self, device: torch.device, batch: int, step: int) -> None:
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.good = torch.zeros((), dtype=torch.long, device=device)
        self.restart(batch, step)

    def restart(self, batch: int, step: int) -> None:
        self.ok.fill_(True)
        self.good.zero_()
        self.count, self.batch, self.step = 0, batch, step

    def update(self, loss: torch.Tensor) -> None:
        self.ok.logical_and_(torch.isfinite(loss))
        self.good += self.ok
        self.count += 1

    def first_bad(self) -> int | None:
        """The epoch batch index of the first non-finite loss since the last restart, or None."""
        if self.count == 0:
            return None
        good = int(self.good.item())
        return None if good == self.count else self.batch + good

    def first_bad_on_any_rank(self, ctx: dist_.DistContext) -> int | None:
        """:meth:`first_bad`, the earliest over all ranks (a collective when distributed)."""
        bad = self.first_bad()
        if ctx.enabled:  # a max over (big - step)
            big = 1 << 40
            worst = dist_.control_max([big - bad if bad is not None else 0], ctx)[0]
            bad = big - worst if worst else None
        return bad
