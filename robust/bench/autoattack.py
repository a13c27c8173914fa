"""AutoAttack benchmark: the official code (``pyautoattack``, fra31/auto-attack) against ``robust.evaluate``.

One version (``--version`` standard, plus or rand) in one threat model (``--threat`` linf, l2 or l1), both sides
with the official version's attacks and settings.

Both attack one route of the same model (exported as a plain model, so the official code sees an
ordinary classifier) on the same images, in one process, alternating: each round runs every
variant once, the next round in the reverse order, so a machine shared with other work slows
every variant alike and the ratios stay meaningful where the absolute times do not.

Variants: ``official`` (pyautoattack, the chosen version, fp32, batch ``--batch-size``) and ours, by
``fp32`` (one process, fp32 attacks), ``bf16`` (one process, bf16 attacks), ``fast``
(``--precision``, default auto, and ``--jobs``) and ``jobs`` (fp32 and ``--jobs``: what a CPU
without native bf16 gets); ``--variants`` picks which of ours run (default fp32,bf16,fast). Printed per variant: images/s (median over rounds), its ratio to the official code,
the seconds per stage (the version's parts, e.g. APGD-CE, APGD-T, FAB-T, Square) and robust accuracy; then the per-example
agreement of each of ours with the official verdicts (every verdict an fp32 forward). Every input is
checked before any work (bad input: one line, exit code 2) and ``--json`` goes through the package's
output checks (never the checkpoint or a run's own file; an existing file only with ``--force``).

    python -m robust.bench.autoattack runs/demo --route adv --limit 32 --threads 1 --jobs 2
    python -m robust.bench.autoattack runs/demo --threat l1 --eps 20 --version standard --variants jobs
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
import sys
import time
from typing import Any

import click
import pyautoattack  # the official code, from the dev extra: this module is a benchmark, not part of the API
import torch
from torch import nn

from robust.attacks.registry import check_threat
from robust.bench.commands import AsciiInt, checkpoint_file, refusing_bad_input
from robust.checkpoint import load_model, read_checkpoint
from robust.checks import MAX_SEED
from robust.data.loader import to_float
from robust.errors import ConfigError
from robust.eval.evaluation import check_threads, evaluate, load_test_split
from robust.nn.norms import export_route, is_dual_route, routes_for
from robust.outputs import check_output_file, write_json
from robust.runtime import cpu_has_amx, versions
from robust.threat import resolve_eps

VARIANTS = ("fp32", "bf16", "fast", "jobs")
# each version: our attack's name and its stages in the official code's order
VERSIONS = {"standard": ("autoattack", ("apgd-ce", "apgd-t", "fab-t", "square")),
            "plus": ("autoattack-plus", ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")),
            "rand": ("autoattack-rand", ("apgd-ce", "apgd-dlr"))}
OFFICIAL_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


class _StageLog(logging.Handler):
    """Reads the official code's 'robust accuracy after X: ... (total time T s)' lines: seconds per stage."""

    pattern = re.compile(r"robust accuracy after ([A-Z-]+): [\d.]+% \(total time ([\d.]+) s\)")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.totals: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = self.pattern.search(record.getMessage())
        if match:
            self.totals[match.group(1).lower()] = float(match.group(2))

    def stage_seconds(self) -> dict[str, float]:
        out, before = {}, 0.0
        for stage, total in self.totals.items():
            out[stage], before = total - before, total
        return out


def run_official(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int,
                 seed: int, threat: str = "linf", version: str = "standard") -> dict[str, Any]:
    """The official AutoAttack (``version`` in ``threat``) on ``x``; per example robust flags from an fp32 forward."""
    log = logging.getLogger("auto-attack")
    handler, level = _StageLog(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    start = time.perf_counter()
    try:
        attack = pyautoattack.AutoAttack(model, norm=OFFICIAL_NORMS[threat], eps=eps, version=version, seed=seed,
                                         device="cpu")
        with contextlib.redirect_stdout(sys.stderr):
            x_adv = attack.run_standard_evaluation(to_float(x), y, batch_size=batch_size)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    seconds = time.perf_counter() - start
    x_adv = x_adv[0] if isinstance(x_adv, tuple) else x_adv
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).tolist()
    return {"seconds": seconds, "robust": robust, "stages": handler.stage_seconds()}


