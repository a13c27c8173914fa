"""A run folder, read: the name of every file in it and what each holds.

``robust train`` writes a run folder (:class:`robust.train.rundir.RunFolder`, with the names of
:class:`RunFiles`); ``robust eval --json RUN/`` and ``--per-example RUN/`` add the evaluation
beside it; eval, report, export, compare, plot, pseudo-label and the benchmarks read it through
:class:`Run`:

    config.json        the resolved settings of the run          Run.config
    metrics.jsonl      one line per finished epoch               Run.metrics
    best.pt, last.pt   the best (by validation) and the latest   Run.checkpoint("best" | "last")
    epoch<N>.pt        the epochs kept by --keep-epochs          Run.checkpoint("epoch:N")
    eval.json          `robust eval RUN --json RUN/`              Run.evaluation
    per_example.jsonl  `robust eval RUN --per-example RUN/`       Run.per_example

Its layer sits just above :mod:`robust.errors` and below everything else: it reads JSON and names
files, nothing more, so the output checks (:mod:`robust.outputs`: a run's own files are never
overwritten), the checkpoint reader (a run folder means its best.pt) and every reader above can use
it. The settings come back as the saved dict; :meth:`robust.config.TrainConfig.from_saved` makes
them a config where one is needed. Loading the model is :func:`robust.checkpoint.read_checkpoint`
and :func:`robust.checkpoint.load_model`, which take a run folder as well as a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from robust.errors import CheckpointError, ConfigError

_EPOCH = re.compile(r"epoch(\d+)\.pt")


class RunFiles:
    """The names of a run folder's files: :class:`robust.train.rundir.RunFolder` writes them, :class:`Run` reads them."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    LAST = "last.pt"
    BEST = "best.pt"
    CHECKPOINTS = (BEST, LAST)  # the checkpoints a run folder may hold besides kept epochs, preferred first
    EVALUATION = "eval.json"  # `robust eval RUN --json RUN/`
    PER_EXAMPLE = "per_example.jsonl"  # `robust eval RUN --per-example RUN/`
    MARKERS = (BEST, LAST, CONFIG, METRICS)  # what makes a folder a run folder: the run itself, never an output
    REPLACED = ".replaced"  # a replaced run's files (train --force), until the new run's first epoch is saved

    @staticmethod
    def epoch(number: int) -> str:
        """The checkpoint kept after epoch ``number`` (1-based) by --keep-epochs."""
        return f"epoch{int(number)}.pt"

    @staticmethod
    def is_epoch(name: str) -> bool:
        """True for a kept epoch's file name (``epoch7.pt``)."""
        return _EPOCH.fullmatch(name) is not None

    @staticmethod
    def kept_epochs(folder: Path) -> list[str]:
        """The kept epochs' file names in ``folder``, sorted."""
        return sorted(p.name for p in folder.glob("epoch*.pt") if RunFiles.is_epoch(p.name))

    @staticmethod
    def written_by_training(name: str) -> bool:
        """True for the files ``robust train`` writes (config, metrics, checkpoints, kept epochs)."""
        return name in RunFiles.MARKERS or RunFiles.is_epoch(name)

    @staticmethod
    def select(choice: str | int | None = None) -> str:
        """The file name of a checkpoint choice: ``best``, ``last``, ``epoch:N`` (or the number N) or a file name."""
        if choice in ("best", RunFiles.BEST):
            return RunFiles.BEST
        if choice in ("last", RunFiles.LAST):
            return RunFiles.LAST
        if isinstance(choice, int) and not isinstance(choice, bool) and choice >= 1:
            return RunFiles.epoch(choice)
        if isinstance(choice, str) and RunFiles.is_epoch(choice) and int(choice[5:-3]) >= 1:
            return choice
        if isinstance(choice, str) and choice.startswith("epoch:"):
            number = choice[len("epoch:"):]
            if number.isascii() and number.isdigit() and int(number) >= 1:
                return RunFiles.epoch(int(number))
        raise ConfigError(f"checkpoint choice {choice!r} must be best, last or epoch:N (e.g. epoch:5)")


def _checked_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ConfigError(f"a run folder must be a path, got {path!r}")
    return Path(path)


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({type(exc).__name__}); {fix}") from None


def read_evaluation(path: Path, command: str) -> dict[str, Any]:
    """A `robust eval --json` file: its table per route and what came with it; ConfigError naming ``command``
    (the `robust eval` that writes it) when it is unreadable or holds no table."""
    value = _read_json(path, f"write it again with `{command} --force`")
    if isinstance(value, dict) and isinstance(value.get("result"), dict) and "routes" not in value:
        value = value["result"]  # robust compare keeps each run's evaluation as {"key": ..., "result": ...}
    if not isinstance(value, dict) or not isinstance(value.get("routes"), dict):
        raise ConfigError(f"{path} has no per-route table; write it with `{command}`")
    return value


