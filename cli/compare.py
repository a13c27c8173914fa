"""`robust compare`, `robust plot`, `robust analyze`: the paper's comparison, learning curves, gradient analysis."""

from __future__ import annotations

import json
import shlex
from typing import Any

import click

from robust.checks import split_list
from robust.cli.common import SEED, check_output_file, model_file
from robust.cli.train import config_options
from robust.config import TrainConfig, load_toml, upgrade_saved
from robust.errors import ConfigError
from robust.lab.analysis import analyze_checkpoint, check_poolable, spread_by_norm
from robust.lab.compare.grid import run_compare
from robust.lab.compare.report import markdown_table, mean_sd_table
from robust.lab.compare.settings import CompareSettings, load_settings, parse_seeds
from robust.lab.plots import (CurveRun, plot_gradient_analysis, plot_learning_curves, read_config_quietly, run_folders,
                               run_labels, validation_attack)
from robust.outputs import check_output_dir, write_output
from robust.plan import command_words, layered
from robust.threat import parse_eps
from robust.train.rundir import read_metrics

COMPARE_KEYS = ("norms", "attacks", "eval_limit", "eval_batch_size", "seeds", "baseline", "select", "methods")


def _split(name: str, text: str | list | tuple | None) -> tuple[str, ...] | None:
    """A comma-separated text or a list of names as a tuple; given but empty is an error, not the default."""
    if text is None:
        return None
    if isinstance(text, str):
        parts = split_list(name, text)  # an empty item is refused, as in every comma list
    elif isinstance(text, (list, tuple)) and all(isinstance(p, str) for p in text):
        parts = list(text)
        if text and not all(p.strip() for p in parts):
            raise ConfigError(f"{name} {list(text)!r} has an empty item; give every name, e.g. {name} = [\"bn\", \"sabn\"]")
    else:
        raise ConfigError(f"{name} must be comma-separated names or a list of names, got {text!r}; e.g. {name} = \"bn,sabn\"")
    names = tuple(p.strip().lower() for p in parts if p.strip())
    if not names:
        raise ConfigError(f"{name} is empty; give at least one name, or leave it out for the default")
    return names


def resolve_compare_settings(flags: dict[str, Any], compare_flags: dict[str, Any], config_file: str | None,
                             resume: bool):
    """Defaults <- the saved compare.json (with --resume) <- TOML file <- flags given on the command line."""

    toml = load_toml(config_file) if config_file else {}
    extra = {k: toml.pop(k) for k in COMPARE_KEYS if k in toml}
    extra.update({k: v for k, v in compare_flags.items() if v is not None})
    values = layered(flags, toml)  # --beta 5: a method option
    norms, attacks = _split("norms", extra.get("norms")), _split("attacks", extra.get("attacks"))
    methods = _split("methods", extra.get("methods"))
    seeds = None if extra.get("seeds") is None else parse_seeds(extra["seeds"])
    saved: dict[str, Any] = {}
    before: dict[str, Any] = {}
    out = values.get("out") or default_out(values, seeds)
    if resume:
        saved = load_settings(out)
        before = dict(upgrade_saved(saved.get("config", {})))
        if seeds is not None and saved.get("seeds") is None:
            raise ConfigError(f"{out} was compared without --seeds (runs in <norm>/, not <norm>/seed<k>/); "
                              "start a new comparison with --seeds and another --out")
        if seeds is None and saved.get("seeds") is not None:
            seeds = tuple(saved["seeds"])
        if methods is not None and saved.get("methods") is None:
            raise ConfigError(f"{out} was compared without --methods (runs in <norm>/, not <method>/<norm>/); "
                              "start a new comparison with --methods and another --out")
        if methods is None and saved.get("methods") is not None:
            methods = tuple(saved["methods"])
            before.pop("method", None)
    values = {**before, **values, "out": str(out)}
    defaults = CompareSettings(TrainConfig())
    return CompareSettings(
        TrainConfig.from_dict(values),
        norms=norms or tuple(saved.get("norms", defaults.norms)),
        attacks=attacks or tuple(saved.get("attacks", defaults.attacks)),
        eval_limit=extra.get("eval_limit", saved.get("eval_limit")),
        eval_batch_size=extra.get("eval_batch_size", saved.get("eval_batch_size", defaults.eval_batch_size)),
        seeds=seeds,
        baseline=str(extra["baseline"]).strip().lower() if extra.get("baseline") is not None else saved.get("baseline"),
        select=extra.get("select", saved.get("select", defaults.select)),
        methods=methods,
    ).validate()


def default_out(values: dict[str, Any], seeds: tuple[int, ...] | None = None) -> str:
    """runs/compare-<dataset>-s<seed> (with --seeds: -s0-1-2): comparisons with other seeds never share a folder."""
    seed = "-".join(map(str, seeds)) if seeds else values.get("seed", 0)
    return f"runs/compare-{values.get('dataset', 'cifar10')}-s{seed}"


