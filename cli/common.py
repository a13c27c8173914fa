"""Pieces shared by the commands: the bad-input error and the errors it stands for, seeds, model paths."""

from __future__ import annotations

from pathlib import Path

import click

from robust.checkpoint import CheckpointError, resolve_checkpoint_path
from robust.config import MAX_SEED, ConfigError
from robust.data import DataError


class BadInput(click.ClickException):
    """A one-line ``Error: ...`` and exit code 2, like click's own usage errors."""

    exit_code = 2


# Library errors that mean "the user gave us something we cannot use".
BAD_INPUT_ERRORS = (ConfigError, DataError, CheckpointError)

SEED = click.IntRange(0, MAX_SEED)  # what torch.manual_seed and our step seeds accept


def model_file(path: str) -> Path:
    """The checkpoint file a CHECKPOINT argument means; says so when a run folder without best.pt gives last.pt."""
    resolved = resolve_checkpoint_path(path)
    if Path(path).is_dir() and resolved.name == "last.pt":
        click.echo(f"note: {path} has no best.pt (no validation, or training stopped early); using {resolved}", err=True)
    return resolved
