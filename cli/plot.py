"""`robust plot`: learning curves of runs from their metrics.jsonl."""

from __future__ import annotations

import click

from robust.cli.common import check_output_file
from robust.curves import CurveRun, plot_learning_curves, read_config_quietly, run_folders, run_labels, validation_attack
from robust.run import Run


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", default="curves.png", show_default=True, help="PNG to write (a folder ending in / gets curves.png)")
@click.option("--title", default=None, help="figure title")
@click.option("--force", is_flag=True, help="overwrite an existing PNG")
def plot(run_dirs: tuple[str, ...], output: str, title: str | None, force: bool) -> None:
    """Learning curves of runs from their metrics.jsonl: validation clean and robust accuracy per epoch.

    One line per run and route (adv solid, clean dashed).

    \b
    Example:
      robust plot runs/cmp/bn runs/cmp/auxbn runs/cmp/sabn -o curves.png
    """

    path = check_output_file(output, "-o", force, "curves.png")
    folders = run_folders(run_dirs)  # a compare folder means the runs inside it
    runs = [CurveRun(label, Run(d).metrics) for label, d in zip(run_labels(folders), folders)]
    attack = validation_attack([read_config_quietly(d) for d in folders])
    click.echo(f"wrote {plot_learning_curves(runs, path, title=title, overwrite=force, attack=attack)}")
