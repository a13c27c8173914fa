"""--time-budget: a wall-clock budget turned into a number of optimizer steps, once, before training.

The run times its own work after two warm-up steps (a few training steps on the loop's own batches, one
validation batch, the CO guard's check; the model, optimizer and scaler are put back as they were, so the
probe trains nothing) and buys the most
steps whose training, per-epoch validation and the time already spent (start, data loading, the probe)
fit in the budget less :data:`MARGIN`. The steps bought are recorded as ``train_steps`` in config.json
and the schedule spans them: a resume or a rerun on another machine trains exactly those steps, and
no clock is read inside the schedule.

The clock is a parameter (:class:`Probe`), so a test fakes the step time and checks the count.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from robust.checks import format_duration
from robust.errors import ConfigError

MARGIN = 0.15  # of the budget kept back: a long run's steps took 8-12% longer than the probe's on an idle CPU (epochs of one run differ by up to 6%), checkpoint writes, the process's end
WARMUP_STEPS = 2  # untimed: the first steps pay for allocations and kernel choice (on a CPU the second one too)
TIMED_STEPS = 5


@dataclass(frozen=True)
class Costs:
    """What the probe measured, in seconds: one training step (on the loop's own batches), one whole validation
    pass, the time the process has spent before training (start, data loading, building, the probe itself), and
    the other per-epoch work (the CO guard's check)."""

    step_s: float
    val_s: float
    spent_s: float
    checks_s: float = 0.0

    @property
    def epoch_extra_s(self) -> float:
        """What every epoch costs besides its steps: the validation pass and the checks."""
        return self.val_s + self.checks_s


@dataclass(frozen=True)
class Bought:
    """The steps a budget buys: ``steps`` in all, over ``epochs`` (the last may stop part-way)."""

    budget_s: float
    steps: int
    batches_per_epoch: int
    batch_size: int
    costs: Costs

    @property
    def epochs(self) -> int:
        return epochs_for(self.steps, self.batches_per_epoch)

    @property
    def predicted_s(self) -> float:
        """The whole process's predicted time: spent + steps + one validation per epoch."""
        return self.costs.spent_s + self.steps * self.costs.step_s + self.epochs * self.costs.epoch_extra_s

    def describe(self) -> str:
        """The run's first line: what the budget bought and from which measurements."""
        c = self.costs
        checks = f", {c.checks_s:.3g}s a guard check" if c.checks_s else ""
        return (f"time budget {format_duration(self.budget_s)} buys {self.steps:,} steps of batch {self.batch_size} "
                f"({self.steps / self.batches_per_epoch:.2f} epochs, {self.steps * self.batch_size:,} images): "
                f"{c.step_s:.3g}s a step, {c.val_s:.3g}s a validation{checks}, {c.spent_s:.0f}s spent before training, "
                f"{MARGIN:.0%} kept as margin; the same steps anywhere: --train-steps {self.steps}")


def process_started() -> float:
    """``time.perf_counter``'s reading when this process started (Linux's /proc; elsewhere: now), so a command's
    budget counts Python's start and its imports too."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        uptime = float(open("/proc/uptime").read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        age = 0.0
    return time.perf_counter() - max(0.0, age)


def epochs_for(steps: int, batches_per_epoch: int) -> int:
    """Epochs that ``steps`` optimizer steps need (the last one stops part-way when they do not divide)."""
    return max(1, math.ceil(steps / max(1, batches_per_epoch)))


def steps_in_epoch(epoch: int, batches_per_epoch: int, train_steps: int | None) -> int:
    """Batches that epoch ``epoch`` (0-based) trains: all of them, except in the last epoch of a step-limited run."""
    if train_steps is None:
        return batches_per_epoch
    return max(0, min(batches_per_epoch, train_steps - epoch * batches_per_epoch))


def buy_steps(budget_s: float, costs: Costs, batches_per_epoch: int, batch_size: int) -> Bought:
    """The most steps whose whole process fits ``budget_s`` less the margin: each epoch costs its steps and one
    validation pass (a part-epoch too). ConfigError when that is less than one epoch, naming what one costs."""
    usable = budget_s * (1 - MARGIN) - costs.spent_s
    epoch_s = batches_per_epoch * costs.step_s + costs.epoch_extra_s
    full = max(0, math.floor(usable / epoch_s)) if epoch_s > 0 else 0
    left = usable - full * epoch_s - costs.epoch_extra_s  # a part-epoch pays its own validation and checks
    extra = min(batches_per_epoch - 1, math.floor(left / costs.step_s)) if left > 0 and costs.step_s > 0 else 0
    steps = full * batches_per_epoch + max(0, extra)
    if steps < batches_per_epoch:
        need = (costs.spent_s + epoch_s) / (1 - MARGIN)
        raise ConfigError(f"time-budget {format_duration(budget_s)} cannot buy one epoch here ({batches_per_epoch} "
                          f"steps at {costs.step_s:.3g}s, validation and checks {costs.epoch_extra_s:.3g}s, {costs.spent_s:.0f}s spent "
                          f"before training, {MARGIN:.0%} margin: about {format_duration(need)}); give at least "
                          f"{format_duration(math.ceil(need))}, or train on fewer images (--limit) or a smaller model")
    return Bought(budget_s, steps, batches_per_epoch, batch_size, costs)


class Probe:
    """Times a training step and a validation pass with ``clock`` (seconds, e.g. ``time.perf_counter``).

    ``train_once()`` runs one training step; ``validate_part()`` scores one validation batch and ``val_parts``
    is how many such batches a whole pass holds. ``keep`` (objects with ``state_dict``/``load_state_dict``:
    the model, the optimizer, the scaler) are restored after the probe, so it changes nothing the run trains.
    """

    def __init__(self, clock: Callable[[], float], keep: list[Any]) -> None:
        self.clock = clock
        self.keep = [k for k in keep if k is not None]

    def measure(self, train_once: Callable[[], Any], validate_part: Callable[[], Any], val_parts: float,
                started: float, per_epoch: Callable[[], Any] | None = None) -> Costs:
        """The costs of this run's steps, and the seconds spent since ``started`` (a reading of the clock);
        ``per_epoch`` (the CO guard's check) is timed once, as every epoch runs it once."""
        saved = [copy.deepcopy(k.state_dict()) for k in self.keep]
        try:
            for _ in range(WARMUP_STEPS):
                train_once()
            t0 = self.clock()
            for _ in range(TIMED_STEPS):
                train_once()
            t1 = self.clock()
            val_s = 0.0
            if val_parts > 0:
                validate_part()
                val_s = (self.clock() - t1) * val_parts
            checks_s = 0.0
            if per_epoch is not None:
                t2 = self.clock()
                per_epoch()
                checks_s = self.clock() - t2
        finally:
            for k, state in zip(self.keep, saved):
                k.load_state_dict(state)
        return Costs(step_s=(t1 - t0) / TIMED_STEPS, val_s=val_s, spent_s=self.clock() - started, checks_s=checks_s)
