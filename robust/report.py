"""`robust report`: one self-contained HTML page of one or several runs, to read at a glance.

Everything is embedded (figures as base64 PNG, styles inline); the page loads nothing from the
network and opens from disk. What a run folder gives:

- ``config.json`` (written by ``robust train``): the resolved settings;
- ``metrics.jsonl``: the learning curves (train loss, validation clean and robust accuracy per
  route, lr) and the timing (epoch seconds, images/s);
- ``eval.json``, when present (``robust eval RUN --json RUN/`` writes it there): the final table per
  route, accuracy per class, the sanity verdicts (``--sanity``) and accuracy against eps
  (``--eps-sweep``);
- ``best.pt`` (else ``last.pt``): a few test images attacked with PGD now, shown with their predictions.

A `robust mix` file stands beside run folders as one entry: its settings, its calibration on the run's
validation images (with the trade-off curve where ``--sweep`` recorded it), its evaluation from
``MIX.eval.json`` beside it (``robust eval MIX.pt --json MIX.eval.json``) and its test images attacked end
to end through the mixture.

Several runs add a comparison: their figures side by side, and where runs differ only in the seed,
mean, sd and 95% t interval; where settings differ, the paired differences seed by seed against the
first setting (:mod:`robust.stats`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from robust.attacks.registry import build_attack
from robust.checkpoint import load_model, read_checkpoint
from robust.errors import CheckpointError, ConfigError
from robust.eval.evaluation import load_test_split, to_model_input
from robust.curves import (integer_epochs, legend_below, routes_in, run_folders, run_labels, tradeoff_figure,
                           validation_attack)
from robust.data.types import dataset_class_names
from robust.stats import UNINFORMATIVE, mean_sd, paired_difference, t_quantile, uninformative
from robust.nn.norms import bn_mode, routes_for, use_route
from robust.run import Run, RunFiles, read_evaluation
from robust.runtime import describe_machine
from robust.threat import resolve_eps

EVAL_FILE = RunFiles.EVALUATION  # where the report looks for a run's evaluation: RUN/eval.json
PER_EXAMPLE_FILE = RunFiles.PER_EXAMPLE  # and for its per-example verdicts (robust eval --per-example RUN/)
MIXTURE_EVAL_SUFFIX = ".eval.json"  # a mixture file's evaluation: MIX.eval.json beside MIX.pt
# settings that do not change what a run learns: runs differing only in these (and the seed) are seeds of one setting
_NOT_A_SETTING = ("seed", "out", "quiet", "tensorboard", "threads", "save_every", "device", "workers", "data_dir")


@dataclass
class ReportRun:
    """What the page shows of one run folder."""

    path: Path
    label: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    evaluation: dict[str, Any] | None
    checkpoint: Path | None
    images: dict[str, Any] | None = field(default=None)
    broken_by: dict[str, dict[str, int]] | None = field(default=None)
    mixture: dict[str, Any] | None = field(default=None)  # a `robust mix` file's calibration record


def mixture_eval_file(path: str | Path) -> Path:
    """Where the report reads a mixture file's evaluation: MIX.eval.json beside MIX.pt."""
    path = Path(path)
    return path.with_name(path.stem + MIXTURE_EVAL_SUFFIX)


def read_run(path: str | Path, label: str | None = None) -> ReportRun:
    """A run folder's config, metrics, evaluation and checkpoint (a `robust mix` file: :func:`read_mixture`);
    ConfigError when it is neither."""
    if Path(path).is_file():
        return read_mixture(path, label)
    run = Run(path)
    metrics = run.metrics
    if not metrics:
        raise ConfigError(f"{run.file(RunFiles.METRICS)} holds no finished epoch; report a run after its first epoch")
    config = run.config if run.file(RunFiles.CONFIG).is_file() else {}
    try:
        checkpoint = run.checkpoint()
    except CheckpointError:
        checkpoint = None
    rows = run.per_example
    broken_by = broken_by_counts(rows, run) if rows is not None else None
    return ReportRun(run.path, label or run.path.name, config, metrics, run.evaluation, checkpoint, broken_by=broken_by)


def read_mixture(path: str | Path, label: str | None = None) -> ReportRun:
    """A `robust mix` file as a report entry: what it mixes and how (its config), its calibration, and its
    evaluation where MIX.eval.json sits beside it; ConfigError for any other file."""
    path = Path(path)
    state = read_checkpoint(path)
    if state.get("kind") != "mix" or not isinstance(state.get("calibration"), dict):
        raise ConfigError(f"{path} is a file but no `robust mix` file; report the run folder it came from "
                          "(robust report RUN), or a mixture written by `robust mix RUN -o MIX.pt`")
    calibration = state["calibration"]
    config = {k: state[k] for k in ("dataset", "eps", "threat", "method") if k in state}
    config.update(mixed=str(calibration.get("source")), accurate=calibration.get("accurate"),
                  **(state["model_args"].get("mixture") or {}))
    eval_file = mixture_eval_file(path)
    evaluation = read_evaluation(eval_file, f"robust eval {path} --json {eval_file}") if eval_file.is_file() else None
    return ReportRun(path, label or path.name, config, [], evaluation, path, mixture=calibration)


