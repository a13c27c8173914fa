"""Plain helpers shared by the test modules (fixtures and hooks live in conftest.py).

tests/ is on sys.path while pytest runs (it holds the rootdir's conftest.py), so a test module
imports these with ``from helpers import ...``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import click
from click.testing import CliRunner

from robust.cli.main import cli
from robust.config import TrainConfig


def tiny_config_dict(out, **overrides) -> dict:
    """The fields of the tiny CPU run the trainer tests start from: a width-4 model on Fashion-MNIST,
    one epoch of 64 images in batches of 32, one-step PGD at eps 0.1, 32 validation images attacked
    with one step, fp32, no progress bars, written to ``out``. ``overrides`` set or replace fields
    (``limit=None`` and ``val_limit=None`` remove those limits). A plain dict, for JSON."""
    base = dict(dataset="fashion-mnist", width=4, epochs=1, batch_size=32, limit=64, steps=1, eps="0.1",
                val_split=0.1, val_limit=32, val_steps=1, lr=0.05, warmup_steps=0, schedule="cosine", seed=0,
                channels_last=False, quiet=True, out=str(out), precision="fp32")
    return {**base, **overrides}


def tiny_config(out, **overrides) -> TrainConfig:
    """``tiny_config_dict(out, **overrides)`` as a TrainConfig. A module whose runs differ from it
    says how once, ``_config = functools.partial(tiny_config, epochs=2, ...)``; a call's own
    keywords then override the module's."""
    return TrainConfig(**tiny_config_dict(out, **overrides))


def invoke_in(folder, args: list[str], command: click.Command = cli):
    """Run the CLI (click's test runner; ``command``: another click command, such as a developer
    benchmark's) with ``folder`` as the working directory, so relative paths in ``args`` resolve
    there; the caller's working directory is restored afterwards."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(command, [str(a) for a in args])  # paths may come as Path
    finally:
        os.chdir(cwd)


def snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` with its sha256 (folders as "dir"): to show nothing was written."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def assert_refused(folder, args: list[str], *expected: str, one_line: bool = False, command: click.Command = cli) -> str:
    """Run the CLI (or another click ``command``) in ``folder``; assert the bad-input contract (exit 2,
    one error line naming each of ``expected``, no traceback, nothing written or overwritten); return
    the error line. ``one_line``: the whole output is that line (no usage text either)."""
    before = snapshot(folder)
    result = invoke_in(folder, args, command)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1, result.output
    for text in expected:
        assert text in errors[0], errors[0]
    if one_line:
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert snapshot(folder) == before  # nothing written or overwritten
    return errors[0]
