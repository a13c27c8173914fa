"""Pieces shared by the commands: the bad-input error and the errors it stands for, seeds, model paths."""

from __future__ import annotations

from pathlib import Path

import click

from robust.checks import MAX_SEED
from robust.errors import CheckpointError, ConfigError, DataError, ModelError, non_ascii_digits
from robust.outputs import check_output_file  # noqa: F401 (the commands' output check)
from robust.run import RunFiles, checkpoint_path, newest_run as newest_run_under


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
    run = newest_run_under(runs)
    if run is None:
        raise BadInput(f"no CHECKPOINT given and no run folder with a checkpoint under ./{runs}; "
                       f"pass a checkpoint file or run folder, e.g. robust eval {runs}/NAME")
    return str(run.path)


def model_file(path: str) -> Path:
    """The checkpoint file a CHECKPOINT argument means; says so when a run folder without best.pt gives last.pt."""
    resolved = checkpoint_path(path)
    if Path(path).is_dir() and resolved.name == RunFiles.LAST:
        click.echo(f"note: {path} has no best.pt (no validation, or training stopped early); using {resolved}", err=True)
    return resolved
