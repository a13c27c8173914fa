"""Every error a user can meet, in one place: each message names the problem and the fix.

The CLI turns these into a one-line message and exit code 2 (bad input) or the documented
exit codes (interrupted, non-finite loss); they live at the bottom layer so every layer raises them.
"""

from __future__ import annotations


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


class CompareExistsError(ConfigError):
    """The compare folder already holds results; pass --resume or --force."""