def broken_by_counts(rows: list[dict[str, Any]], run: Run) -> dict[str, dict[str, int]]:
    """Per route, how many examples each attack broke first ('clean': misclassified; 'survived': none did),
    from the rows of a `robust eval --per-example` file."""
    counts: dict[str, dict[str, int]] = {}
    try:
        for row in rows:
            key = row["broken_by"] if row["broken_by"] is not None else "survived"
            per_route = counts.setdefault(str(row["route"]), {})
            per_route[str(key)] = per_route.get(str(key), 0) + 1
    except KeyError as exc:
        raise ConfigError(f"{run.file(RunFiles.PER_EXAMPLE)} is not a `robust eval --per-example` file (no {exc} in a "
                          f"line); write it again with `robust eval {run.path} --per-example {run.path}/ --force`") from None
    return counts


def read_runs(paths: Sequence[str | Path]) -> list[ReportRun]:
    """:func:`read_run` for each folder, labelled with distinct names."""
    if not paths:
        raise ConfigError("no run folder given; pass one or more, e.g. robust report runs/a runs/b -o report.html")
    seen: dict[str, str | Path] = {}
    for path in paths:  # one run given twice would count twice in every mean and sd
        real = os.path.realpath(path)
        if real in seen:
            raise ConfigError(f"{path} and {seen[real]} are the same run folder; give each run once")
        seen[real] = path
    return [read_run(p, label) for p, label in zip(paths, run_labels(paths))]


# ---------------------------------------------------------------- figures


def png_data_uri(fig: Figure) -> str:
    """The figure as a ``data:image/png;base64,...`` URI (embedded: the page needs no file beside it)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # one per run of a setting (its seeds)


def run_styles(runs: Sequence[ReportRun]) -> list[tuple[str, str]]:
    """(colour, marker) per run: one colour per setting (runs differing only in the seed share it), one
    marker per run within its setting."""
    settings: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        settings.setdefault(setting_of(run), []).append(i)
    styles: list[tuple[str, str]] = [("C0", "o")] * len(runs)
    for colour, members in enumerate(settings.values()):
        for k, i in enumerate(members):
            styles[i] = (f"C{colour % 10}", MARKERS[k % len(MARKERS)])
    return styles


def learning_curves_figure(runs: Sequence[ReportRun]) -> Figure:
    """Four panels: train loss, validation natural and robust accuracy per route, lr (from 0); a colour per
    setting and a marker per run (the adv route solid, the clean route dashed); one legend under the panels."""
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    attack = validation_attack([r.config for r in runs])
    panels = [("train loss", lambda m, r: m.get("train_loss"), False),
              ("validation natural accuracy (%, no attack)", lambda m, r: m.get(f"val_{r}_clean"), True),
              (f"validation robust accuracy (%, {attack})", lambda m, r: m.get(f"val_{r}_robust"), True),
              ("learning rate (epoch end)", lambda m, r: m.get("lr"), False)]
    styles = run_styles(runs)
    for ax, (title, value, per_route) in zip(axes, panels):
        for run, (colour, marker) in zip(runs, styles):
            for route in (routes_in(run.metrics) or ["adv"]) if per_route else [None]:
                points = [(m["epoch"], value(m, route)) for m in run.metrics if value(m, route) is not None]
                if not points:
                    continue
                label = run.label if route is None else f"{run.label}, {route} route"
                ax.plot([p[0] for p in points], [p[1] for p in points], "--" if route == "clean" else "-",
                        color=colour, marker=marker, markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        integer_epochs(ax, runs)
    axes[3].set_ylim(bottom=0)  # a 4% change of the lr is no ramp
    legend_below(fig, axes[1])
    return fig


def sweep_figure(sweep: Sequence[dict[str, Any]]) -> Figure:
    """Worst-case accuracy against eps, one line per route."""
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.subplots()
    for route in sweep[0]["routes"]:
        ax.plot([s["eps"] for s in sweep], [s["routes"][route]["worst_case"] for s in sweep], marker="o",
                label=f"{route} route")
    ax.set_xlabel(f"eps ({sweep[0].get('threat', 'linf')})")
    ax.set_ylabel("worst-case accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def per_class_figure(per_class: dict[str, list[dict[str, Any]]], names: Sequence[str], attacks: Sequence[str] = ()) -> Figure:
    """Worst-case (robust) accuracy per class, a bar per route; each class labelled with its n test images."""
    routes = list(per_class)
    classes = len(next(iter(per_class.values())))
    fig = Figure(figsize=(max(6.0, 0.7 * classes + 2), 4.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(routes))
    for k, route in enumerate(routes):
        values = [row["worst_case"] or 0.0 for row in per_class[route]]
        ax.bar([c + k * width for c in range(classes)], values, width, label=f"{route} route")
    counts = [per_class[routes[0]][c]["n"] for c in range(classes)]
    ax.set_xticks([c + width * (len(routes) - 1) / 2 for c in range(classes)])
    ax.set_xticklabels([f"{name} (n={n})" for name, n in zip(names, counts)], rotation=30, fontsize=8, ha="right")
    under = f"worst case over {', '.join(attacks)}" if attacks else "worst case over the attacks"
    ax.set_ylabel(f"robust accuracy (%)\n{under}", fontsize=9)
    ax.set_title("robust accuracy per true class (test images)", fontsize=10)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis="y")
    if len(routes) > 1:
        fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------- adversarial examples


def attacked_examples(checkpoint: Path, count: int, attack: str = "pgd10", data_dir: str | None = None,
                      seed: int = 0) -> dict[str, Any]:
    """The first ``count`` test images of the checkpoint's dataset, attacked with ``attack`` at the
    run's eps through each route (eval mode, fp32): images, labels, per route predictions."""
    state = read_checkpoint(checkpoint)
    if "dataset" not in state or "eps" not in state:
        raise CheckpointError(f"{checkpoint} records no dataset or eps; report it with --images 0")
    model = load_model(state)
    x, y = load_test_split(state, data_dir, count)
    x, y = x[:count], y[:count]
    threat = state.get("threat", "linf")
    xf = to_model_input(x, torch.device("cpu"))
    out: dict[str, Any] = {"x": xf, "y": y.tolist(), "attack": attack, "eps": float(state["eps"]), "threat": threat,
                           "dataset": state.get("dataset"),
                           "routes": {}, "classes": (state.get("data") or {}).get("classes")}
    with torch.random.fork_rng(devices=[]), bn_mode(model, False), torch.autocast("cpu", enabled=False):
        torch.manual_seed(seed)
        for route in routes_for(model, None):
            with use_route(model, route):
                run = build_attack(attack, model, float(state["eps"]), threat=threat, seed=seed,
                                   num_classes=int(model.build_args.get("num_classes", 10)))
                x_adv = run(xf, y)
                with torch.no_grad():
                    clean_pred, adv_pred = model(xf).argmax(1), model(x_adv).argmax(1)
            out["routes"][route] = {"x_adv": x_adv.detach(), "clean": clean_pred.tolist(), "adv": adv_pred.tolist()}
    return out


