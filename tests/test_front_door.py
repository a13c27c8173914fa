"""The front door stays light: `robust --version` and `robust --help` import no command module and no
torch, `import robust` neither, and every public name and command still resolves when it is used."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

import robust
from robust.cli.main import COMMANDS, cli

# Runs the console script's entry point with the given arguments, then lists on stderr's last line the
# modules it left imported (torch, and robust's own).
PROBE = """
import json, sys
from robust.cli.main import main
sys.argv = ["robust", *sys.argv[1:]]
try:
    main()
finally:
    print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("robust"))), file=sys.stderr)
"""


def _probe(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`robust ARGS` in a fresh interpreter: the finished process and the modules it imported."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    return done, json.loads(done.stderr.strip().splitlines()[-1])


def _command_modules(imported: list[str]) -> list[str]:
    return [m for m in imported if m.startswith("robust.cli.") and m not in ("robust.cli.main", "robust.cli.refusals")]


def test_version_imports_no_torch_and_no_command():
    done, imported = _probe("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"robust, version {robust.__version__}"
    assert "torch" not in imported
    assert _command_modules(imported) == []


def test_help_lists_every_command_with_its_summary_and_imports_no_torch():
    done, imported = _probe("--help")
    assert done.returncode == 0, done.stderr
    assert "torch" not in imported
    assert _command_modules(imported) == []
    rows = dict(re.findall(r"^  (\S+)\s+(.+)$", done.stdout.split("Commands:\n")[1], flags=re.M))
    assert sorted(rows) == sorted(COMMANDS)
    for name, entry in COMMANDS.items():
        shown = rows[name].removesuffix("...")  # click cuts a long summary at a word and adds "..."
        assert entry.summary.startswith(shown) and len(shown) >= 30, (name, rows[name])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_summary_is_its_commands_own_first_sentence(name):
    command = cli.get_command(None, name)
    assert command.name == name
    assert command.get_short_help_str(limit=10_000) == COMMANDS[name].summary


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_commands_own_help_loads_it(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cli {name} ")
    assert " ".join(COMMANDS[name].summary.split()[:4]) in " ".join(result.output.split())


def test_an_unknown_command_is_refused_in_one_line():
    result = CliRunner().invoke(cli, ["evl"])
    assert result.exit_code == 2
    assert "No such command 'evl'" in result.output


def test_import_robust_loads_no_torch_until_a_name_is_used():
    code = ("import sys, robust\nassert 'torch' not in sys.modules, 'import robust'\n"
            "from robust import TrainConfig\nassert 'torch' in sys.modules\n"
            "print(robust.nn.norms.__name__)")  # a subpackage, reachable after a bare `import robust`
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "robust.nn.norms"


@pytest.mark.parametrize("name", robust.__all__)
def test_every_public_name_imports_from_robust(name):
    namespace: dict = {}
    exec(f"from robust import {name}", namespace)  # the statement a user writes
    assert name in dir(robust)
    if name != "__version__":
        assert namespace[name] is getattr(importlib.import_module(robust._PUBLIC[name]), name)


def test_a_name_robust_lacks_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'TrainPlanz'"):
        robust.TrainPlanz  # noqa: B018
    with pytest.raises(ImportError):
        exec("from robust import TrainPlanz", {})
