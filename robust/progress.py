"""Progress on long work: a bar on a terminal, a heartbeat line without one, and time estimates.

Training and evaluation count their work with :class:`Progress`. On a terminal with columns it is a
tqdm bar; otherwise (a log file, CI, a job scheduler, a terminal reporting 0 columns) it writes one
plain line every ``ROBUST_HEARTBEAT_S`` seconds (default 30): what it is doing, how far, the time
so far and the estimated time left. Work that takes long between two counts (an attack on one
batch) says what it is in at the moment with :meth:`Progress.doing`, which the heartbeat repeats.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Callable, TextIO

from tqdm import tqdm

HEARTBEAT_ENV = "ROBUST_HEARTBEAT_S"  # seconds between heartbeat lines without a terminal
HEARTBEAT_DEFAULT = 30.0


def heartbeat_interval() -> float:
    """Seconds between heartbeat lines: ``ROBUST_HEARTBEAT_S`` when it is a positive number, else 30."""
    try:
        value = float(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_DEFAULT))
    except ValueError:
        return HEARTBEAT_DEFAULT
    return value if value > 0 else HEARTBEAT_DEFAULT


def has_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal a bar can be drawn on (a tty with at least one column)."""
    isatty = getattr(stream, "isatty", None)
    if isatty is None or not isatty():
        return False
    return shutil.get_terminal_size(fallback=(0, 0)).columns > 0


def format_duration(seconds: float) -> str:
    """A duration for people: 45 s, 12 min, 3.4 h, 5.2 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class Progress:
    """``total`` units of work named ``desc``: a tqdm bar on a terminal, else a heartbeat line at a fixed
    interval; nothing when not ``enabled``. ``clock`` and ``stream`` are for tests."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "it", stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, position: int = 0) -> None:
        self.total, self.desc, self.unit, self.done = int(total), desc, unit, 0
        self.stream = stream if stream is not None else sys.stderr
        self.clock, self.interval = clock, heartbeat_interval()
        self.start = self.last = clock()
        self.note, self.postfix = "", {}
        self.enabled = enabled
        self.bar = None
        if enabled and has_terminal(self.stream):
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=self.stream,
                            position=position)

    def show(self, **postfix: Any) -> None:
        """Figures shown beside the count (the running loss, how many images are still robust)."""
        self.postfix = postfix
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)

    def doing(self, note: str) -> None:
        """What the work is in now (an attack's stage and route); the bar and the heartbeat name it."""
        self.note = note
        if self.bar is not None:
            self.bar.set_description_str(f"{self.desc} [{note}]" if note else self.desc, refresh=True)
        self.beat()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        self.beat()

    def beat(self) -> None:
        """Without a terminal: one line when ``interval`` seconds have passed since the last one."""
        if not self.enabled or self.bar is not None:
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        """The heartbeat line: what, how far, the time so far and the estimated time left."""
        elapsed = (self.clock() if now is None else now) - self.start
        parts = [f"{self.desc}{f' [{self.note}]' if self.note else ''}: {self.done}/{self.total} {self.unit}",
                 f"{format_duration(elapsed)} so far"]
        if 0 < self.done < self.total:
            parts.append(f"about {format_duration(elapsed * (self.total - self.done) / self.done)} left")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_estimate(seconds_per_step: float, steps_left: int, quick: str) -> str:
    """The line training prints after its first steps: the whole run's estimated time (steps only), and
    when that is days, the words that say so and ``quick``, a setting that takes far less."""
    total = seconds_per_step * steps_left
    line = (f"estimated training time: {format_duration(total)} for {steps_left} steps at "
            f"{seconds_per_step:.2f} s per step (validation comes on top)")
    if total >= 86400:
        line += f". That is {total / 86400:.1f} days on this machine; for a quick run try {quick}"
    return line
