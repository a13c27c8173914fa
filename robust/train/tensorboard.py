"""``--tensorboard DIR``: every epoch's metrics line as TensorBoard scalars (the ``tensorboard`` extra).

Rank 0 writes; the step of a scalar is the epoch (1-based), so the curves line up with
metrics.jsonl. A resumed run writes into the same DIR and first drops the events of epochs after
its checkpoint (SummaryWriter's ``purge_step``), so a curve never shows an epoch twice.
"""

from __future__ import annotations

from numbers import Real
from pathlib import Path
from typing import Any

from robust.errors import ConfigError
from robust.run import Run

SKIPPED = ("epoch",)  # the step itself


def check_tensorboard_dir(folder: str | Path, run_dir: str | Path) -> None:
    """The rule for ``--tensorboard DIR``: anywhere except inside another run's folder (a folder, or a parent of
    it, that holds a run's config.json, metrics.jsonl or checkpoints and is not this run's ``run_dir``)."""
    target, own = Path(folder).resolve(), Path(run_dir).resolve()
    for place in (target, *target.parents):
        if place == own:
            return
        if Run.holds_run(place):
            raise ConfigError(f"--tensorboard {folder} is inside the run folder {place}, another run's; write this "
                              f"run's scalars into its own folder (e.g. {Path(run_dir) / 'tb'}) or a folder of no run")


def summary_writer_class():
    """torch's SummaryWriter; a one-line ConfigError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'robust[tensorboard]' "
                          "(or pip install tensorboard)") from None
    return SummaryWriter


def open_writer(folder: str | Path, first_epoch: int):
    """A SummaryWriter on ``folder`` whose events from epoch ``first_epoch`` (1-based) on are replaced."""
    return summary_writer_class()(log_dir=str(folder), purge_step=first_epoch)


class ScalarLog:
    """The run's TensorBoard writer (None on other ranks or without --tensorboard)."""

    def __init__(self, folder: str | Path | None, first_epoch: int, main: bool) -> None:
        self.writer = open_writer(folder, first_epoch) if folder is not None and main else None

    def add(self, metrics: dict[str, Any]) -> None:
        """One epoch's numbers (loss, lr, accuracies, seconds, images/s, the guard's accuracy)."""
        if self.writer is None:
            return
        step = int(metrics["epoch"])
        for name, value in metrics.items():
            if name not in SKIPPED and isinstance(value, Real) and not isinstance(value, bool):
                self.writer.add_scalar(name, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