def class_names(classes: Sequence[str] | None, n: int, dataset: str | None = None) -> list[str]:
    """The classes' names: the recorded ones, else the built-in dataset's, else their numbers."""
    classes = classes or dataset_class_names(dataset)
    return [str(c) for c in classes] if classes and len(classes) >= n else [str(c) for c in range(n)]


def examples_figure(examples: dict[str, Any]) -> Figure:
    """Per route a row of the clean images and a row of their adversarial examples, each titled with the
    route's prediction (green right; red wrong, with the true class)."""
    x, y = examples["x"], examples["y"]
    routes = list(examples["routes"])
    count = len(y)
    names = class_names(examples.get("classes"), max(y + [p for r in routes for p in examples["routes"][r]["adv"]]) + 1,
                        examples.get("dataset"))
    fig = Figure(figsize=(1.3 * count + 0.6, 1.55 * 2 * len(routes)), layout="constrained")
    axes = fig.subplots(2 * len(routes), count, squeeze=False)
    rows = []
    for r in routes:
        rows += [(f"{r} route, no attack", x, examples["routes"][r]["clean"]),
                 (f"{r} route, attacked", examples["routes"][r]["x_adv"], examples["routes"][r]["adv"])]
    for row, (title, images, preds) in enumerate(rows):
        for col in range(count):
            ax = axes[row][col]
            image = images[col].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            right = preds[col] == y[col]
            ax.set_title(f"{names[preds[col]]}" + ("" if right else f"\n(is {names[y[col]]})"), fontsize=7,
                         color="green" if right else "red")
            if col == 0:
                ax.set_ylabel(title, fontsize=8)
    return fig


