"""Pieces shared by the commands: the bad-input error and the errors it stands for, seeds, model paths."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from robust.checkpoint import resolve_checkpoint_path
from robust.checks import MAX_SEED
from robust.errors import CheckpointError, ConfigError, DataError, ModelError, non_ascii_digits
from robust.outputs import RunFiles, check_output


class BadInput(click.ClickException):
    """A one-line ``Error: ...`` and exit code 2, like click's own usage errors."""

    exit_code = 2


# Library errors that mean "the user gave us something we cannot use".
BAD_INPUT_ERRORS = (ConfigError, DataError, CheckpointError, ModelError)

SEED = click.IntRange(0, MAX_SEED)  # what torch.manual_seed and our step seeds accept


class _AsciiDigits:
    """Mixed into click's number types: ``--epochs ３`` or ``--limit ٣`` is refused, not read as 3."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.isascii():
            odd = non_ascii_digits(value) or "".join(ch for ch in value if not ch.isascii())
            self.fail(f"{value!r} has characters that are not ASCII ({', '.join(map(repr, odd))}); "
                      "write the number with the digits 0-9", param, ctx)
        return super().convert(value, param, ctx)


_ASCII_TYPES: dict[type, type] = {}


def ascii_numbers(cmd: click.Command) -> click.Command:
    """``cmd`` with every number option and argument (int, float and their ranges) refusing non-ASCII digits."""
    for param in cmd.params:
        kind = type(param.type)
        if isinstance(param.type, _AsciiDigits) or not issubclass(kind, (click.types.IntParamType, click.types.FloatParamType)):
            continue
        if kind not in _ASCII_TYPES:
            _ASCII_TYPES[kind] = type(f"Ascii{kind.__name__}", (_AsciiDigits, kind), {})
        checked = object.__new__(_ASCII_TYPES[kind])
        checked.__dict__.update(param.type.__dict__)
        param.type = checked
    return cmd


RUNS = Path("runs")


def newest_run(runs: Path = RUNS) -> str:
    """The run folder under ``runs`` whose checkpoint was written last (what `robust eval` scores by default)."""
    candidates = []
    for folder in (runs.iterdir() if runs.is_dir() else []):
        written = [f.stat().st_mtime for f in (folder / name for name in RunFiles.CHECKPOINTS) if f.is_file()]
        if written:
            candidates.append((max(written), str(folder)))
    if not candidates:
        raise BadInput(f"no CHECKPOINT given and no run folder with a checkpoint under ./{runs}; "
                       f"pass a checkpoint file or run folder, e.g. robust eval {runs}/NAME")
    return max(candidates)[1]


def model_file(path: str) -> Path:
    """The checkpoint file a CHECKPOINT argument means; says so when a run folder without best.pt gives last.pt."""
    resolved = resolve_checkpoint_path(path)
    if Path(path).is_dir() and resolved.name == RunFiles.LAST:
        click.echo(f"note: {path} has no best.pt (no validation, or training stopped early); using {resolved}", err=True)
    return resolved


# The files of a run folder (and of a compare folder) that no output option may replace, even with --force:
# they are the run, not a result written from it.
_RUN_MARKERS = (RunFiles.CONFIG, RunFiles.METRICS, *RunFiles.CHECKPOINTS)
_COMPARE_SETTINGS = "compare.json"


def _protected(path: Path) -> str | None:
    """What ``path`` is when it is a file of a run or compare folder (``the best.pt of the run folder runs/a``)."""
    name, folder = path.name, path.parent
    run_file = name in _RUN_MARKERS or re.fullmatch(r"epoch\d+\.pt", name)
    if run_file and any((folder / marker).is_file() for marker in _RUN_MARKERS):
        return f"the {name} of the run folder {folder}"
    if name == _COMPARE_SETTINGS and folder.joinpath(_COMPARE_SETTINGS).is_file():
        return f"the settings of the comparison in {folder}"
    return None


def check_output_file(path: str | os.PathLike[str], flag: str, force: bool = False, default_name: str | None = None,
                      inputs: tuple = ()) -> Path:
    """:func:`robust.outputs.check_output`, and never a file this command reads (``inputs``) or a run's own
    file (its checkpoints, config.json, metrics.jsonl; a comparison's compare.json), even with --force."""
    target = check_output(path, flag, force, default_name)
    real = Path(os.path.realpath(target))
    for source in inputs:
        if source is not None and Path(os.path.realpath(source)) == real:
            raise BadInput(f"{flag} {target} is the file this command reads; it is never overwritten, not even "
                           f"with --force: choose another {flag}")
    what = _protected(real) if real.exists() else None
    if what:
        raise BadInput(f"{flag} {target} is {what}; a run's own files are never overwritten, not even with --force: "
                       f"choose another {flag}")
    return target
