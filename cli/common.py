"""Pieces shared by the commands: the bad-input error and the errors it stands for."""

from __future__ import annotations

import click

from robust.checkpoint import CheckpointError
from robust.config import ConfigError
from robust.data import DataError
from robust.external import ModelError


class BadInput(click.ClickException):
    """A one-line ``Error: ...`` and exit code 2, like click's own usage errors."""

    exit_code = 2


# Library errors that mean "the user gave us something we cannot use".
BAD_INPUT_ERRORS = (ConfigError, DataError, CheckpointError, ModelError)
