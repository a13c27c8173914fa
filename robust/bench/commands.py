"""What the developer commands run with ``python -m robust.bench.NAME`` share with `robust`'s own: bad input
is one ``Error:`` line and exit code 2 (a library error included), and numbers take the digits 0-9 only.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from robust.run import checkpoint_path
from robust.errors import CheckpointError, ConfigError, DataError, ModelError, check_ascii_number
from robust.run import RunFiles


class Refused(click.ClickException):
    """A one-line ``Error: ...`` and exit code 2, as `robust`'s commands refuse bad input."""

    exit_code = 2


class AsciiInt(click.IntRange):
    """An integer range that refuses digits other than ASCII 0-9 (``--limit ３``), as `robust`'s commands do."""

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                check_ascii_number(value, f"--{param.name.replace('_', '-')}" if param else "value")
            except ConfigError as exc:
                self.fail(str(exc), param, ctx)
        return super().convert(value, param, ctx)


def refusing_bad_input(body):
    """``body`` with the library's bad-input errors turned into :class:`Refused` (one line, exit code 2)."""

    @functools.wraps(body)
    def checked(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except (ConfigError, DataError, CheckpointError, ModelError) as exc:
            raise Refused(str(exc)) from None

    return checked


def checkpoint_file(path: str) -> Path:
    """The checkpoint file CHECKPOINT means, chosen as `robust eval` chooses: a file as is, a run folder's
    best.pt, else its last.pt (said on stderr, as `robust eval` says it)."""
    resolved = checkpoint_path(path)
    if Path(path).is_dir() and resolved.name == RunFiles.LAST:
        click.echo(f"note: {path} has no best.pt (no validation, or training stopped early); using {resolved}", err=True)
    return resolved
