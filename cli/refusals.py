"""Bad input refused in one line, in a module that loads no torch (the command group uses it before a command
loads): the error that prints ``Error: ...`` with exit code 2, the library errors it stands for, and
numbers written with other digits than 0-9."""

from __future__ import annotations

import click

from robust.errors import CheckpointError, ConfigError, DataError, ModelError, non_ascii_digits


class BadInput(click.ClickException):
    """A one-line ``Error: ...`` and exit code 2, like click's own usage errors."""

    exit_code = 2


# Library errors that mean "the user gave us something we cannot use".
BAD_INPUT_ERRORS = (ConfigError, DataError, CheckpointError, ModelError)


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