class Run:
    """One run folder. Each attribute reads its file when asked (a run in progress changes under us).

    ``Run(path)`` refuses, with a one-line :class:`~robust.errors.ConfigError`, a path that is no
    folder or a folder with none of the run's own files (:attr:`RunFiles.MARKERS`).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = _checked_path(path)
        if not self.path.is_dir():
            what = "is not a folder (it does not exist)" if not self.path.exists() else "is a file, not a folder"
            raise ConfigError(f"{self.path} {what}; pass a run folder written by `robust train` (its "
                              f"{', '.join(RunFiles.MARKERS)})")
        if not Run.holds_run(self.path):
            raise ConfigError(f"{self.path} is not a run folder: it holds no {', '.join(RunFiles.MARKERS[:-1])} or "
                              f"{RunFiles.MARKERS[-1]}; pass a folder written by `robust train`")

    @staticmethod
    def holds_run(folder: str | os.PathLike[str]) -> bool:
        """True when ``folder`` holds any of a run's own files."""
        folder = Path(folder)
        return any((folder / name).is_file() for name in RunFiles.MARKERS)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The path of one of the run's files (which may not exist)."""
        return self.path / name

    @property
    def config(self) -> dict[str, Any]:
        """The settings ``robust train`` saved (config.json) as a dict; ConfigError when missing or unreadable."""
        path = self.file(RunFiles.CONFIG)
        if not path.is_file():
            raise ConfigError(f"{self.path} has no {RunFiles.CONFIG}; pass a run folder written by `robust train`")
        value = _read_json(path, f"it should be the {RunFiles.CONFIG} `robust train` wrote")
        if not isinstance(value, dict):
            raise ConfigError(f"{path} holds no JSON object; it should be the {RunFiles.CONFIG} `robust train` wrote")
        return value

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The per-epoch metric dicts (metrics.jsonl) in epoch order; a malformed line (a run killed while
        appending) is skipped. ConfigError when the file is missing."""
        path = self.file(RunFiles.METRICS)
        if not path.is_file():
            raise ConfigError(f"{self.path} has no {RunFiles.METRICS}; pass a run folder written by `robust train`")
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "epoch" in row:
                rows.append(row)
        return sorted(rows, key=lambda r: r["epoch"])

    def checkpoint(self, select: str | int | None = None) -> Path:
        """The path of a checkpoint: ``select`` None is what ``robust eval RUN`` scores (best.pt, else last.pt);
        ``best``, ``last`` or ``epoch:N`` one file. CheckpointError when it is not there."""
        if select is None:
            return _default_checkpoint(self.path)
        name = RunFiles.select(select)
        if not self.file(name).is_file():
            fix = "keep epochs with --keep-epochs" if RunFiles.is_epoch(name) else "choose another checkpoint"
            raise CheckpointError(f"{self.path} has no {name}; {fix}")
        return self.file(name)

    @property
    def newest_write(self) -> float | None:
        """When best.pt or last.pt was last written (seconds since the epoch); None without a checkpoint."""
        written = [self.file(n).stat().st_mtime for n in RunFiles.CHECKPOINTS if self.file(n).is_file()]
        return max(written) if written else None

    @property
    def evaluation(self) -> dict[str, Any] | None:
        """The run's evaluation (eval.json: the table per route and what came with it); None without one."""
        path = self.file(RunFiles.EVALUATION)
        return read_evaluation(path, f"robust eval {self.path} --json {self.path}/") if path.is_file() else None

    @property
    def per_example(self) -> list[dict[str, Any]] | None:
        """The per-example verdicts (per_example.jsonl, one dict per image and route); None without the file."""
        path = self.file(RunFiles.PER_EXAMPLE)
        if not path.is_file():
            return None
        fix = f"write it again with `robust eval {self.path} --per-example {self.path}/ --force`"
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is not a `robust eval --per-example` file ({type(exc).__name__}); {fix}") from None
        if not all(isinstance(row, dict) for row in rows):
            raise ConfigError(f"{path} is not a `robust eval --per-example` file (a line is no JSON object); {fix}")
        return rows


def _default_checkpoint(folder: Path) -> Path:
    """What ``robust eval FOLDER`` scores: best.pt, else last.pt."""
    for name in RunFiles.CHECKPOINTS:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} holds no {RunFiles.BEST} or {RunFiles.LAST}; pass a checkpoint file or a run folder")


def checkpoint_path(path: Any) -> Path:
    """The checkpoint file a path means: a file as is, a run folder its best.pt (last.pt when there is no best.pt).

    CheckpointError for a path that does not exist or a folder without either checkpoint.
    """
    path = _checked_path(path)
    if path.is_dir():
        return _default_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint file or a run folder")
    return path


def newest_run(runs: str | os.PathLike[str]) -> Run | None:
    """The run folder directly under ``runs`` whose checkpoint was written last; None when there is none."""
    runs = Path(runs)
    candidates = []
    for folder in (sorted(runs.iterdir()) if runs.is_dir() else []):
        if folder.is_dir() and Run.holds_run(folder):
            run = Run(folder)
            if run.newest_write is not None:
                candidates.append((run.newest_write, str(folder), run))
    return max(candidates, key=lambda c: c[:2])[2] if candidates else None