def command_line(flags: dict[str, Any], compare_flags: dict[str, Any], config_file: str | None, resume: bool) -> str:
    """The command as given, rebuilt from the parsed options (recorded in results.md)."""
    switches = ("resume",) if resume else ()
    return shlex.join(["robust", "compare", *command_words({**compare_flags, **flags}, config_file, switches)])


@click.command()
@click.option("--norms", default=None, help="comma-separated norm kinds to compare  [default: bn,auxbn,sabn]")
@click.option("--attacks", default=None, help="comma-separated test attacks; add autoattack for its column  [default: pgd10,pgd20]")
@click.option("--eval-limit", type=int, default=None, help="evaluate on the first N test examples  [default: all]")
@click.option("--eval-batch-size", type=int, default=None, help="evaluation batch size  [default: 256]")
@click.option("--seeds", default=None, help="comma-separated seeds: every norm trains once per seed into <norm>/seed<k>/; "
              "results give mean ± sd and paired differences  [default: --seed only, runs in <norm>/]")
@click.option("--baseline", default=None, help="norm the others are paired against, seed by seed  [default: bn, else the first norm]")
@click.option("--select", default=None, help="checkpoint evaluated: best (best validation robust accuracy), last, or "
              "epoch:N (the model after epoch N, kept as epochN.pt; the reference evaluates a fixed late epoch)  [default: best]")
@click.option("--methods", default=None, help="comma-separated training methods: a norms x methods (x seeds) grid, "
              "runs in <method>/<norm>/, one results section per method  [default: --method only]")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="runs trained side by side in this many processes, each with CPUs/jobs torch threads "
                   "(on a 2-core CPU, two 1-thread runs side by side trained 1.9x the images/s of one 2-thread run)")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of config fields (and norms, attacks, eval_limit); flags override it")
@click.option("--resume", is_flag=True, help="continue the comparison in --out: finished runs are kept, partial ones resumed")
@click.option("--force", is_flag=True, help="retrain every norm in an existing --out folder")
@config_options
def compare(norms: str | None, attacks: str | None, eval_limit: int | None, eval_batch_size: int | None,
            seeds: str | None, baseline: str | None, select: str | None, methods: str | None, jobs: int,
            config_file: str | None, resume: bool, force: bool, **flags: Any) -> None:
    """Train one model per norm with the same seed, split and budget; evaluate every route.

    Takes every `robust train` option (except --norm). Every norm trains with the hybrid loss
    (as the paper's BN baseline does) unless --method is given. Writes into --out (default
    runs/compare-<dataset>-s<seed>): <norm>/ run folders (<norm>/seed<k>/ with --seeds), results.md
    (settings + table shaped like the paper's; with several seeds mean ± sd and the paired differences
    against --baseline with 95% t intervals), results.json (every figure), curves.png (validation
    accuracy per epoch; with several seeds the mean and a min-max band).

    \b
    Examples:
      robust compare --dataset fashion-mnist --eps 0.1 --width 16 --epochs 5 --limit 10000
      robust compare --norms auxbn,sabn --attacks pgd10,pgd20,autoattack --out runs/cmp
      robust compare --seeds 0,1,2 --baseline bn --jobs 2 --out runs/cmp3
      robust compare --methods pgd,trades --norms bn,sabn --seeds 0,1,2 --select epoch:5
      robust compare --out runs/cmp --resume
    """
    if flags.get("norm") is not None:
        raise click.UsageError("compare trains every norm of --norms; drop --norm")
    if resume and force:
        raise click.UsageError("--resume and --force exclude each other; pick one")

    compare_flags = {"norms": norms, "attacks": attacks, "eval_limit": eval_limit, "eval_batch_size": eval_batch_size,
                     "seeds": seeds, "baseline": baseline, "select": select, "methods": methods}
    settings = resolve_compare_settings(flags, compare_flags, config_file, resume)
    results = run_compare(settings, resume=resume, force=force, log=lambda msg: click.echo(msg, err=True),
                          command=command_line(flags, {**compare_flags, "jobs": jobs if jobs > 1 else None},
                                               config_file, resume), jobs=jobs)
    table = markdown_table if len(results["seeds"]) == 1 else mean_sd_table
    attacks = tuple(results["settings"]["attacks"])
    for method, part in results.get("by_method", {None: results}).items():
        if method is not None:
            click.echo(f"method {method}:")
        click.echo(table(part["rows"], attacks))
    curves = "curves.png" if settings.methods is None else "curves-<method>.png"
    click.echo(f"results: {settings.out / 'results.md'}, {settings.out / 'results.json'}, {settings.out / curves}")


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
    runs = [CurveRun(label, read_metrics(d)) for label, d in zip(run_labels(folders), folders)]
    attack = validation_attack([read_config_quietly(d) for d in folders])
    click.echo(f"wrote {plot_learning_curves(runs, path, title=title, overwrite=force, attack=attack)}")


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
        written.append(write_output(json_file, json.dumps(result, indent=2) + "\n", overwrite=force))
    if png_file:
        written.append(plot_gradient_analysis(result, png_file, overwrite=force))
    if written:
        click.echo(f"wrote {', '.join(map(str, written))}")