def run_ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int, seed: int,
             precision: str, jobs: int, threads: int | None,
             attack: tuple[str, str] = ("linf", "standard")) -> dict[str, Any]:
    """``robust.evaluate`` with AutoAttack; ``attack`` is (threat, version); per example robust flags, seconds per
    stage (summed over processes)."""
    threat, version = attack
    name = VERSIONS[version][0]
    start = time.perf_counter()
    result = evaluate(model, (x, y), attacks=[name], eps=eps, threat=threat, batch_size=batch_size, seed=seed,
                      per_example=True, attack_precision=precision, jobs=jobs, threads=threads, device="cpu")
    seconds = time.perf_counter() - start
    stages = {k.split("/", 1)[1]: v for k, v in result["attack_seconds"].items() if k.startswith(f"{name}/")}
    return {"seconds": seconds, "robust": next(iter(result["per_example"].values()))["robust"], "stages": stages,
            "attack_precision": result["attack_precision"], "jobs": result["jobs"], "threads": result["threads"]}


def bench(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, variants: dict[str, dict[str, Any]],
          rounds: int, batch_size: int, seed: int, attack: tuple[str, str] = ("linf", "standard")) -> dict[str, Any]:
    """Every variant once per round, alternating the order; medians, ratios to the official code, agreement.
    ``attack`` is (threat, version)."""
    threat, version = attack
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ["official", *variants]}
    order = list(runs)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            print(f"round {r + 1}/{rounds}: {name} ...", file=sys.stderr, flush=True)
            if name == "official":
                runs[name].append(run_official(model, x, y, eps, batch_size, seed, threat, version))
            else:
                runs[name].append(run_ours(model, x, y, eps, batch_size, seed, **variants[name], attack=attack))
    n = len(y)
    official = runs["official"][0]["robust"]
    out: dict[str, Any] = {"n": n, "eps": eps, "threat": threat, "version": version, "rounds": rounds,
                           "batch_size": batch_size, "stages": list(VERSIONS[version][1]), "variants": {}}
    base = statistics.median(run["seconds"] for run in runs["official"])
    for name, done in runs.items():
        seconds = statistics.median(run["seconds"] for run in done)
        flags = done[0]["robust"]
        out["variants"][name] = {
            "settings": variants.get(name, {"precision": "fp32", "jobs": 1}),
            "seconds": [run["seconds"] for run in done], "images_per_s": n / seconds, "speedup": base / seconds,
            "robust_accuracy": 100.0 * sum(flags) / n,
            "agree_with_official": sum(a == b for a, b in zip(flags, official)),
            "same_every_round": all(run["robust"] == flags for run in done),
            "stage_seconds": {s: statistics.median(run["stages"].get(s, 0.0) for run in done) for s in out["stages"]},
        }
    return out


def format_report(report: dict[str, Any]) -> str:
    stages = report["stages"]
    lines = [(f"AutoAttack ({report['version']}) on {report['n']} images, {report['threat']} eps {report['eps']:.4g}, "
              f"{report['rounds']} round(s), batch {report['batch_size']}"),
             f"{'variant':<10}{'img/s':>8}{'ratio':>7}{'robust%':>9}{'agree':>8}  " + "".join(f"{s:>9}" for s in stages),
             ]
    for name, v in report["variants"].items():
        lines.append(f"{name:<10}{v['images_per_s']:>8.3f}{v['speedup']:>6.2f}x{v['robust_accuracy']:>9.2f}"
                     + f"{v['agree_with_official']:>5}/{report['n']:<3}"
                     + "".join(f"{v['stage_seconds'][s]:>8.1f}s" for s in stages))
    lines.append("stage seconds of ours are summed over processes (CPU time spent); ratios are of wall-clock medians")
    return "\n".join(lines)


def check_version(threat: str, version: str) -> None:
    """ConfigError when our AutoAttack has no ``version`` in ``threat`` (the plus version in L1: the official code
    marks it unchecked)."""
    try:
        check_threat(VERSIONS[version][0], threat)
    except ValueError as exc:
        raise ConfigError(f"--version {version} --threat {threat}: {exc}") from None


def parse_variants(text: str) -> list[str]:
    """``fp32,bf16`` -> the variants of ours to run; ConfigError for an unknown or empty name."""
    chosen = [v.strip() for v in text.split(",")]
    if any(not v for v in chosen):
        raise ConfigError(f"--variants {text!r} has an empty name; write them like fp32,bf16,fast")
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        raise ConfigError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(chosen))


def bench_eps(eps: str | None, state: dict[str, Any], checkpoint: str, threat: str = "linf") -> float:
    """The radius to attack at in ``threat``: ``--eps``, else the checkpoint's training eps (of that threat); never 0."""
    if eps is None:
        if "eps" not in state:
            raise ConfigError(f"{checkpoint} records no training eps; pass --eps, e.g. --eps 8/255")
        if state.get("threat", "linf") != threat:
            raise ConfigError(f"{checkpoint} was trained with a {state.get('threat', 'linf')} eps, which is no "
                              f"{threat} radius; pass --eps")
    value = resolve_eps(eps if eps is not None else state["eps"], threat)
    if value == 0:
        raise ConfigError("--eps 0 attacks nothing; give a radius, e.g. --eps 8/255")
    return value


