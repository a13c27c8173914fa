"""`robust report`: one self-contained HTML page of one or several run folders."""

from __future__ import annotations

import click
from robust.cli.common import check_output_file

from robust.eval.plan import check_attack_names
from robust.curves import run_folders
from robust.report import build_report
from robust.outputs import write_output


@click.command("report")
@click.argument("runs", nargs=-1, required=True)
@click.option("-o", "--out", default="report.html", show_default=True,
              help="the HTML file to write (a folder ending in / gets report.html)")
@click.option("--images", type=click.IntRange(0, 64), default=8, show_default=True,
              help="test images per run to attack and show with their predictions (0: no image grid, no data read)")
@click.option("--attack", default="pgd10", show_default=True,
              help="the attack of the image grid, at the run's training eps")
@click.option("--data-dir", default=None, help="folder with the dataset files, where the run's own record no longer holds")
@click.option("--title", default=None, help="the page's heading  [default: the run names]")
@click.option("--force", is_flag=True, help="overwrite an existing output file")
def report(runs: tuple[str, ...], out: str, images: int, attack: str, data_dir: str | None, title: str | None,
           force: bool) -> None:
    """One HTML page of RUNS (run folders, a `robust compare` folder for every run in it, or `robust mix`
    files): everything embedded, it opens from disk without network.

    From each run folder: config.json (the resolved settings), metrics.jsonl (learning curves per
    route: train loss, validation clean and robust accuracy, lr; epoch times and images/s), and,
    when present, eval.json (the final table per route, accuracy per class, sanity verdicts,
    accuracy against eps), as `robust eval RUN --sanity --eps-sweep ... --json RUN/` writes it.
    A few test images are attacked now with --attack through each route of the run's checkpoint.
    A mixture file shows its calibration (and its trade-off curve, with --sweep) and its evaluation from
    MIX.eval.json beside it (`robust eval MIX.pt --json MIX.eval.json`).
    Several runs add a comparison: mean, sd and 95% interval over seeds of one setting, paired
    differences by seed between settings.

    \b
    Examples:
      robust eval runs/a --attack pgd20,autoattack --sanity --json runs/a/
      robust report runs/a -o report.html
      robust report runs/sabn-s0 runs/sabn-s1 runs/bn-s0 runs/bn-s1 -o compare.html
      robust report runs/cmp -o cmp.html
      robust report runs/sabn-s0 mix.pt -o mix.html
    """
    out_file = check_output_file(out, "-o", force, "report.html", inputs=runs)
    if images:
        check_attack_names(attack)
    folders = run_folders(runs)  # a `robust compare` folder means the runs inside it
    page = build_report(folders, images=images, attack=attack, data_dir=data_dir, title=title)
    write_output(out_file, page, overwrite=force)
    click.echo(f"wrote {out_file} ({len(page) / 1e6:.2f} MB, {len(folders)} run(s))")
