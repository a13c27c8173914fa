"""`robust compare`: the paper's comparison, a norms x methods x seeds grid trained, evaluated and tabled."""

from __future__ import annotations

import shlex
from typing import Any

import click

from robust.checks import split_list
from robust.cli.train import config_options
from robust.compare.grid import run_compare
from robust.compare.settings import CompareSettings, load_settings, parse_seeds
from robust.compare.tables import markdown_table, mean_sd_table
from robust.config import TrainConfig, load_toml, upgrade_saved
from robust.errors import ConfigError
from robust.nn.norms import NORMS, norms_help
from robust.plan import command_words, layered

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
@click.option("--norms", default=None,
              help=f"comma-separated norm kinds to compare: {norms_help()}  [default: {','.join(NORMS)}]")
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
