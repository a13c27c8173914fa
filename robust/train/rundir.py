"""The run folder, written: config.json, metrics.jsonl, last.pt (with the resume position), best.pt and
kept epochs, by the names of :class:`robust.run.RunFiles` (:class:`robust.run.Run` reads them).

:class:`RunFolder` checks the folder before training (a file in the way, an existing run without
--resume/--force, room for the checkpoints), makes this process its only writer (the OS lock of
:mod:`robust.outputs`), and writes every file atomically on rank 0, so a kill -9 at any moment
leaves a loadable last.pt. A failed write becomes :class:`robust.errors.CheckpointWriteError` on
every rank. metrics.jsonl is kept in step with last.pt: a resume drops the lines of epochs after
the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from robust import checkpoint as ckpt
from robust.errors import CheckpointWriteError, ConfigError, RunExistsError
from robust.outputs import FolderLock, holds_files, probe_folder, write_json, write_output
from robust.run import RunFiles
from robust.train import distributed as dist_


def append_line(path: Path, line: str) -> None:
    """Append one line; on failure cut the file back, so no half line is ever left."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        if path.exists():
            os.truncate(path, size)
        raise


def line_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; infinity for a line that is not one (dropped on resume)."""
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def describe(epoch: int, batch: int) -> str:
    """Where a last.pt stands, in words: before epoch ``epoch`` (0-based) batch ``batch``."""
    if batch:
        return f"epoch {epoch + 1}, step {batch}"
    return f"end of epoch {epoch}" if epoch else "start of training"


class RunFolder:
    """One run's folder, written by rank 0 only; ``last_saved`` says what last.pt holds, in words."""

    def __init__(self, path: Path, dist: dist_.DistContext, resume: bool, force: bool) -> None:
        self.path, self.dist, self.resume, self.force = Path(path), dist, resume, force
        self.last_saved = "nothing yet"
        self._lock: FolderLock | None = None
        self._resumed_stamp = None
        self._settled = True  # nothing to undo until prepare() writes
        self._moved: list[str] = []  # a replaced run's files, kept in BACKUP until this run's first epoch

    @property
    def last_pt(self) -> Path:
        return self.path / RunFiles.LAST

    # ---- before training ------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse a folder we must not write: checked at setup, and again once we hold the lock."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} is a file, not a folder; pass a folder path")
        if self.resume:
            if not self.last_pt.is_file():
                raise ConfigError(f"cannot resume: {self.path}/last.pt does not exist; start a new run without --resume "
                                  "(with --force if the folder exists)")
        elif self.dist.is_main and holds_files(self.path) and not self.force:
            raise RunExistsError(f"run folder {self.path} already exists; pass --resume to continue it, --force to replace it, or --out NEW")

    def read_last(self, device) -> dict[str, Any]:
        """The last.pt to resume from (remembering which file it was)."""
        self._resumed_stamp = self._stamp()
        return ckpt.read_checkpoint(self.last_pt, map_location=device)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.last_pt.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def check_room(self, checkpoint_bytes: int, kept: int = 0) -> None:
        """Refuse before training when the folder cannot take our files (probe write, free space)."""
        need = (3 + kept) * checkpoint_bytes + (1 << 20)  # last.pt, best.pt, kept epochs and one temporary copy
        probe_folder(self.path, "--out", need, what="the checkpoints")

    def lock(self) -> None:
        """Become the folder's only writer (rank 0), then re-check it: another run may have used it since setup."""
        error = None
        if self.dist.is_main:
            try:
                self._lock = (self._lock or FolderLock(self.path)).acquire()
                self.check()
                if self.resume and self._stamp() != self._resumed_stamp:
                    raise ConfigError(f"{self.last_pt} changed after this run read it (another process wrote it); "
                                      "start the resume again")
            except Exception as exc:
                self.unlock()
                error = exc
        dist_.agree(self.dist, error)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    # ---- writing (rank 0 writes, every rank agrees) -----------------------------------------------
    def on_main(self, write: Callable[[], None], what: str) -> None:
        """Run ``write`` on rank 0 only; a failed write becomes CheckpointWriteError on every rank."""
        error = None
        if self.dist.is_main:
            try:
                write()
            except OSError as exc:
                kept = f"{self.last_pt} ({self.last_saved}) is kept" if self.last_pt.is_file() else "no last.pt was written yet"
                error = CheckpointWriteError(f"could not write {what} in {self.path}: {exc.strerror or exc}; {kept}; "
                                             "free space or fix the folder, then rerun with --resume")
        dist_.agree(self.dist, error)

    BACKUP = RunFiles.REPLACED  # a replaced run's files (--force), until the new run's first epoch is saved

    def prepare(self, config: dict[str, Any], start_epoch: int) -> None:
        """Set a replaced run's files aside (or, resuming, drop metric lines after the checkpoint); write config.json.

        Until :meth:`settle` (the first epoch saved), :meth:`undo` puts the folder back as it was:
        a run that fails in its first epoch neither blocks its own rerun nor loses the run it replaced.
        """
        def write() -> None:
            run = self.path
            run.mkdir(parents=True, exist_ok=True)
            for name in RunFiles.MARKERS:
                for stale in run.glob(f".{name}.*.tmp"):  # the temporary file of a write a kill -9 interrupted
                    stale.unlink(missing_ok=True)
            for stale in run.glob(".epoch*.pt.*.tmp"):
                stale.unlink(missing_ok=True)
            backup = run / self.BACKUP
            self._settled, self._moved = False, []
            if not self.resume:
                if backup.exists():  # left by a replacing run killed in its first epoch: this run replaces both
                    shutil.rmtree(backup, ignore_errors=True)
                names = list(RunFiles.MARKERS)
                names += RunFiles.kept_epochs(run)  # a replaced run's kept epochs
                for name in names:
                    if (run / name).is_file():
                        backup.mkdir(exist_ok=True)
                        os.replace(run / name, backup / name)
                        self._moved.append(name)
            else:  # drop metric lines of epochs after the checkpoint (a crash between the two writes)
                path = run / RunFiles.METRICS
                if path.exists():
                    lines = [l for l in path.read_text().splitlines() if line_epoch(l) <= start_epoch]
                    write_output(path, "".join(l + "\n" for l in lines))
                if (run / RunFiles.CONFIG).is_file() and not backup.exists():
                    backup.mkdir()
                    shutil.copy2(run / RunFiles.CONFIG, backup / RunFiles.CONFIG)
                    self._moved.append(RunFiles.CONFIG)
            write_json(run / RunFiles.CONFIG, config)

        self.on_main(write, RunFiles.CONFIG)

    def settle(self) -> None:
        """This run's first epoch is saved: the files it replaced are dropped for good."""
        if self._settled:
            return
        self._settled = True
        if self.dist.is_main:
            shutil.rmtree(self.path / self.BACKUP, ignore_errors=True)

    def undo(self) -> None:
        """The run failed before its first epoch was saved: remove what it wrote and put back what it replaced
        (rank 0; best effort: the error that stopped the run is the one reported)."""
        if self._settled or not self.dist.is_main:
            return
        self._settled = True
        run, backup = self.path, self.path / self.BACKUP
        try:
            if not self.resume:  # everything of these names is this run's: prepare() set the old ones aside
                kept = RunFiles.kept_epochs(run)
                for name in [*RunFiles.MARKERS, *kept]:
                    (run / name).unlink(missing_ok=True)
            for name in self._moved:
                os.replace(backup / name, run / name)
            if backup.is_dir() and not any(backup.iterdir()):
                backup.rmdir()
        except OSError:
            pass

    def save_position(self, state: dict[str, Any] | None, epoch: int, batch: int) -> None:
        """last.pt at a point inside epoch ``epoch`` (0-based) before batch ``batch`` (``state`` on rank 0)."""
        self.on_main(lambda: ckpt.save_checkpoint(state, self.last_pt), RunFiles.LAST)
        self.last_saved = describe(epoch, batch)

    def save_epoch(self, state: dict[str, Any] | None, epoch: int, metrics: dict[str, Any], best: bool,
                   keep: bool = False) -> None:
        """The end of epoch ``epoch`` (0-based): its metrics line, then best.pt (if ``best``), epoch<N>.pt
        (if ``keep``: --keep-epochs) and last.pt."""
        def write() -> None:  # metrics first: a crash before last.pt redoes the epoch, and resume drops the line
            log = self.path / RunFiles.METRICS
            size = log.stat().st_size if log.exists() else 0
            append_line(log, json.dumps(metrics) + "\n")
            try:
                if best:
                    ckpt.save_checkpoint(state, self.path / RunFiles.BEST)
                if keep:
                    ckpt.save_checkpoint(state, self.path / RunFiles.epoch(epoch + 1))
                ckpt.save_checkpoint(state, self.last_pt)
            except OSError:
                os.truncate(log, size)  # keep metrics.jsonl in step with last.pt
                raise

        self.on_main(write, f"the epoch {epoch + 1} checkpoint")
        self.last_saved = describe(epoch + 1, 0)

    def save_stopped(self, state: dict[str, Any] | None, metrics: dict[str, Any], kept: int) -> None:
        """A run the catastrophic-overfitting guard stopped: the collapsed epoch's metrics line, then last.pt
        back at the kept epoch ``kept`` (1-based)."""
        def write() -> None:
            append_line(self.path / RunFiles.METRICS, json.dumps(metrics) + "\n")
            ckpt.save_checkpoint(state, self.last_pt)

        self.on_main(write, f"the epoch {kept} checkpoint")
        self.last_saved = describe(kept, 0)
