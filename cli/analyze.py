"""`robust analyze`: per norm layer, the gradients of the clean and adversarial losses and their cosine."""

from __future__ import annotations

from typing import Any

import click

from robust.analysis.gradients import analyze_checkpoint, check_poolable, spread_by_norm
from robust.analysis.plots import plot_gradient_analysis
from robust.cli.common import SEED, check_output_file, model_file
from robust.errors import ConfigError
from robust.outputs import check_output_dir, write_json
from robust.threat import parse_eps


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def analysis_table(analysis: dict[str, Any]) -> str:
    """The per-layer figures as a plain text table, then the means over layers."""
    header = f"{'layer':<22}{'shared|g_clean|':>16}{'shared|g_adv|':>15}{'clean-rt|g|':>13}{'adv-rt|g|':>11}{'cosine':>9}"
    lines = [header]
    for row in analysis["layers"]:
        lines.append(f"{row['layer']:<22}{_num(row['shared_clean']):>16}{_num(row['shared_adv']):>15}"
                     f"{_num(row['route_clean']):>13}{_num(row['route_adv']):>11}{_num(row['cosine'], 3):>9}")
    s = analysis["summary"]
    lines.append(f"{'mean':<22}{_num(s['shared_clean']):>16}{_num(s['shared_adv']):>15}"
                 f"{_num(s['route_clean']):>13}{_num(s['route_adv']):>11}{_num(s['cosine'], 3):>9}")
    ratios = [f"{part} adv/clean norm ratio {_num(s[f'{part}_ratio'], 3)}" for part in ("shared", "route")
              if s.get(f"{part}_ratio") is not None]
    lines.append(f"norm {analysis['norm']}; cosine of the {analysis['cosine_of']}; " + "; ".join(ratios))
    return "\n".join(lines)


def spread_table(results: list[dict[str, Any]], spread: dict[str, Any]) -> str:
    """Several checkpoints: one summary line each, then per norm the mean ± sd over them."""
    keys = ("cosine", "route_cosine", "shared_ratio", "route_ratio")
    lines = [f"{'checkpoint':<48}{'norm':>6}{'cosine':>9}{'rt-cos':>9}{'shared adv/clean':>18}{'route adv/clean':>17}"]
    for r in results:
        s = r["summary"]
        lines.append(f"{r['checkpoint'][-48:]:<48}{r['norm']:>6}{_num(s['cosine'], 3):>9}{_num(s['route_cosine'], 3):>9}"
                     f"{_num(s['shared_ratio'], 3):>18}{_num(s['route_ratio'], 3):>17}")
    lines.append("mean ± sample sd over the checkpoints of each norm (n):")
    for norm, group in spread.items():
        cells = []
        for key in keys:
            f = group["figures"][key]
            if f is not None:
                sd = "" if f["sd"] is None else f" ± {f['sd']:.3f}"
                cells.append(f"{key} {f['mean']:.3f}{sd}")
        lines.append(f"  {norm} (n = {group['n']}; cosine of the {group['cosine_of']}): " + ", ".join(cells))
    return "\n".join(lines)


@click.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--batches", default=4, show_default=True, type=int, help="training batches to average over")
@click.option("--batch-size", default=None, type=int, help="batch size  [default: the run's]")
@click.option("--eps", default=None, help="attack radius, e.g. 8/255  [default: the run's]")
@click.option("--steps", default=None, type=int, help="PGD steps of the attack  [default: the run's]")
@click.option("--data-dir", default=None, help="folder with the dataset files")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--seed", default=None, type=SEED, help="batch order, augmentation and attack starts  [default: the run's]")
@click.option("--out", "out_dir", default=None, help="folder for analysis.json and gradients.png")
@click.option("-o", "--output", "png", default=None, help="PNG to write (a folder ending in / gets gradients.png)")
@click.option("--force", is_flag=True, help="overwrite existing output files")
def analyze(checkpoints: tuple[str, ...], batches: int, batch_size: int | None, eps: str | None, steps: int | None,
            data_dir: str | None, device: str, seed: int | None, out_dir: str | None, png: str | None,
            force: bool) -> None:
    """Per norm layer: gradient norms of the clean and adversarial losses and their cosine.

    With several CHECKPOINTS (e.g. one per seed: runs/cmp/sabn/seed*) each gets one summary line
    and every norm the mean ± sample sd of the figures over its checkpoints; --out then writes
    analysis.json with every run and the spread (no PNG; -o draws one checkpoint).

    The clean loss goes through the clean route on x, the adversarial loss through the adv route
    on PGD examples made through the adv route (train-mode BN, as in training). Reported: norms
    w.r.t. the shared affine (bn, sabn) and each route's affine (auxbn, sabn), and the cosine
    between the clean and adversarial gradients of the shared affine. auxbn has no shared affine:
    its cosine is between the two routes' affine gradients.

    \b
    Examples:
      robust analyze runs/cmp/sabn --batches 4 --out runs/cmp/sabn/analysis
      robust analyze runs/cmp/bn/best.pt -o bn_gradients.png
      robust analyze runs/cmp3/*/seed* --out runs/cmp3/analysis
    """

    several = len(checkpoints) > 1
    if several and png is not None:
        raise ConfigError(f"-o draws one checkpoint's figure, got {len(checkpoints)} checkpoints; "
                          "pass one checkpoint, or use --out for analysis.json")
    json_file = png_file = None
    if out_dir is not None:
        folder = check_output_dir(out_dir, "--out")
        json_file = check_output_file(folder / "analysis.json", "--out", force)
        png_file = check_output_file(folder / "gradients.png", "--out", force) if png is None and not several else None
    if png is not None:
        png_file = check_output_file(png, "-o", force, "gradients.png")
    eps_value = parse_eps(eps) if eps is not None else None
    for name, value in (("batches", batches), ("batch-size", batch_size), ("steps", steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    files = [model_file(c) for c in checkpoints]  # every path checked before any analysis
    if several:
        check_poolable(files)
    for target, flag in ((json_file, "--out"), (png_file, "-o" if png is not None else "--out")):
        if target is not None:
            check_output_file(target, flag, force, inputs=tuple(files))
    results = [analyze_checkpoint(f, batches=batches, batch_size=batch_size, eps=eps_value, steps=steps,
                                  data_dir=data_dir, device=device, seed=seed) for f in files]
    if several:

        spread = spread_by_norm(results)
        click.echo(spread_table(results, spread))
        result: dict[str, Any] = {"runs": results, "by_norm": spread}
    else:
        result = results[0]
        click.echo(analysis_table(result))
    written = []
    if json_file:
        written.append(write_json(json_file, result, overwrite=force))
    if png_file:
        written.append(plot_gradient_analysis(result, png_file, overwrite=force))
    if written:
        click.echo(f"wrote {', '.join(map(str, written))}")