# ---------------------------------------------------------------- tables


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _esc(value)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    """A table inside a horizontally scrolling box (a wide table never widens the page)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i >= numeric_from else "key"}">{_num(v)}</td>'
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def final_table(evaluation: dict[str, Any]) -> str:
    """Clean, each attack and the worst case per route (the table `robust eval` prints)."""
    attacks = list(evaluation.get("attacks") or [])
    columns = ["clean", *attacks, "worst_case"]
    rows = [[route, *(acc.get(c) for c in columns)] for route, acc in evaluation["routes"].items()]
    return html_table(["route", "natural", *attacks, "worst case"], rows)


def eval_caption(evaluation: dict[str, Any]) -> str:
    eps = evaluation.get("eps")
    threat = evaluation.get("threat", "linf")
    pixels = f" (= {eps * 255:.3g}/255)" if isinstance(eps, (int, float)) and threat == "linf" else ""
    return (f"{_esc(evaluation.get('n'))} test examples, {_esc(threat)} eps {_num(eps, 4)}{pixels}, seed "
            f"{_esc(evaluation.get('seed'))}, {_esc(weights_text(evaluation.get('weights')))}, from {_esc(EVAL_FILE)}; "
            "natural: accuracy without attack")


def weights_text(weights: str | None) -> str:
    """Which weights an evaluation scored, in words (older eval.json files do not say)."""
    return {"ema": "the averaged (EMA) weights", "live": "the live weights"}.get(str(weights),
                                                                                 "weights not recorded (live or averaged)")


def per_class_table(per_class: dict[str, list[dict[str, Any]]], names: Sequence[str]) -> str:
    routes = list(per_class)
    header = ["class", "n"] + [f"{r} route {k}" for r in routes for k in ("natural", "worst case")]
    rows = []
    for c, name in enumerate(names):
        first = per_class[routes[0]][c]
        rows.append([name, first["n"], *(per_class[r][c][k] for r in routes for k in ("clean", "worst_case"))])
    return html_table(header, rows)


def broken_by_table(counts: dict[str, dict[str, int]]) -> str:
    routes = list(counts)
    keys = list(dict.fromkeys(k for r in routes for k in counts[r]))
    return html_table(["route", *keys], [[r, *(counts[r].get(k, 0) for k in keys)] for r in routes])


def checks_list(checks: Sequence[dict[str, Any]]) -> str:
    items = "".join(f'<li class="{"pass" if c.get("passed") else "fail"}"><b>{"ok" if c.get("passed") else "FAILED"}</b> '
                    f'{_esc(c.get("name"))}: {_esc(c.get("detail"))}</li>' for c in checks)
    return f'<ul class="checks">{items}</ul>'


def config_table(run: ReportRun) -> str:
    if run.mixture is not None:
        rows = [[k, json.dumps(v)] for k, v in run.config.items()]
        return ("<p>The mixture's record: the model it mixes, its weight and the robust route's transform.</p>" +
                html_table(["setting", "value"], rows, numeric_from=2))
    if not run.config:
        return f"<p>{_esc(run.path)} has no {RunFiles.CONFIG}.</p>"
    rows = [[k, json.dumps(v)] for k, v in run.config.items()]
    return (f"<p>From {_esc(run.path / RunFiles.CONFIG)}, the settings as `robust train` resolved them (defaults, "
            f"a --config file and the flags).</p>" + html_table(["setting", "value"], rows, numeric_from=2))


def _trained_on(run: ReportRun, config: dict[str, Any]) -> list[list[Any]]:
    """Where and in what precision the run trained: its checkpoint's record, else the configured values."""
    machine = None
    if run.checkpoint is not None:
        try:
            machine = read_checkpoint(run.checkpoint).get("machine")
        except (CheckpointError, ConfigError):
            machine = None
    if not machine:
        return [["precision (as configured; the run records no machine)", config.get("precision")],
                ["device (as configured)", config.get("device")]]
    return [["trained on", machine.get("description")], ["precision (as trained)", machine.get("precision")],
            ["device (as trained)", machine.get("device")]]


def timing_table(run: ReportRun) -> str:
    if not run.metrics:  # a mixture file: no training of its own
        ev = run.evaluation or {}
        return html_table(["", "value"], [["evaluation seconds", ev.get("seconds")],
                                          *([f"evaluated with {k}", v] for k, v in (ev.get("versions") or {}).items())])
    seconds = [m["seconds"] for m in run.metrics if isinstance(m.get("seconds"), (int, float))]
    rates = [m["images_per_s"] for m in run.metrics if isinstance(m.get("images_per_s"), (int, float))]
    c = run.config
    rows = [["epochs", len(run.metrics)],
            ["training seconds (sum of epochs)", sum(seconds) if seconds else None],
            ["epoch seconds (min / median / max)",
             " / ".join(f"{v:.2f}" for v in (min(seconds), statistics.median(seconds), max(seconds))) if seconds else None],
            ["training images/s (median over epochs)", statistics.median(rates) if rates else None],
            *_trained_on(run, c)]
    if run.evaluation:
        rows.append(["evaluation seconds", run.evaluation.get("seconds")])
        rows += [[f"evaluated with {k}", v] for k, v in (run.evaluation.get("versions") or {}).items()]
    return html_table(["", "value"], rows)


def corruptions_section(ident: str, evaluation: dict[str, Any]) -> str:
    """The section of an eval.json's common corruptions ("" without them): per route a heat map of accuracy by
    corruption (rows) and severity (columns) with each row's mean, the mean over every cell, and the source."""
    table = evaluation.get("corruptions")
    if not table:
        return ""
    means = evaluation.get("corruption_mean") or {}
    routes = list(means) or list(next(iter(next(iter(table.values())).values())))
    names, levels = list(table), [str(s) for s in evaluation.get("corruption_severities") or next(iter(table.values()))]
    fig = Figure(figsize=(2.2 + 0.75 * (len(levels) + 1) * len(routes), 1.0 + 0.32 * len(names)), layout="constrained")
    axes = fig.subplots(1, len(routes), squeeze=False)[0]
    for ax, route in zip(axes, routes):
        grid = [[table[n].get(s, {}).get(route, float("nan")) for s in levels] for n in names]
        grid = [row + [statistics.fmean([v for v in row if v == v] or [float("nan")])] for row in grid]
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
        ax.set_xticks(range(len(levels) + 1), [*levels, "mean"], fontsize=8)
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names), fontsize=8)
        ax.set_xlabel("severity")
        ax.set_title(f"{route}: mean {means.get(route, float('nan')):.2f}%", fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="accuracy (%)")
    rows = [[n, s, *(table[n][s].get(r) for r in routes)] for n in names for s in levels if s in table[n]]
    caption = (f"<p>Accuracy (%) under the common corruptions, {_esc(evaluation.get('corruption_source'))}, "
               f"{_esc(evaluation.get('corruption_n'))} images per cell. The track's figure is the mean over every "
               "corruption and severity shown: " + ", ".join(f"{_esc(r)} {v:.2f}" for r, v in means.items()) + ".</p>")
    body = caption + figure_html(fig, "accuracy by corruption and severity") + \
        f"<details><summary>the table</summary>{html_table(['corruption', 'severity', *routes], rows, numeric_from=2)}</details>"
    return section(f"{ident}-corruptions", "Common corruptions (%)", body)


