"""Curves: learning curves from runs' metrics.jsonl, eps sweeps, and the run folders they read.

Shared by ``robust plot``, ``robust compare`` (curves.png) and ``robust report``. matplotlib is
used through ``matplotlib.figure.Figure`` (no pyplot, no global backend state), so the figures
render headless (Agg).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from robust.errors import ConfigError
from robust.outputs import atomic_output
from robust.run import Run, RunFiles


@dataclass
class CurveRun:
    """One run's per-epoch metrics and the label its lines carry in a figure."""

    label: str
    metrics: list[dict[str, Any]]
    # several seeds: per metric key, per epoch, the (lowest, highest) value over seeds; drawn as a band
    band: dict[str, dict[int, tuple[float, float]]] | None = None


def read_config_quietly(folder: str | Path) -> dict[str, Any]:
    """A run folder's config.json values, or {} where it has none readable (labels only: nothing depends on it)."""
    try:
        return Run(folder).config
    except ConfigError:
        return {}


def validation_attack(configs: Sequence[dict[str, Any]]) -> str:
    """The validation attack of runs' config.json values, as the curves name it: PGD-10 (several: PGD)."""
    steps = {c.get("val_steps") for c in configs if c.get("val_steps")}
    return f"PGD-{steps.pop()}" if len(steps) == 1 else "PGD"


def run_folders(paths: Sequence[str | Path]) -> list[Path]:
    """The run folders ``paths`` name: a run folder itself (it holds metrics.jsonl), or a folder of runs (a
    `robust compare` folder) standing for every run folder inside it, up to three levels down, in order.
    ConfigError for a folder that is neither."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / RunFiles.METRICS).is_file() or not path.is_dir():
            found.append(path)  # a run, or a path whose error Run gives
            continue
        inside = sorted(p.parent for depth in ("*", "*/*", "*/*/*") for p in path.glob(f"{depth}/{RunFiles.METRICS}"))
        if not inside:
            raise ConfigError(f"{path} has no {RunFiles.METRICS} and no run folders inside; pass run folders written by "
                              "`robust train` or a `robust compare` folder")
        found += inside
    return found


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Short, distinct labels for run folders: their names, or their paths when names repeat."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in run_dirs]


def routes_in(metrics: list[dict[str, Any]]) -> list[str]:
    """The routes that have validation figures in ``metrics`` (adv first, as the paper's table)."""
    return [r for r in ("adv", "clean") if any(f"val_{r}_clean" in m for m in metrics)]


def curve_series(run: CurveRun, kind: str) -> list[tuple[str, list[int], list[float]]]:
    """(label, epochs, values) per route of ``run`` for ``kind`` 'clean' or 'robust' accuracy."""
    series = []
    routes = routes_in(run.metrics)
    for route in routes:
        key = f"val_{route}_{kind}"
        points = [(m["epoch"], m[key]) for m in run.metrics if m.get(key) is not None]
        if points:
            label = run.label if len(routes) == 1 else f"{run.label} {route}"
            series.append((label, [p[0] for p in points], [p[1] for p in points]))
    return series


def plot_learning_curves(runs: Sequence[CurveRun], path: str | Path, title: str | None = None,
                         overwrite: bool = True, attack: str = "PGD") -> Path:
    """Validation natural (no attack) and robust accuracy per epoch: one line per run and route, two panels.

    Each run keeps one colour; the adv route is drawn solid, the clean route dashed. ``attack`` names the
    validation attack (PGD-10 for a run validated with --val-steps 10).
    """

    if not any(routes_in(r.metrics) for r in runs):
        raise ConfigError("no validation figures to plot; the runs were trained with --val-split 0 or have no finished epoch")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, kind, ylabel in zip(axes, ("clean", "robust"), ("validation natural accuracy (%)", f"validation {attack} accuracy (%)")):
        for run, colour in zip(runs, colours):
            for label, epochs, values in curve_series(run, kind):
                style = "--" if label.endswith(" clean") else "-"
                ax.plot(epochs, values, style, color=colour, marker="o", markersize=3, label=label)
            for route in routes_in(run.metrics) if run.band else ():
                spread = run.band.get(f"val_{route}_{kind}") or {}
                epochs = sorted(spread)
                if epochs:
                    ax.fill_between(epochs, [spread[e][0] for e in epochs], [spread[e][1] for e in epochs],
                                    color=colour, alpha=0.15, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        integer_epochs(ax, runs)
    legend_below(fig, axes[1])
    if title:
        fig.suptitle(title)
    return save_png(fig, path, overwrite)


def integer_epochs(ax, runs: Sequence[Any]) -> None:
    """Epoch ticks at whole epochs: one each when there are few, else matplotlib's integer locator."""
    epochs = sorted({m["epoch"] for run in runs for m in run.metrics})
    if len(epochs) <= 20:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def legend_below(fig: Figure, ax) -> None:
    """One legend for the figure, under its panels, where it covers no data (``ax`` gives the entries)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=8, frameon=False)


def save_png(fig, path: str | Path, overwrite: bool) -> Path:
    """Write the figure as PNG atomically (``overwrite=False`` never replaces an existing file)."""
    with atomic_output(path, overwrite) as fh:
        fig.savefig(fh, format="png", dpi=120)
    return Path(path)


def plot_sweep(sweep: Sequence[dict[str, Any]], path: str | Path, title: str, overwrite: bool = True) -> None:
    """Accuracy (worst case over the attacks) against eps, one line per route, written as PNG (atomically)."""

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    eps = [s["eps"] for s in sweep]
    for route in sweep[0]["routes"]:
        ax.plot(eps, [s["routes"][route]["worst_case"] for s in sweep], marker="o", label=f"{route} route")
    ax.set_xlabel(f"eps ({sweep[0]['threat']})")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path, overwrite) as fh:
        fig.savefig(fh, format="png", dpi=120)


def plot_tradeoff(points: Sequence[dict[str, Any]], references: dict[str, dict[str, float]], chosen: dict[str, float],
                  path: str | Path, title: str, overwrite: bool = True) -> Path:
    """:func:`tradeoff_figure` written as PNG (atomically)."""
    return save_png(tradeoff_figure(points, references, chosen, title), path, overwrite)


def tradeoff_figure(points: Sequence[dict[str, Any]], references: dict[str, dict[str, float]], chosen: dict[str, float],
                    title: str) -> Figure:
    """Clean against robust accuracy of a mixture over its weight (one point per weight, labelled), with the clean
    route, the adv route and the calibrated mixture marked."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    ax.plot([p["robust"] for p in points], [p["clean"] for p in points], marker="o", ms=3, label="mixture over weight")
    for p in points[::max(1, len(points) // 5)]:
        ax.annotate(f"{p['weight']:g}", (p["robust"], p["clean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for name, marker in (("clean_route", "s"), ("adv_route", "^")):
        ref = references[name]
        ax.plot([ref["robust"]], [ref["clean"]], marker=marker, ls="", ms=8, label=name.replace("_", " "))
    ax.plot([chosen["robust"]], [chosen["clean"]], marker="*", ls="", ms=14, label="calibrated mixture")
    ax.set_xlabel("robust accuracy (%)")
    ax.set_ylabel("clean accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
