"""Pieces shared by the commands: the bad-input error and the errors it stands for, seeds, model paths."""

from __future__ import annotations

from pathlib import Path

import click

from robust.checks import MAX_SEED
from robust.cli.refusals import BAD_INPUT_ERRORS, BadInput, ascii_numbers  # noqa: F401 (the commands import them from here)
from robust.outputs import check_output_file  # noqa: F401 (the commands' output check)
from robust.run import RunFiles, checkpoint_path, newest_run as newest_run_under


SEED = click.IntRange(0, MAX_SEED)  # what torch.manual_seed and our step seeds accept


RUNS = Path("runs")


def newest_run(runs: Path = RUNS) -> str:
    """The run folder under ``runs`` whose checkpoint was written last (what `robust eval` scores by default)."""
    run = newest_run_under(runs)
    if run is None:
        raise BadInput(f"no CHECKPOINT given and no run folder with a checkpoint under ./{runs}; "
                       f"pass a checkpoint file or run folder, e.g. robust eval {runs}/NAME")
    return str(run.path)


def model_file(path: str) -> Path:
    """The checkpoint file a CHECKPOINT argument means; says so when a run folder without best.pt gives last.pt."""
    resolved = checkpoint_path(path)
    if Path(path).is_dir() and resolved.name == RunFiles.LAST:
        click.echo(f"note: {path} has no best.pt (no validation, or training stopped early); using {resolved}", err=True)
    return resolved
