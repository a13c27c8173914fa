"""`robust mix`: a run's clean and adv routes (or its adv route and a separate accurate model) mixed into one model file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from robust.checkpoint import build_checkpoint, load_model, read_checkpoint, save_checkpoint
from robust.cli.common import BadInput, check_output_file, model_file
from robust.curves import plot_tradeoff
from robust.eval.evaluation import eval_dataset
from robust.eval.mix import (DEFAULT_ATTACK, RULES, CalibrationPlan, calibrate_by_rule, check_max_drop, sweep,
                             validation_images, validation_indices)
from robust.nn.mixed import MixedClassifier, MixSettings, check_mix_value
from robust.nn.norms import is_dual_route
from robust.outputs import write_json

TRANSFORM = ("weight", "scale", "power", "offset")


@click.command("mix")
@click.argument("run")
@click.option("--accurate", default=None, metavar="MODEL",
              help="mix the run's adv route with this accurate model (a run folder or checkpoint of robust, e.g. "
                   "`robust train --method standard`) instead of the run's own clean route")
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="the most points of validation robust accuracy the mixture may lose against the adv route")
@click.option("-o", "--out", default=None, help="the mixture's model file (read by robust eval, robust export and robust.load_model)")
@click.option("--sweep", "do_sweep", is_flag=True, help="also measure clean and robust accuracy at every weight")
@click.option("--plot", default=None, help="with --sweep: the trade-off figure (PNG)")
@click.option("--json", "json_path", default=None, help="the calibration (and with --sweep, every weight's figures) as JSON")
@click.option("--weight", type=float, default=None, help="fix the robust route's weight in [0, 1] instead of choosing it")
@click.option("--scale", type=float, default=None, help="fix the transform's scale in (0, 1000]")
@click.option("--power", type=float, default=None, help="fix the transform's power in [1, 16]")
@click.option("--offset", type=float, default=None, help="fix the transform's offset in [-10, 10]")
@click.option("--calibration", "rule", type=click.Choice(RULES), default="attack", show_default=True,
              help="attack: each candidate's robust accuracy is --attack on the mixture itself; margin: predicted from "
                   "one --attack on the adv route alone, by MixedNUTS's margin rule (one attack in all; docs/mixing.md)")
@click.option("--attack", default=None,
              help="the calibration's attack  [default: pgd20 on the mixture; cw20 on the adv route with --calibration "
                   "margin]")
@click.option("--val-limit", type=click.IntRange(1), default=500, show_default=True,
              help="calibrate on at most N of the run's validation images")
@click.option("--data-dir", default=None, help="where the run's data is, when not where it was trained from")
@click.option("--force", is_flag=True, help="overwrite existing output files")
def mix(run: str, accurate: str | None, max_drop: float, out: str | None, do_sweep: bool, plot: str | None,
        json_path: str | None, weight: float | None, scale: float | None, power: float | None, offset: float | None,
        rule: str, attack: str | None, val_limit: int, data_dir: str | None, force: bool) -> None:
    """Mix a run's clean and adv routes into one model, calibrated on its validation images.

    The mixture's logits are log((1 - w) softmax(clean) + w softmax(T(adv))), T the robust route's
    transform (scale, power, offset; docs/mixing.md). The weight and the transform are chosen to
    maximize clean accuracy while robust accuracy (--attack on the mixture itself; with --calibration
    margin, predicted from the adv route's margins) stays within --max-drop points of the adv
    route's, on the run's validation images only. Evaluate the file
    end to end with `robust eval MIX.pt --attack autoattack` like any model.

    \b
    Example:
      robust mix runs/sabn-s0 --max-drop 1.0 -o mix.pt
      robust mix runs/sabn-s0 --accurate runs/standard-s0 -o mix_std.pt
      robust mix runs/sabn-s0 --calibration margin -o mix_margin.pt
      robust mix runs/sabn-s0 --sweep --plot tradeoff.png --json tradeoff.json
    """
    fixed = {k: check_mix_value(k, v) for k, v in zip(TRANSFORM, (weight, scale, power, offset)) if v is not None}
    check_max_drop(max_drop)
    if out is None and not do_sweep:
        raise BadInput("-o is needed (the mixture's file), e.g. -o mix.pt; or pass --sweep with --plot/--json")
    if plot is not None and not do_sweep:
        raise BadInput("--plot needs --sweep, e.g. --sweep --plot tradeoff.png")
    if do_sweep and plot is None and json_path is None:
        raise BadInput("--sweep needs --plot FILE or --json FILE for its figures")
    source = model_file(run)
    inputs = (source, model_file(accurate) if accurate is not None else None)
    wanted = {"-o": out, "--plot": plot, "--json": json_path}
    written = {flag: check_output_file(path, flag, force, inputs=inputs,
                                       outputs={f: p for f, p in wanted.items() if f != flag})
               for flag, path in wanted.items() if path is not None}
    state = read_checkpoint(source)
    if state.get("kind") in ("export", "mix") or not isinstance(state.get("config"), dict):
        raise BadInput(f"{run} is no training checkpoint (an export or a mixture): mix a run folder of `robust train`, "
                       "whose validation split calibrates the mixture")
    model = _mixture(state, accurate, run)
    plan = _plan(state, max_drop, attack or DEFAULT_ATTACK[rule], fixed, rule)
    data = eval_dataset(state["dataset"], data_dir or (state.get("data") or {}).get("data_dir"),
                        (state.get("data") or {}).get("image_size"))
    indices = validation_indices(state["config"], len(data.train_y))[:val_limit]
    x, y = validation_images(data, indices, plan)
    result = calibrate_by_rule(model, x, y, plan, log=lambda line: click.echo(line, err=True))
    chosen = MixSettings(**result["settings"])
    model.settings = chosen
    report: dict[str, Any] = {"source": str(source), "accurate": accurate, **result}
    click.echo(f"chosen: weight {chosen.weight:g}, scale {chosen.scale:g}, power {chosen.power:g}, offset "
               f"{chosen.offset:g}: validation clean {result['validation']['mixture']['clean']:.1f}%, "
               f"{plan.attack} {result['validation']['mixture']['robust']:.1f}%{' (predicted)' if rule == 'margin' else ''} "
               f"on {len(y)} images (adv route {result['validation']['adv_route']['robust_found']:.1f}% on the same "
               "attacks)")
    if do_sweep:
        report["sweep"] = sweep(model, x, y, chosen, plan)
    if "-o" in written:
        _write_mixture(model, state, source, report, written["-o"], force)
    if "--json" in written:
        write_json(written["--json"], report, overwrite=force)
        click.echo(f"wrote {written['--json']}")
    if "--plot" in written:
        plot_tradeoff(report["sweep"], result["validation"], result["validation"]["mixture"], written["--plot"],
                      f"{source.parent.name if source.name.endswith('.pt') else source.name}: validation, "
                      f"{plan.attack} at eps {plan.eps:g}", overwrite=force)
        click.echo(f"wrote {written['--plot']}")


def _mixture(state: dict[str, Any], accurate: str | None, run: str) -> MixedClassifier:
    """The run's routes mixed (a dual-route model), or its adv route with the ``accurate`` model's clean route."""
    if accurate is None:
        model = load_model(state)
        if not is_dual_route(model):
            raise BadInput(f"{run} has a single route ({state['model_args'].get('norm')}): pass --accurate MODEL to mix "
                           "it with a separate accurate model")
        return MixedClassifier(model)
    other = read_checkpoint(model_file(accurate))
    if other.get("dataset") != state.get("dataset"):
        raise BadInput(f"--accurate {accurate} was trained on {other.get('dataset')}, the run on {state.get('dataset')}: "
                       "mix models of the same data")
    robust = load_model(state, route="adv")
    clean = load_model(other)
    clean = load_model(other, route="clean") if is_dual_route(clean) else clean
    return MixedClassifier(robust, clean)


def _plan(state: dict[str, Any], max_drop: float, attack: str, fixed: dict[str, float], rule: str) -> CalibrationPlan:
    """The calibration plan at the run's eps, by ``rule``, each fixed parameter's grid reduced to its value."""
    if state.get("eps") is None:
        raise BadInput("the run records no training eps; mix a run folder of `robust train`")
    grids = {"weights": "weight", "scales": "scale", "powers": "power", "offsets": "offset"}
    chosen = {grid: (fixed[name],) for grid, name in grids.items() if name in fixed}
    return CalibrationPlan(eps=float(state["eps"]), threat=state.get("threat", "linf"), max_drop=max_drop,
                           attack=attack, rule=rule, **chosen)


def _write_mixture(model: MixedClassifier, state: dict[str, Any], source: Path, report: dict[str, Any], out: Path,
                   force: bool) -> None:
    """The self-contained mixture file: both parts' weights, the settings and the validation figures (with --sweep,
    every weight's, which `robust report MIX.pt` draws)."""
    meta = {k: state[k] for k in ("dataset", "data", "eps", "threat", "method") if k in state}
    calibration = dict(report)
    calibration["validation"] = {k: v for k, v in calibration["validation"].items() if k != "tried"}
    model.eval()
    save_checkpoint(build_checkpoint(model, kind="mix", source=str(source), calibration=calibration, **meta), out,
                    overwrite=force)
    click.echo(f"wrote {out}: mixture of the {'clean and adv routes' if model.accurate is None else 'adv route and ' + str(report['accurate'])}")

