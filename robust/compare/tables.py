"""A compare grid's report: per-seed rows, means and paired differences as results.md tables, curves.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robust.config import TrainConfig
from robust.compare.settings import NORM_TITLES, CompareSettings, parse_select, select_epoch
from robust.curves import CurveRun, plot_learning_curves
from robust.compare.reference import PAPER_CIFAR10
from robust.stats import UNINFORMATIVE, mean_sd, paired_difference, uninformative
from robust.run import Run, RunFiles
from robust.plan import TrainPlan, plan_of


def seed_rows(runs: dict[str, dict[str, dict[str, Any]]], attacks: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every per-seed figure: one row per seed, norm and route."""
    rows = []
    for norm, per_seed in runs.items():
        for seed, run in per_seed.items():
            for row in table_rows({norm: run}, attacks):
                rows.append({"seed": int(seed), **row})
    return rows


def seed_statistics(runs: dict[str, dict[str, dict[str, Any]]], attacks: tuple[str, ...],
                    baseline: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, paired): per norm and route the mean (and sd, n) of each figure over seeds; the paired
    difference of every other norm's routes against the baseline's, seed by seed.

    A route is paired with the baseline's same route, else with the baseline's adv route (bn's shared BN).
    """
    metrics = ("clean", *attacks, "worst_case")
    by_seed = {}
    for row in seed_rows(runs, attacks):
        by_seed.setdefault((row["norm"], row["route"]), {})[row["seed"]] = row
    rows = []
    for (norm, route), per_seed in by_seed.items():
        row: dict[str, Any] = {"norm": norm, "route": route, "n": len(per_seed), "sd": {}}
        for m in metrics:
            values = [r[m] for r in per_seed.values() if r.get(m) is not None]
            stats = mean_sd(values) if values else {"mean": None, "sd": None}
            row[m], row["sd"][m] = stats["mean"], stats["sd"]
        rows.append(row)
    base_routes = {route: per_seed for (norm, route), per_seed in by_seed.items() if norm == baseline}
    base_adv = base_routes.get("adv", base_routes.get("shared"))
    paired = []
    for (norm, route), per_seed in by_seed.items():
        if norm == baseline or not base_routes:
            continue
        base_route = route if route in base_routes else ("adv" if "adv" in base_routes else "shared")
        base = base_routes.get(route, base_adv)
        seeds = [s for s in per_seed if s in base]
        for m in metrics:
            diffs = {s: per_seed[s][m] - base[s][m] for s in seeds
                     if per_seed[s].get(m) is not None and base[s].get(m) is not None}
            if not diffs:
                continue
            paired.append({"norm": norm, "route": route, "baseline": baseline, "baseline_route": base_route,
                           "metric": m, "diffs": {str(s): d for s, d in diffs.items()},
                           **paired_difference(list(diffs.values()))})
    return rows, paired


def run_summary(config: TrainConfig | TrainPlan) -> dict[str, Any]:
    """Training facts of one run from its metrics.jsonl: epochs, seconds, final validation figures."""

    metrics = Run(config.run_dir).metrics
    final = metrics[-1] if metrics else {}
    return {"epochs": len(metrics), "train_seconds": sum(m.get("seconds", 0.0) for m in metrics),
            "final_val": {k: v for k, v in final.items() if k.startswith("val_")}, "metrics": metrics}


def attack_title(name: str) -> str:
    """Column heading of an attack, as the paper writes it: pgd20 -> PGD-20, autoattack -> AutoAttack."""
    special = {"autoattack": "AutoAttack", "fgsm": "FGSM", "square": "Square", "fab": "FAB", "fab-t": "FAB-T"}
    if name in special:
        return special[name]
    for prefix in ("pgd", "cw"):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return f"{prefix.upper()}-{name[len(prefix):]}"
    return name.upper()


def table_rows(runs: dict[str, dict[str, Any]], attacks: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per norm and route, in the paper's order: adv (and shared) routes first, then clean.

    A bn model has one route (the shared BN, scored as 'adv'); results.json labels it 'shared', the tables 'adv'.
    """
    rows = []
    for route in ("adv", "clean"):
        for norm, run in runs.items():
            accs = run["eval"]["routes"].get(route)
            if accs is None:
                continue
            label = "shared" if norm == "bn" else route
            rows.append({"norm": norm, "route": label, "clean": accs["clean"],
                         **{a: accs.get(a) for a in attacks}, "worst_case": accs.get("worst_case")})
    return rows


def route_label(route: str) -> str:
    """A route as the tables name it: a bn model's one route ("shared" in results.json) is its adv route, as in
    training's log and `robust eval`."""
    return "adv" if route == "shared" else route


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(rows: list[dict[str, Any]], attacks: tuple[str, ...], worst_case: bool = True,
                   norm_titles: dict[str, str] = NORM_TITLES) -> str:
    """A markdown table: norm, route, clean, one column per attack (and the per-example worst case)."""
    columns = ["clean", *attacks] + (["worst_case"] if worst_case else [])
    titles = ["natural", *(attack_title(a) for a in attacks)] + (["worst case"] if worst_case else [])
    lines = ["| norm | route | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(titles)]
    for row in rows:
        cells = [_cell(row.get(c)) for c in columns]
        lines.append(f"| {norm_titles.get(row['norm'], row['norm'])} | {route_label(row['route'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table_markdown() -> str:
    """The paper's CIFAR-10 table, labelled as the paper's (for README and results.md)."""
    titles = {**NORM_TITLES, "sabn": "SaAuxBN (SaBN)"}
    table = markdown_table(PAPER_CIFAR10["rows"], ("pgd10", "pgd20"), worst_case=False, norm_titles=titles)
    return f"The paper's figures, not measured here ({PAPER_CIFAR10['source']}):\n\n{table}"


def mean_sd_table(rows: list[dict[str, Any]], attacks: tuple[str, ...]) -> str:
    """The mean table: mean ± sd per cell and each row's n."""
    columns = ["clean", *attacks, "worst_case"]
    titles = ["natural", *(attack_title(a) for a in attacks), "worst case"]
    lines = ["| norm | route | n | " + " | ".join(titles) + " |", "|---|---|---|" + "---|" * len(titles)]
    for row in rows:
        cells = []
        for col in columns:
            mean, sd = row.get(col), row.get("sd", {}).get(col)
            cells.append(_cell(mean) if sd is None or mean is None else f"{mean:.2f} ± {sd:.2f}")
        lines.append(f"| {NORM_TITLES.get(row['norm'], row['norm'])} | {route_label(row['route'])} | {row['n']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table(rows: list[dict[str, Any]], attacks: tuple[str, ...]) -> str:
    """Every per-seed figure: seed, norm, route, clean, attacks, worst case."""
    columns = ["clean", *attacks, "worst_case"]
    titles = ["natural", *(attack_title(a) for a in attacks), "worst case"]
    lines = ["| seed | norm | route | " + " | ".join(titles) + " |", "|---|---|---|" + "---|" * len(titles)]
    for row in sorted(rows, key=lambda r: r["seed"]):
        lines.append(f"| {row['seed']} | {NORM_TITLES.get(row['norm'], row['norm'])} | {route_label(row['route'])} | "
                     + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def paired_markdown(results: dict[str, Any], attacks: tuple[str, ...], n_seeds: int) -> list[str]:
    """The paired differences against the baseline: a table with 95% t intervals and one sentence each."""
    paired = results.get("paired") or []
    if not paired:
        return []
    title = lambda n: NORM_TITLES.get(n, n)  # noqa: E731
    baseline = results["baseline"]
    lines = [f"Paired difference against {title(baseline)} (percentage points, seed by seed; 95% interval "
             "mean ± t(0.975, n-1)·sd/√n; the verdicts follow the table):", "",
             "| norm | route | vs | figure | n | mean | sd | 95% interval |",
             "|---|---|---|---|---|---|---|---|"]
    sentences = []
    for p in paired:
        what = "natural" if p["metric"] == "clean" else ("worst case" if p["metric"] == "worst_case" else attack_title(p["metric"]))
        sd = "-" if p["sd"] is None else f"{p['sd']:.2f}"
        interval = "-" if p["low"] is None else UNINFORMATIVE if uninformative(p) else f"[{p['low']:.2f}, {p['high']:.2f}]"
        lines.append(f"| {title(p['norm'])} | {route_label(p['route'])} | {title(baseline)} {route_label(p['baseline_route'])} | "
                     f"{what} | {p['n']} | {p['mean']:+.2f} | {sd} | {interval} |")
        head = f"{title(p['norm'])} {route_label(p['route'])} vs {title(baseline)} {route_label(p['baseline_route'])}, {what}"
        if p["low"] is None:
            sentences.append(f"- {head}: {p['mean']:+.2f} points on one seed; a single seed cannot rank them.")
        elif uninformative(p):
            sentences.append(f"- {head}: {p['mean']:+.2f} points over 2 seeds; 2 seeds give no informative interval, "
                             "so no verdict: run 3 or more seeds.")
        elif p["verdict"] == "supported":
            sentences.append(f"- {head}: {p['mean']:+.2f} points, interval [{p['low']:.2f}, {p['high']:.2f}] excludes 0 "
                             f"(n = {p['n']}): supported.")
        else:
            sentences.append(f"- {head}: {p['mean']:+.2f} points, interval [{p['low']:.2f}, {p['high']:.2f}] contains 0 "
                             f"(n = {p['n']}): no significant difference.")
    return [*lines, "", *sentences, ""]


def settings_lines(settings: CompareSettings, n_train: int, n_val: int, n_eval: int) -> list[str]:
    """The run's settings in plain words, for above the table."""
    c = TrainPlan.of(settings.config)
    arch = f"{c.arch}, width {c.width or 'default'}"
    batches_per_epoch = _steps_per_epoch(c, n_train)
    w = settings.clean_weight
    method = f"{', '.join(settings.method_list)} for every norm"
    if w > 0:
        objectives = [settings.norm_plan("bn", method=m).objective_name for m in settings.method_list]
        objective = "objective(adv route)" if len(objectives) > 1 else (
            "CE(adv route, x_adv)" if objectives[0] == "pgd" else f"{objectives[0]}(adv route)")
        method += (f" (loss {w:g}*CE(clean route, x) + {1 - w:g}*{objective}; "
                   "the paper's BN baseline uses the same hybrid loss through one shared BN)")
    return [
        f"- dataset: {c.dataset}; {n_train} training examples, {n_val} validation examples "
        f"({'seed ' + str(c.seed) if settings.seeds is None else 'seeds ' + ','.join(map(str, settings.seed_list)) + ', each its own split and run'}), "
        f"test: the first {n_eval} test examples",
        f"- model: {arch}; norms: {', '.join(settings.norms)} (only the norm differs between runs)",
        f"- training: {c.epochs} epochs of {batches_per_epoch} steps, batch {c.batch_size}, {_optimizer_text(c)}, "
        f"{_schedule_text(c, batches_per_epoch)}",
        *_modern_lines(c),
        f"- method{'s' if len(settings.method_list) > 1 else ''}: {method}",
        *_attack_lines(settings),
        _select_line(settings),
        f"- evaluation: Linf eps {c.eps:.4g}, attacks {', '.join(settings.attacks)}, each route attacked and "
        f"scored through itself in eval mode; 'worst case' = per-example worst over all attacks",
    ]


def _attack_lines(settings: CompareSettings) -> list[str]:
    """The training attack of each method (each method's own attack and BN mode)."""
    c = TrainPlan.of(settings.config)
    lines = []
    for method in settings.method_list:
        m = settings.norm_plan("bn", method=method)
        attack = m.objective.describe_attack(m.steps)
        step = f", step {m.step_size:.4g}" if not m.objective.one_step else ""
        label = f" ({method})" if len(settings.method_list) > 1 else ""
        lines.append(f"- training attack{label}: {attack}, eps {_eps_text(c)}{step}, through the adv route, "
                     f"BN in {m.attack_bn} mode")
    return lines


def paper_comparable(c: TrainConfig | TrainPlan) -> bool:
    """Whether a grid's setting is the paper's (CIFAR-10, Linf 8/255), so its table is shown beside ours."""
    plan = plan_of(c)
    return plan.data.dataset == "cifar10" and abs(plan.eps - 8 / 255) < 1e-9


def _select_line(settings: CompareSettings) -> str:
    c = settings.config
    if settings.select == "best":
        figure = {"corruption": f"accuracy under {c.val_corruptions} at severity {c.val_severity}",
                  "clean": "natural accuracy"}.get(c.resolved_select_by, f"PGD-{c.val_steps} accuracy")
        return (f"- checkpoint (--select best): best.pt of each run (best adv-route validation {figure}"
                f"{f' on {c.val_limit} validation examples' if c.val_limit else ''})")
    if settings.select == "last":
        return "- checkpoint (--select last): last.pt of each run (the final epoch)"
    n = select_epoch(settings.select)
    return (f"- checkpoint (--select {settings.select}): epoch{n}.pt of each run (the model after epoch {n} of "
            f"{c.epochs}, a fixed epoch as the reference evaluates 190 of 200)")


def _steps_per_epoch(c: TrainPlan, n_train: int) -> int:
    """Optimizer steps per epoch, as the trainer's loader counts them (with --extra-data: the mixed epoch)."""
    if not c.extra_data:
        return -(-n_train // c.batch_size)
    if c.epoch_size:
        return -(-c.epoch_size // c.batch_size)
    labelled = c.batch_size - int(round(c.batch_size * c.data.extra_fraction))
    return -(-n_train // labelled) if labelled else 0


def _optimizer_text(c: TrainPlan) -> str:
    if c.optimizer == "adamw":
        text = f"AdamW lr {c.lr:g}, beta1 {c.momentum:g}, decoupled weight decay {c.weight_decay:g}"
    else:
        text = f"SGD{' (Nesterov)' if c.nesterov else ''} lr {c.lr:g}, momentum {c.momentum:g}, weight decay {c.weight_decay:g}"
    return text + ("" if c.decay_norms else " (not on norm affines and biases)")


def _schedule_text(c: TrainPlan, batches_per_epoch: int) -> str:
    if c.schedule == "multistep":
        schedule = f"multistep x0.1 at milestones {c.milestones}{_milestone_note(c)}"
    elif c.schedule == "cosine":
        schedule = "cosine to 0"
    else:
        return "one-cycle (linear up over 40% of the steps, then down to 0)"
    if c.warmup_epochs:
        return f"{schedule}, after a linear warm-up from 0 over {c.warmup_epochs:g} epochs"
    warm = min(c.warmup_steps, batches_per_epoch)  # the trainer warms up within the first epoch only
    return f"{schedule}, {f'linear warm-up from lr/10 over {warm} steps' if warm else 'no warm-up'}"


def _modern_lines(c: TrainPlan) -> list[str]:
    """Weight averaging, label smoothing, extra data and the recipe, when used."""
    parts = [f"recipe {c.recipe} (flags over it)"] if c.recipe else []
    if c.ema:
        parts.append(f"weight average tau {c.ema:g} (evaluated and selected)")
    if c.label_smoothing:
        parts.append(f"label smoothing {c.label_smoothing:g}")
    if c.extra_data:
        size = f", epochs of {c.epoch_size} examples" if c.epoch_size else ""
        parts.append(f"extra data {c.extra_data} at {c.data.extra_fraction:g} of every batch{size}")
    return [f"- also: {'; '.join(parts)}"] if parts else []


def _milestone_note(c: TrainPlan) -> str:
    """' = epochs 50,150' when the milestones are fractions of the epochs."""
    return f" = epochs {','.join(map(str, c.milestone_epochs))}" if "." in str(c.milestones) else ""


def _eps_text(c: TrainPlan) -> str:
    """eps as written, with its value when the text is a fraction (8/255 = 0.03137)."""
    text = c.settings["eps"]
    return text if str(text) == f"{c.eps:g}" else f"{text} = {c.eps:.4g}"


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: title, command, settings, the measured table(s), training facts, the paper's table.

    With --methods, one section per method (each its own table and paired differences)."""
    settings = CompareSettings.from_dict(results["settings"])
    c = settings.config
    parts = [f"# Norm comparison on {c.dataset} (eps {c.eps})", ""]
    if results.get("command"):
        parts += ["Command:", "", "```", results["command"], "```", ""]
    if results.get("resumed_with"):
        parts += ["Resumed with:", "", "```", *results["resumed_with"], "```", ""]
    parts += ["Settings:", "", *settings_lines(settings, results["n_train"], results["n_val"], results["n_eval"]), ""]
    if settings.methods is None:
        parts += _method_markdown(results, settings, results)
        parts += ["", "Learning curves: curves.png"]
    else:
        for method, part in results["by_method"].items():
            parts += [f"## Method {method}", "", *_method_markdown(results, settings, part),
                      "", f"Learning curves: curves-{method}.png", ""]
    if paper_comparable(c):
        parts += ["", paper_table_markdown(), ""]
    else:
        parts += ["", f"The paper's CIFAR-10 figures (Linf 8/255) are not shown: this grid is {c.dataset} at eps {c.eps}.", ""]
    return "\n".join(parts)


def _method_markdown(results: dict[str, Any], settings: CompareSettings, part: dict[str, Any]) -> list[str]:
    """One method's tables: mean (or single-seed) figures, paired differences, runs, per-seed figures."""
    attacks = tuple(results["settings"]["attacks"])
    seeds = results.get("seeds", [settings.config.seed])
    if len(seeds) == 1:
        parts = [f"Test accuracy (%) on {results['n_eval']} examples (seed {seeds[0]}):", "",
                 markdown_table(part["rows"], attacks), ""]
    else:
        parts = [f"Test accuracy (%) on {results['n_eval']} examples: mean ± sample standard deviation over "
                 f"n = {len(seeds)} seeds ({', '.join(map(str, seeds))}; per-seed figures below and in results.json):",
                 "", mean_sd_table(part["rows"], attacks), ""]
    parts += paired_markdown({"paired": part["paired"], "baseline": results["baseline"]}, attacks, len(seeds))
    parts += ["Runs:", ""]
    name = parse_select(settings.select)
    for norm, per_seed in part["runs"].items():
        for seed, run in per_seed.items():
            best = run.get("best") or {}
            picked = (f"best.pt from epoch {best.get('epoch', '?')}" if name == RunFiles.BEST
                      else f"last.pt (epoch {run['epochs']})" if name == RunFiles.LAST else name)
            parts.append(f"- {norm}, seed {seed}: {run['run_dir']}, {run['epochs']} epochs in {run['train_seconds']:.0f} s, "
                         f"{picked}, evaluation {run['eval']['seconds']:.0f} s")
    if len(seeds) > 1:
        parts += ["", "Per seed:", "", seed_table(part["seed_rows"], attacks)]
    return parts


def write_curves(settings: CompareSettings, runs: dict[str, dict[str, dict[str, Any]]], path: Path,
                 method: str | None) -> None:
    """curves.png: validation accuracy per epoch per norm (mean and min-max band over seeds)."""

    if not any(run["metrics"] and settings.config.val_split > 0 for per_seed in runs.values() for run in per_seed.values()):
        return
    curves = [CurveRun(NORM_TITLES.get(norm, norm), *mean_metrics([r["metrics"] for r in per_seed.values()]))
              for norm, per_seed in runs.items()]
    title = f"{settings.config.dataset}, eps {settings.config.eps}" + (f", {method}" if method else "")
    if len(settings.seed_list) > 1:
        title += f", mean of {len(settings.seed_list)} seeds (band: min-max)"
    plot_learning_curves(curves, path, title=title)


def mean_metrics(per_seed: list[list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], dict[str, dict[int, tuple[float, float]]] | None]:
    """(curve, band): per epoch the mean over seeds of each validation figure, and its min-max over
    seeds (epochs every seed reached); one seed is its own curve, without a band."""
    if len(per_seed) == 1:
        return per_seed[0], None
    by_epoch = [{m["epoch"]: m for m in metrics} for metrics in per_seed]
    epochs = sorted(set.intersection(*(set(e) for e in by_epoch)))
    merged, band = [], {}
    for epoch in epochs:
        rows = [e[epoch] for e in by_epoch]
        keys = [k for k in rows[0] if k.startswith("val_") and all(isinstance(r.get(k), (int, float)) for r in rows)]
        merged.append({"epoch": epoch, **{k: sum(r[k] for r in rows) / len(rows) for k in keys}})
        for k in keys:
            band.setdefault(k, {})[epoch] = (min(r[k] for r in rows), max(r[k] for r in rows))
    return merged, band