@click.command(help=__doc__.split("\n\n")[0] + "\n\nCHECKPOINT: a checkpoint, an export, or a run folder "
                    "(its best.pt, else last.pt, as robust eval chooses).",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint")
@click.option("--route", type=click.Choice(["clean", "adv"]), default="adv", show_default=True,
              help="the route a dual-route model is scored on")
@click.option("--limit", type=AsciiInt(min=1), default=32, show_default=True, help="the first N test images")
@click.option("--eps", default=None, help="radius in pixel units  [default: the checkpoint's training eps]")
@click.option("--threat", type=click.Choice(list(OFFICIAL_NORMS)), default="linf", show_default=True,
              help="threat model, both sides")
@click.option("--version", "version", type=click.Choice(list(VERSIONS)), default="standard", show_default=True,
              help="AutoAttack's version, both sides: standard, plus (Linf, L2) or rand (20 EOT forwards)")
@click.option("--rounds", type=AsciiInt(min=1), default=1, show_default=True, help="runs per variant, alternating the order")
@click.option("--batch-size", type=AsciiInt(min=1), default=256, show_default=True)
@click.option("--seed", type=AsciiInt(0, MAX_SEED), default=0, show_default=True)
@click.option("--jobs", type=AsciiInt(min=1), default=2, show_default=True, help="processes of the fast and jobs variants")
@click.option("--threads", type=AsciiInt(min=1), default=None,
              help="torch threads (every variant; per process for ours), at most the CPUs available")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="the fast variant's attack precision")
@click.option("--variants", default="fp32,bf16,fast", show_default=True,
              help="which of ours run beside the official code: fp32, bf16, fast, jobs (comma-separated)")
@click.option("--json", "json_path", default=None,
              help="also write the figures to this JSON file (a folder ending in / gets autoattack_bench.json); "
                   "checked before any work, an existing file kept unless --force, a run's own files never")
@click.option("--force", is_flag=True, help="overwrite an existing --json file")
@refusing_bad_input
def command(checkpoint: str, route: str, limit: int, eps: str | None, threat: str, version: str, rounds: int,
            batch_size: int, seed: int, jobs: int, threads: int | None, precision: str, variants: str,
            json_path: str | None, force: bool) -> None:
    # every input is checked before the model runs; then the benchmark, the table and the JSON
    chosen = parse_variants(variants)
    check_threads(threads)
    check_version(threat, version)
    if eps is not None:  # refused before any file is read
        bench_eps(eps, {}, checkpoint, threat)
    scored = checkpoint_file(checkpoint)
    json_file = (check_output_file(json_path, "--json", force, "autoattack_bench.json", inputs=(scored,))
                 if json_path is not None else None)
    state = read_checkpoint(scored)
    if "dataset" not in state:
        raise ConfigError(f"{checkpoint} records no dataset; re-export it with `robust export`")
    eps_value = bench_eps(eps, state, checkpoint, threat)
    model = load_model(state)
    routes_for(model, route)  # a single-route model has only its own
    model = (export_route(model, route) if is_dual_route(model) else model).eval()
    x, y = load_test_split(state, None, limit)
    x, y = x[:limit], y[:limit].long()
    if jobs > len(y) and {"fast", "jobs"} & set(chosen):
        raise ConfigError(f"--jobs {jobs} is more than the {len(y)} images to evaluate; use at most --jobs {len(y)}")
    if threads is not None:
        torch.set_num_threads(threads)
    settings = {"fp32": {"precision": "fp32", "jobs": 1}, "bf16": {"precision": "bf16", "jobs": 1},
                "fast": {"precision": precision, "jobs": jobs}, "jobs": {"precision": "fp32", "jobs": jobs}}
    report = bench(model, x, y, eps_value, {name: {**settings[name], "threads": threads} for name in chosen},
                   rounds, batch_size, seed, (threat, version))
    report.update(checkpoint=str(scored), route=route, threads=torch.get_num_threads(),
                  cpu_amx=cpu_has_amx(), versions=versions(), date=time.strftime("%Y-%m-%d"))
    click.echo(format_report(report))
    if json_file is not None:
        write_json(json_file, report, overwrite=force)
        click.echo(f"wrote {json_file}")


def main(argv: list[str] | None = None) -> None:
    """``python -m robust.bench.autoattack ARGS``: exits 2 with one line on bad input, as `robust` does."""
    command.main(args=argv, prog_name="python -m robust.bench.autoattack")


if __name__ == "__main__":
    main()