# ---------------------------------------------------------------- several runs


def run_figures(run: ReportRun, evaluated: bool = True) -> dict[str, float]:
    """The run's headline figures: the evaluation's table (``evaluated`` and it has one), else the last validation."""
    if evaluated and run.evaluation:
        return {f"{route} {k}": v for route, acc in run.evaluation["routes"].items() for k, v in acc.items()
                if isinstance(v, (int, float))}
    if run.mixture is not None:
        figures = (run.mixture.get("validation") or {}).get("mixture") or {}
        return {f"mixture val {k}": figures[k] for k in ("clean", "robust") if isinstance(figures.get(k), (int, float))}
    last = run.metrics[-1]
    return {f"{route} val {k}": last[f"val_{route}_{k}"] for route in routes_in(run.metrics)
            for k in ("clean", "robust") if isinstance(last.get(f"val_{route}_{k}"), (int, float))}


def setting_of(run: ReportRun) -> tuple:
    return tuple(sorted((k, json.dumps(v)) for k, v in run.config.items() if k not in _NOT_A_SETTING))


def comparison(runs: Sequence[ReportRun]) -> dict[str, Any]:
    """Figures per run, and the statistics the runs allow: with one setting over several seeds, mean, sd
    and the 95% t interval of the mean; with several settings, the paired difference of each against the
    first, matched by seed."""
    evaluated = all(r.evaluation for r in runs)  # else every run's validation figures, so they compare
    figures = [run_figures(r, evaluated) for r in runs]
    common = [k for k in figures[0] if all(k in f for f in figures[1:])]
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(setting_of(run), []).append(i)
    trained = [g for g, members in groups.items() if runs[members[0]].mixture is None]  # a mixture has no training
    differing = sorted({k for g in trained for k, _ in g} - {k for k, v in set.intersection(*(set(g) for g in trained))}) \
        if len(trained) > 1 else []
    names = [runs[members[0]].label if runs[members[0]].mixture is not None else
             ", ".join(f"{k}={json.loads(dict(g)[k]) if k in dict(g) else '–'}" for k in differing) or
             ("all runs" if len(trained) == len(groups) else "trained runs") for g, members in groups.items()]
    spread = []
    for name, members in zip(names, groups.values()):
        for metric in common:
            stats = mean_sd([figures[i][metric] for i in members])
            half = t_quantile(stats["n"] - 1) * stats["sd"] / stats["n"] ** 0.5 if stats["sd"] is not None else None
            spread.append({"setting": name, "metric": metric, **stats, "half_width": half})
    paired = []
    base = next(iter(groups.values()))
    seed = {i: runs[i].config.get("seed") for i in range(len(runs))}
    for name, members in list(zip(names, groups.values()))[1:]:
        matched = [(b, m) for m in members for b in base if seed[b] == seed[m] and seed[m] is not None]
        for metric in common:
            diffs = [figures[m][metric] - figures[b][metric] for b, m in matched]
            if diffs:
                paired.append({"setting": name, "baseline": names[0], "metric": metric, **paired_difference(diffs)})
    return {"figures": figures, "common": common, "settings": names, "spread": spread, "paired": paired}


def figure_label(metric: str) -> str:
    """A compared figure in the page's words: "adv val clean" -> "adv route, val natural" (accuracy without
    attack is natural; clean and adv name routes)."""
    route, _, rest = metric.partition(" ")
    words = {"clean": "natural", "val clean": "val natural", "worst_case": "worst case"}.get(rest, rest)
    return f"{route} route, {words}"


def spread_interval(s: dict[str, Any]) -> str:
    """A setting's 95% interval of the mean as the table shows it: none for one run, flagged for two."""
    if s["half_width"] is None:
        return "one run: none"
    if s["n"] == 2:
        return UNINFORMATIVE
    return f"{s['mean'] - s['half_width']:.2f} .. {s['mean'] + s['half_width']:.2f}"


def comparison_html(runs: Sequence[ReportRun]) -> str:
    result = comparison(runs)
    parts = ["<h3>Figures per run</h3>",
             html_table(["run", "seed", *map(figure_label, result["common"])],
                        [[r.label, r.config.get("seed"), *(f[k] for k in result["common"])]
                         for r, f in zip(runs, result["figures"])], numeric_from=1)]
    parts.append("<h3>Mean, sd and 95% interval of the mean per setting</h3>"
                 "<p>The interval is mean ± t<sub>0.975, n-1</sub> · sd / √n over the setting's runs (seeds).</p>")
    parts.append(html_table(["setting", "figure", "n", "mean", "sd", "95% interval"],
                            [[s["setting"], figure_label(s["metric"]), s["n"], s["mean"], s["sd"],
                              spread_interval(s)] for s in result["spread"]], numeric_from=2))
    if len(result["settings"]) > 1:
        parts.append(f"<h3>Paired differences against {_esc(result['settings'][0])}</h3><p>Matched by seed; the 95% t "
                     "interval of the mean difference; supported when it excludes 0.</p>")
        parts.append(html_table(["setting", "figure", "seeds", "mean diff", "95% interval", "verdict"],
                                [[p["setting"], figure_label(p["metric"]), p["n"], p["mean"],
                                  UNINFORMATIVE if uninformative(p) else f"{p['low']:.2f} .. {p['high']:.2f}"
                                  if p["low"] is not None else "–",
                                  "none: too few seeds" if uninformative(p) else p["verdict"]]
                                 for p in result["paired"]], numeric_from=2) if result["paired"] else
                     "<p>No two settings share a seed, so nothing can be paired.</p>")
    return "\n".join(parts)


