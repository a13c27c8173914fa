"""Plain helpers shared by the test modules (fixtures and hooks live in conftest.py).

tests/ is on sys.path while pytest runs (it holds the rootdir's conftest.py), so a test module
imports these with ``from helpers import ...``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import click
import torch
import torch.nn as nn
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


def confident_net(seed: int = 0) -> nn.Module:
    """A tiny 1x8x8 classifier with confident, centred logits: the loss moves visibly within small balls and the
    classes it predicts vary, so attack verdicts tell something."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    with torch.no_grad():
        net[3].weight.mul_(20)
        net[3].bias.sub_(net(torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(99))).mean(0))
    return net


def confident_batch(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random 1x8x8 images labelled with :func:`confident_net`'s predictions (every one clean-correct)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = confident_net()(x).argmax(1)
    return x, y
