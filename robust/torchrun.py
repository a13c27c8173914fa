"""torchrun's environment (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, LOCAL_RANK), read without importing torch:
the command line asks for its rank before it loads a command."""

from __future__ import annotations

import os

from robust.errors import ConfigError


def env_int(name: str, default: int) -> int:
    """The integer torchrun set in ``name`` (``default`` where it is unset or empty)."""
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer; it is set by torchrun") from None


def env_rank() -> int:
    """This process's rank as torchrun sets it (0 outside torchrun)."""
    return env_int("RANK", 0)


def local_world_size() -> int:
    """The processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun): they share its memory."""
    return max(1, env_int("LOCAL_WORLD_SIZE", 1))


def env_world_size() -> int:
    """The world size as torchrun sets it (1 outside torchrun)."""
    return env_int("WORLD_SIZE", 1)