# ---------------------------------------------------------------- the page


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;padding:1rem 1.5rem;max-width:1100px;
color:#1d1d1f;line-height:1.4;overflow-wrap:anywhere}
h1{font-size:1.6rem}h2{border-bottom:2px solid #ccc;padding-bottom:.2rem;margin-top:2rem}h3{margin-bottom:.3rem}
img{max-width:100%;height:auto;display:block;margin:.5rem 0}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.85rem;margin:.4rem 0}
th,td{border:1px solid #ddd;padding:.2rem .5rem}th{background:#f2f2f2;overflow-wrap:normal}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.key{word-break:break-word}
ul.checks{list-style:none;padding-left:0}li.pass b{color:#1a7f37}li.fail b{color:#c62828}
.note{color:#555;font-size:.9rem}details{margin:.5rem 0}
.headline{font-size:1.1rem;background:#f4f8ff;border-left:4px solid #2f6fdb;padding:.4rem .7rem}
"""


def section(ident: str, title: str, body: str) -> str:
    return f'<section id="{_esc(ident)}"><h3>{_esc(title)}</h3>\n{body}\n</section>'


def figure_html(fig: Figure, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="{png_data_uri(fig)}">'


def eval_command(run: ReportRun, sanity: bool = False) -> str:
    """The `robust eval` command that repeats the run's recorded evaluation (attacks, --limit, eps, seed,
    weights), writing eval.json into the run folder."""
    ev, path = run.evaluation or {}, str(run.path)
    parts = ["robust eval", path]
    attacks = [a for a in (ev.get("attacks") or {}) if a != "clean"]
    if attacks:
        parts.append(f"--attack {','.join(attacks)}")
    if isinstance(ev.get("n"), int) and ev.get("n") != test_size(run):
        parts.append(f"--limit {ev['n']}")
    if ev.get("threat", "linf") != "linf":
        parts.append(f"--threat {ev['threat']}")
    trained = trained_eps(run.config)
    if isinstance(ev.get("eps"), (int, float)) and (trained is None or abs(ev["eps"] - trained) > 1e-9 or
                                                      ev.get("threat", "linf") != "linf"):
        parts.append(f"--eps {ev['eps']:.6g}")
    if ev.get("seed") not in (None, 0):
        parts.append(f"--seed {ev['seed']}")
    if ev.get("weights") == "live" and run.config.get("ema"):
        parts.append("--weights live")
    if sanity:
        parts.append("--sanity")
    parts.append(f"--json {mixture_eval_file(path) if run.mixture is not None else path + '/'}")
    return " ".join(parts)


def trained_eps(config: dict[str, Any]) -> float | None:
    """The run's training eps as a number (config.json keeps it as written, e.g. 8/255); None when unreadable."""
    try:
        return resolve_eps(str(config["eps"]), "linf") if "eps" in config else None
    except (ConfigError, ValueError):
        return None


def test_size(run: ReportRun) -> int | None:
    """The number of test images of a built-in dataset (a --limit equal to it is no limit)."""
    return {"cifar10": 10000, "cifar100": 10000, "mnist": 10000, "fashion-mnist": 10000, "svhn": 26032}.get(
        str(run.config.get("dataset")))


def run_html(index: int, run: ReportRun) -> str:
    """The sections of one run."""
    ident = f"run{index}"
    parts = [f'<h2 id="{ident}">{_esc(run.label)}</h2><p class="note">{_esc(run.path)}</p>',
             section(f"{ident}-config", "Configuration", f"<details><summary>the resolved config</summary>{config_table(run)}</details>")]
    if run.mixture is not None:
        parts.append(mixture_section(ident, run))
    ev = run.evaluation
    if ev:
        parts.append(section(f"{ident}-final", "Final evaluation (%)", f"<p>{eval_caption(ev)}</p>{final_table(ev)}"))
        if ev.get("eps_sweep"):
            sweep = ev["eps_sweep"]
            rows = [[f"{s['eps']:.4g}", *(s["routes"][r]["worst_case"] for r in sweep[0]["routes"])] for s in sweep]
            parts.append(section(f"{ident}-sweep", "Accuracy against eps (worst case, %)",
                                 figure_html(sweep_figure(sweep), "accuracy against eps") +
                                 html_table(["eps", *(f"{r} route" for r in sweep[0]["routes"])], rows)))
        parts.append(corruptions_section(ident, ev))
        if ev.get("per_class"):
            per_class = ev["per_class"]
            names = class_names(run.images.get("classes") if run.images else None, len(next(iter(per_class.values()))),
                                run.config.get("dataset") or ev.get("dataset"))
            attacks = [a for a in (ev.get("attacks") or {}) if a != "clean"]
            parts.append(section(f"{ident}-classes", "Accuracy per class (%)",
                                 figure_html(per_class_figure(per_class, names, attacks), "robust accuracy per class") +
                                 per_class_table(per_class, names)))
        if run.broken_by:
            parts.append(section(f"{ident}-broken-by", "Which attack broke each example first (test images)",
                                 f"<p>From {PER_EXAMPLE_FILE}: per route, the first attack in --attack's order that "
                                 "fooled each image ('clean': misclassified without attack).</p>" + broken_by_table(run.broken_by)))
        if ev.get("checks"):
            parts.append(section(f"{ident}-sanity", "Sanity checks", checks_list(ev["checks"])))
        else:
            parts.append(section(f"{ident}-sanity", "Sanity checks",
                                 f"<p>Not run. To add them, evaluate again with the recorded settings and --sanity: "
                                 f"<code>{_esc(eval_command(run, sanity=True))} --force</code> (--force replaces "
                                 f"{_esc(mixture_eval_file(run.path).name if run.mixture is not None else EVAL_FILE)}: "
                                 "the evaluation runs again, its attacks included).</p>"))
    elif run.mixture is not None:
        parts.append(section(f"{ident}-final", "Final evaluation",
                             f"<p>No {_esc(mixture_eval_file(run.path).name)} beside the mixture; write one with "
                             f"`robust eval {_esc(run.path)} --attack pgd20,autoattack --sanity --json "
                             f"{_esc(mixture_eval_file(run.path))}`.</p>"))
    else:
        parts.append(section(f"{ident}-final", "Final evaluation",
                             f"<p>No {EVAL_FILE} in the run folder; write one with "
                             f"`robust eval {_esc(run.path)} --sanity --json {_esc(run.path)}/`.</p>"))
    if run.images:
        im = run.images
        parts.append(section(f"{ident}-images", "Test images, clean and attacked",
                             f"<p>The first {len(im['y'])} test images and their {_esc(im['attack'])} examples at "
                             f"{_esc(im['threat'])} eps {im['eps']:.4g}, per route; titles are the predictions "
                             "(red: wrong, with the true class).</p>" + figure_html(examples_figure(im), "clean and adversarial test images")))
    parts.append(section(f"{ident}-timing", "Timing", timing_table(run)))
    return "\n".join(parts)


def mixture_section(ident: str, run: ReportRun) -> str:
    """A mixture's calibration: what it mixes, the chosen weight and transform, the validation figures of the two
    routes and of the mixture, and with a recorded sweep the trade-off over the weight."""
    cal = run.mixture or {}
    val, chosen = cal.get("validation") or {}, cal.get("settings") or {}
    parts = ("its clean and adv routes" if not cal.get("accurate")
             else f"its adv route with the accurate model {_esc(cal['accurate'])}")
    text = (f"<p>Mixes {_esc(cal.get('source'))}: {parts}. Chosen on {_esc(val.get('n'))} of the run's validation "
            f"images (never the test set): weight {_num(chosen.get('weight'), 3)}, scale {_num(chosen.get('scale'), 3)}, "
            f"power {_num(chosen.get('power'), 3)}, offset {_num(chosen.get('offset'), 3)}, the most clean accuracy whose "
            f"robust accuracy ({_robust_rule_text(val)}, {_esc(val.get('threat'))} eps "
            f"{_num(val.get('eps'), 4)}) is at most {_num(val.get('max_drop'), 2)} points below the adv route's.</p>")
    rows = [[name, (val.get(key) or {}).get("clean"), (val.get(key) or {}).get("robust")]
            for name, key in (("clean route", "clean_route"), ("adv route", "adv_route"), ("mixture", "mixture"))]
    adv = val.get("adv_route") or {}
    if "robust_found" in adv:  # the reference the bound was taken from: the adv route on every image found as well
        rows.insert(2, ["adv route, images found through mixtures counted", adv.get("clean"), adv["robust_found"]])
    body = text + html_table(["validation", "natural %", f"{val.get('attack', 'robust')} %"], rows)
    mixed, robust_part = (val.get("mixture") or {}).get("robust"), (val.get("adv_route") or {}).get("robust")
    if isinstance(mixed, (int, float)) and isinstance(robust_part, (int, float)) and mixed > robust_part:
        body += (f'<p class="warning"><b>Warning:</b> under {_esc(val.get("attack"))} the mixture keeps more ({mixed:.2f}%) '
                 f"than its robust part, the adv route ({robust_part:.2f}%). A mixture is no more robust than the route "
                 "that makes it robust: the transform weakens the attack's gradients. Trust AutoAttack on the mixture and "
                 f"a transfer attack from the adv route (`robust eval {_esc(run.path)} --attack autoattack "
                 f"--transfer-from {_esc(cal.get('source'))}`), not this figure.</p>")
    if cal.get("sweep"):
        title = f"validation, {val.get('attack')} at eps {_num(val.get('eps'), 4)}"
        body += figure_html(tradeoff_figure(cal["sweep"], val, val.get("mixture") or {}, title),
                            "clean against robust accuracy over the mixing weight")
    else:
        body += (f'<p class="note">No trade-off curve recorded; `robust mix {_esc(cal.get("source"))} --sweep -o '
                 f"{_esc(run.path)}` records one.</p>")
    return section(f"{ident}-mixture", "The mixture and its calibration", body)


def _robust_rule_text(val: dict) -> str:
    """How the calibration counted a mixture's robust accuracy: an attack on it, or the margin rule's prediction."""
    if val.get("rule") == "margin":
        return (f"predicted from {_esc(val.get('attack'))} on the adv route alone by the margin rule, no attack on the "
                "mixture: evaluate it end to end")
    return f"{_esc(val.get('attack'))} on the mixture itself"


def run_headline(run: ReportRun) -> str:
    """One sentence of a run's result: the adv route's worst case and natural accuracy from eval.json, else
    its last validation figures."""
    ev = run.evaluation
    if ev:
        route = "adv" if "adv" in ev["routes"] else next(iter(ev["routes"]))
        acc = ev["routes"][route]
        attacks = [a for a in (ev.get("attacks") or {}) if a != "clean"]
        robust = acc.get("worst_case")
        attacked = f"{_num(robust, 1)}% robust ({', '.join(attacks) or 'no attack'}, worst case), " if attacks else ""
        return (f"{run.label}: {attacked}{_num(acc.get('clean'), 1)}% natural accuracy on the {route} route, "
                f"{ev.get('n')} test images, {weights_text(ev.get('weights'))}")
    if run.mixture is not None:
        val = run.mixture.get("validation") or {}
        mixed = val.get("mixture") or {}
        return (f"{run.label}: {_num(mixed.get('robust'), 1)}% validation robust ({_robust_rule_text(val)}) "
                f"and {_num(mixed.get('clean'), 1)}% natural accuracy on {val.get('n')} validation images "
                f"(adv route: {_num((val.get('adv_route') or {}).get('clean'), 1)}% natural; no "
                f"{mixture_eval_file(run.path).name} yet)")
    last = run.metrics[-1]
    route = next(iter(routes_in(run.metrics)), None)
    if route is None:
        return f"{run.label}: no validation figures and no {EVAL_FILE} yet"
    return (f"{run.label}: {_num(last.get(f'val_{route}_robust'), 1)}% validation robust "
            f"({validation_attack([run.config])}) and {_num(last.get(f'val_{route}_clean'), 1)}% natural accuracy on the "
            f"{route} route after epoch {last.get('epoch')} (no {EVAL_FILE} yet)")


def headline(runs: Sequence[ReportRun]) -> str:
    """The page's first line: one run's result, or per setting the mean of the adv route's robust figure."""
    if len(runs) == 1:
        return run_headline(runs[0])
    result = comparison(runs)
    metric = next((k for k in ("adv worst_case", "adv val robust") if k in result["common"]), None)
    if metric is None:
        return f"{len(runs)} runs; their figures are in the comparison below"
    rows = sorted((s for s in result["spread"] if s["metric"] == metric), key=lambda s: -s["mean"])
    what = "robust accuracy (worst case, test)" if metric == "adv worst_case" else "validation robust accuracy"
    return f"Adv route {what}, mean over each setting's runs: " + "; ".join(
        f"{s['setting']} {s['mean']:.1f}% (n={s['n']})" for s in rows)


def report_html(runs: Sequence[ReportRun], title: str | None = None) -> str:
    """The whole page (a string of HTML; no external resources): the headline, with several runs their
    comparison, the learning curves, then each run's sections."""
    title = title or ("robust report: " + ", ".join(r.label for r in runs))
    body = [f"<h1>{_esc(title)}</h1>",
            f'<p class="headline" id="headline"><b>{_esc(headline(runs))}</b></p>',
            (f'<p class="note">Report written on {_esc(describe_machine())}; each run\'s timing table names the '
             "machine it trained on where its checkpoint records it. Natural accuracy: without attack; the clean "
             "and adv routes are the model's two norm routes.</p>")]
    if len(runs) > 1:
        body.append('<section id="comparison"><h2>Comparison</h2>' + comparison_html(runs) + "</section>")
    trained = [r for r in runs if r.metrics]  # a mixture file has no curves of its own
    if trained:
        body.append('<section id="curves"><h2>Learning curves</h2>' +
                    figure_html(learning_curves_figure(trained), "learning curves") +
                    '<p class="note">Per route: adv solid, clean dashed; one colour per setting, one marker per run '
                    "(its seeds).</p></section>")
    body += [run_html(i, run) for i, run in enumerate(runs)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def build_report(paths: Sequence[str | Path], images: int = 8, attack: str = "pgd10", data_dir: str | None = None,
                 title: str | None = None) -> str:
    """Read the runs, attack ``images`` test images of each (0: none) and return the page."""
    runs = read_runs(run_folders(paths))  # a compare folder means the runs inside it
    for run in runs:
        if images and run.checkpoint is not None:
            run.images = attacked_examples(run.checkpoint, images, attack, data_dir)
    return report_html(runs, title)
