"""Every error a user can meet, in one place: each message names the problem and the fix.

The CLI turns these into a one-line message and exit code 2 (bad input) or the documented
exit codes (interrupted, non-finite loss); they live at the bottom layer so every layer raises them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class DataError(RuntimeError):
    """The dataset could not be found or read; the message says where we looked and what to pass."""


class ModelError(ValueError):
    """The requested architecture cannot be built; the message says what was found and what to pass."""


class CheckpointError(RuntimeError):
    """The file is missing, unreadable, not one of ours, or unsafe; the message says which."""


class OutputError(ConfigError):
    """An output path cannot be written (a file in the way, read-only, full, or already there)."""


class FolderBusy(ConfigError):
    """Another process holds the folder's lock (it is writing there now)."""


class RunExistsError(ConfigError):
    """The run folder already holds a run; pass --resume or --force."""


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint or log could not be written (disk full, folder gone); the previous last.pt is kept."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a step; last.pt holds the position to resume from."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    def __reduce__(self):  # picklable, so it crosses a process boundary (robust compare --jobs)
        return type(self), (self.signum, str(self))

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


class PeerFailed(RuntimeError):
    """A rank failed; rank 0 carries its message, the other ranks an empty one and stop quietly.

    ``bad_input`` tells the CLI which exit code to use (2 for bad input, 1 otherwise).
    """

    def __init__(self, message: str, bad_input: bool) -> None:
        super().__init__(message)
        self.bad_input = bad_input

    def __reduce__(self):  # picklable, so it crosses a process boundary
        return type(self), (str(self), self.bad_input)


class CompareExistsError(ConfigError):
    """The compare folder already holds results; pass --resume or --force."""


def non_ascii_digits(text: str) -> str:
    """The digits and other number characters of ``text`` that are not ASCII 0-9 (``"３"``, ``"٣"``, ``"²"``), in order."""
    return "".join(ch for ch in str(text) if not ch.isascii() and (ch.isnumeric() or ch.isdigit()))


def check_ascii_number(text: str, name: str) -> None:
    """ConfigError when the number text ``text`` of ``name`` holds characters other than ASCII (``--epochs ３``)."""
    if isinstance(text, str) and not text.isascii():
        odd = non_ascii_digits(text) or "".join(ch for ch in text if not ch.isascii())
        raise ConfigError(f"{name} {text!r} has characters that are not ASCII ({', '.join(map(repr, odd))}); "
                          "write the number with the digits 0-9, e.g. 3 or 8/255")


def code_in_pickle(exc: BaseException) -> str | None:
    """The Python object a file asked to import when ``torch.load(weights_only=True)`` refused it for that
    (``posix.system``, ``mymodule.MyNet``), None when the refusal had another cause (not a torch file at all:
    JSON, random bytes, a truncated file). Only the error text tells them apart."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return found.group(1)
    return "a Python object" if "Unsupported global" in text else None


def unreadable_file(path: object, exc: BaseException, what: str, fix: str) -> str:
    """One line saying why ``torch.load(weights_only=True)`` could not read ``path``, in our words: a file that
    would run code when loaded (refused: nothing of it ran), or a file that is not ``what`` at all; then ``fix``."""
    code = code_in_pickle(exc)
    if code is not None:
        return (f"{path} would import {code} when loaded (a pickle that would run code); it was refused and nothing "
                f"of it ran. Load only files from a source you trust; {fix}")
    return f"{path} is not {what} (not a file torch.save wrote, or a truncated one); {fix}"


def did_you_mean(name: object, valid: Iterable[str]) -> str:
    """ ``; did you mean X?`` for the valid name nearest to ``name`` (difflib), or "" when none is near."""
    near = difflib.get_close_matches(str(name).strip().lower(), [str(v) for v in valid], n=1, cutoff=0.6)
    return f"; did you mean {near[0]}?" if near else ""
