"""The paper's comparison: train one model per norm kind with one shared config, evaluate every route.

``run_compare(CompareSettings(config, norms=("bn", "auxbn", "sabn")))`` trains each norm into
``<out>/<norm>/`` with :class:`robust.trainer.Trainer` (same seed, data split and budget; only the
norm differs), evaluates each route of each run's best.pt on the test set, and writes into
``<out>``: results.md (the settings above a table shaped like the paper's), results.json (every
figure) and curves.png (validation accuracy per epoch, one line per norm and route).

Seeds: with ``seeds`` (``--seeds 0,1,2``) every norm trains once per seed into
``<out>/<norm>/seed<k>/`` (each seed its own split, the same for every norm); without it the one
run per norm stays in ``<out>/<norm>/``. results.json then holds every per-seed figure, per norm
and route the mean and sample standard deviation over seeds, and per seed pair the difference of
each norm against the baseline norm with a 95% t interval; results.md says per comparison whether
the interval excludes 0. ``select`` picks the checkpoint evaluated: best.pt (default), last.pt or
epochN.pt (``epoch:N``; the runs keep it through ``keep_epochs``).

Methods: with ``methods`` (``--methods pgd,trades``) the grid is norms x methods x seeds, runs in
``<out>/<method>/<norm>/...``, results per method under ``by_method``. ``jobs`` > 1 trains the
runs in that many spawned processes side by side (fewer torch threads each); figures do not
depend on it, only on each run's thread count (recorded in its config.json).

Method: unless the config names one, every norm trains with the hybrid loss
(``w*CE(clean route, x) + (1-w)*CE(adv route, x_adv)``). The paper's BN baseline uses that same
loss through one shared BN, so the comparison changes the norm only (``robust train`` alone
defaults bn to plain PGD-AT).

Folder states (what ``resume`` does):
- a new or empty ``out`` starts every run; an existing non-empty one is an error unless
  ``resume`` (continue) or ``force`` (retrain every norm from scratch) is given;
- with ``resume``, a norm whose last.pt reached the final epoch is not trained again (only
  evaluated, and its evaluation is reused from eval.json when nothing changed), a norm with a
  partial last.pt continues with ``Trainer(resume=True)``, a norm without last.pt starts over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import MAX_SEED, METHODS, ConfigError, TrainConfig, available_cpus, check_fields
from .norms import NORMS, check_norm
from .outputs import FolderLock, check_output_dir, holds_files, write_output

SETTINGS_FILE = "compare.json"
RESULT_FILES = ("results.md", "results.json", "curves.png")
EVAL_CACHE = "eval.json"
DEFAULT_ATTACKS = ("pgd10", "pgd20")
NORM_TITLES = {"bn": "BN", "auxbn": "AuxBN", "sabn": "SaBN"}

# The reference's CIFAR-10 table (PreAct ResNet-18, Linf 8/255, 200 epochs; its README), quoted
# for comparison only. None means the paper reports no figure.
PAPER_CIFAR10 = {
    "source": "Gong et al., Sandwich Batch Normalization (WACV 2022), reference code README: "
              "CIFAR-10, PreAct ResNet-18, Linf eps 8/255, hybrid loss, 200 epochs",
    "rows": [
        {"norm": "bn", "route": "shared", "clean": 84.84, "pgd10": 41.57, "pgd20": 40.02},
        {"norm": "auxbn", "route": "adv", "clean": 83.42, "pgd10": 43.05, "pgd20": 41.60},
        {"norm": "sabn", "route": "adv", "clean": 84.08, "pgd10": 44.93, "pgd20": 43.14},
        {"norm": "auxbn", "route": "clean", "clean": 94.47, "pgd10": None, "pgd20": None},
        {"norm": "sabn", "route": "clean", "clean": 94.62, "pgd10": None, "pgd20": None},
    ],
}


class CompareExistsError(ConfigError):
    """The compare folder already holds results; pass --resume or --force."""


@dataclass
class CompareSettings:
    """A comparison: the shared training config plus which norms and how to evaluate them.

    ``config.norm`` is ignored (each norm replaces it) and ``config.out`` is the compare folder
    (default ``runs/compare-<dataset>-s<seed>``).
    """

    config: TrainConfig
    norms: tuple[str, ...] = NORMS
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    eval_limit: int | None = field(default=None, metadata={"min": 1})
    eval_batch_size: int = field(default=256, metadata={"min": 1})
    seeds: tuple[int, ...] | None = None
    baseline: str | None = None
    select: str = "best"
    methods: tuple[str, ...] | None = None

    @property
    def seed_list(self) -> list[int]:
        """The seeds trained: --seeds, else the config's one seed."""
        return list(self.seeds) if self.seeds is not None else [self.config.seed]

    @property
    def baseline_norm(self) -> str:
        """The norm every other is paired against: --baseline, else bn when compared, else the first norm."""
        if self.baseline is not None:
            return self.baseline
        return "bn" if "bn" in self.norms else self.norms[0]

    @property
    def out(self) -> Path:
        return Path(self.config.out or f"runs/compare-{self.config.dataset}-s{self.config.seed}")

    @property
    def method(self) -> str:
        return self.config.method or "hybrid"

    @property
    def method_list(self) -> list[str]:
        """The methods trained: --methods, else the one --method (default hybrid)."""
        return list(self.methods) if self.methods is not None else [self.method]

    @property
    def clean_weight(self) -> float:
        """The same loss for every norm: the config's clean-weight, else the reference's 0.5 (bn too)."""
        return 0.5 if self.config.clean_weight is None else float(self.config.clean_weight)

    def norm_config(self, norm: str, seed: int | None = None, method: str | None = None) -> TrainConfig:
        """The config of one run: the shared one with norm, method, clean-weight, seed and out replaced.

        Without --seeds a run is ``<out>/<norm>/`` (the config's seed); with --seeds it is
        ``<out>/<norm>/seed<k>/``; with --methods every path has the method above the norm
        (``<out>/<method>/<norm>/...``). With --select epoch:N the run keeps epochN.pt.
        """
        method = method or self.method_list[0]
        base = self.out / method if self.methods is not None else self.out
        keep = select_epoch(self.select)
        kept = sorted({*self.config.kept_epochs, keep}) if keep is not None else []  # --keep-epochs too
        extra = {"keep_epochs": ",".join(map(str, kept))} if kept else {}
        if self.seeds is None:
            return dataclasses.replace(self.config, norm=norm, method=method, clean_weight=self.clean_weight,
                                       out=str(base / norm), **extra)
        seed = self.seed_list[0] if seed is None else seed
        return dataclasses.replace(self.config, norm=norm, method=method, clean_weight=self.clean_weight,
                                   seed=seed, out=str(base / norm / f"seed{seed}"), **extra)

    def validate(self) -> "CompareSettings":
        """Raise ConfigError naming the first bad value; check attack names before any training."""
        from .evaluate import check_attack_names

        self.config.validate()
        check_fields(CompareSettings, self.__dict__)
        if not self.norms:
            raise ConfigError("no norms given; pass e.g. --norms bn,auxbn,sabn")
        for norm in self.norms:
            try:
                check_norm(norm)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if len(set(self.norms)) != len(self.norms):
            raise ConfigError(f"norms {','.join(self.norms)} repeat a name; list each once")
        self.attacks = tuple(a for a in check_attack_names(self.attacks) if a != "clean") or DEFAULT_ATTACKS
        if self.seeds is not None:
            self.seeds = parse_seeds(self.seeds)
        if self.baseline is not None and self.baseline not in self.norms:
            raise ConfigError(f"baseline {self.baseline!r} is not one of the norms {','.join(self.norms)}; "
                              "pass one of them to --baseline")
        parse_select(self.select)
        keep = select_epoch(self.select)
        if keep is not None and keep > self.config.epochs:
            raise ConfigError(f"select {self.select!r}: the runs train {self.config.epochs} epochs; pick an epoch "
                              f"in 1..{self.config.epochs}")
        if self.methods is not None:
            if self.config.method is not None:
                raise ConfigError("give --method (one method) or --methods (a grid), not both")
            for method in self.methods:
                if method not in METHODS:
                    raise ConfigError(f"unknown method {method!r} in methods; valid: {', '.join(METHODS)}")
            if len(set(self.methods)) != len(self.methods):
                raise ConfigError(f"methods {','.join(self.methods)} repeat a name; list each once")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "norms": list(self.norms), "attacks": list(self.attacks),
                "eval_limit": self.eval_limit, "eval_batch_size": self.eval_batch_size,
                "seeds": None if self.seeds is None else list(self.seeds), "baseline": self.baseline,
                "select": self.select, "methods": None if self.methods is None else list(self.methods)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CompareSettings":
        try:
            seeds, methods = values.get("seeds"), values.get("methods")
            return cls(TrainConfig.from_saved(values["config"]), tuple(values["norms"]), tuple(values["attacks"]),
                       values.get("eval_limit"), values.get("eval_batch_size", 256),
                       None if seeds is None else tuple(seeds), values.get("baseline"), values.get("select", "best"),
                       None if methods is None else tuple(methods))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"compare settings are incomplete ({exc}); start a new comparison with --force") from None


def parse_seeds(text: str | list | tuple) -> tuple[int, ...]:
    """--seeds 0,1,2 (or a list of ints) as a tuple of distinct non-negative seeds, in the order given."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise ConfigError(f"seeds {text!r} must be comma-separated non-negative integers, e.g. 0,1,2")
        try:
            seeds = tuple(int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"seeds {text!r} must be comma-separated non-negative integers, e.g. 0,1,2") from None
    elif isinstance(text, (list, tuple)) and text and all(isinstance(p, int) and not isinstance(p, bool) for p in text):
        seeds = tuple(text)
    else:
        raise ConfigError(f"seeds {text!r} must be comma-separated non-negative integers, e.g. 0,1,2")
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seeds must be >= 0 and <= {MAX_SEED}, got {seed}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {','.join(map(str, seeds))} repeat a seed; list each once")
    return seeds


def parse_select(text: str) -> str:
    """--select best|last|epoch:N: which checkpoint of each run is evaluated; returns its file name
    (epoch:N -> epochN.pt, which the runs keep through --keep-epochs)."""
    if text == "best":
        return "best.pt"
    if text == "last":
        return "last.pt"
    if isinstance(text, str) and text.startswith("epoch:"):
        number = text[len("epoch:"):]
        if not number.isdigit() or int(number) < 1:
            raise ConfigError(f"select {text!r}: epoch:N needs a whole epoch number >= 1, e.g. epoch:5")
        return f"epoch{int(number)}.pt"
    raise ConfigError(f"select {text!r} must be best, last or epoch:N (e.g. epoch:5)")


def select_epoch(text: str) -> int | None:
    """N of --select epoch:N, else None."""
    name = parse_select(text)
    return int(name[len("epoch"):-len(".pt")]) if name.startswith("epoch") else None


def load_settings(out: str | Path) -> dict[str, Any]:
    """The saved settings of the comparison in ``out`` (for resuming), as a plain dict."""
    path = Path(out) / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} does not exist; start a new comparison without --resume")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is not valid JSON; start a new comparison with --force") from None


def check_compare_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite an existing comparison unless told to continue or replace it."""
    if resume and force:
        raise ConfigError("resume and force exclude each other; pick one")
    if resume:
        load_settings(out)
    elif holds_files(out) and not force:
        raise CompareExistsError(f"compare folder {out} already exists; pass --resume to continue it, "
                                 "--force to retrain every norm, or --out NEW")


# ---------------------------------------------------------------------------------------------
# Training


def run_state(config: TrainConfig) -> str:
    """'done' (last.pt at the final epoch), 'partial' (an earlier epoch) or 'new' (no last.pt)."""
    from . import checkpoint as ckpt

    last = config.run_dir / "last.pt"
    if not last.is_file():
        return "new"
    finished_epochs = int(ckpt.load_checkpoint(last)["epoch"]) + 1
    return "done" if finished_epochs >= config.epochs and (config.run_dir / "best.pt").is_file() else "partial"


def train_norm(config: TrainConfig, state: str, data, log: Callable[[str], None]) -> None:
    """Train (or continue) one norm's run; a finished run is left as it is."""
    from .trainer import Trainer

    if state == "done":
        log(f"{config.norm}: {config.run_dir} is complete ({config.epochs} epochs); not training it again")
        return
    (config.run_dir / EVAL_CACHE).unlink(missing_ok=True)  # a new best.pt needs a new evaluation
    Trainer(config, data=data, resume=state == "partial", force=state == "new", log=log).fit()


# ---------------------------------------------------------------------------------------------
# Evaluation


def eval_key(settings: CompareSettings, config: TrainConfig, best: dict[str, Any] | None,
             checkpoint: str = "best.pt", epoch: int | None = None) -> dict[str, Any]:
    """What an evaluation depends on; a cached evaluation is reused only when all of it matches."""
    key = {"attacks": list(settings.attacks), "eps": config.eps_value, "limit": settings.eval_limit,
           "batch_size": settings.eval_batch_size, "seed": config.seed, "best": best, "dataset": config.dataset}
    if checkpoint != "best.pt":  # best.pt keys stay as before, so older eval.json files are reused
        key.update(checkpoint=checkpoint, epoch=epoch)
    return key


def evaluate_run(settings: CompareSettings, config: TrainConfig, data, log: Callable[[str], None]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(best, evaluation): every route of the run's selected checkpoint (--select: best.pt or last.pt)
    on the test set (eval.json reused when unchanged)."""
    from .evaluate import evaluate, model_from, read_checkpoint

    name = parse_select(settings.select)
    if name.startswith("epoch") and not (config.run_dir / name).is_file():
        raise epoch_not_kept(config.run_dir / name)
    state = read_checkpoint(config.run_dir / name)
    best = state.get("best")
    epoch = None if state.get("epoch") is None else int(state["epoch"]) + 1
    key = eval_key(settings, config, best, name, epoch)
    cache = config.run_dir / EVAL_CACHE
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key:
            log(f"{config.norm}: reusing the evaluation in {cache}")
            return best, saved["result"]
    log(f"{config.norm}: evaluating {config.run_dir / name} ({', '.join(settings.attacks)}, eps {config.eps})")
    result = evaluate(model_from(state), (data.test_x, data.test_y), attacks=list(settings.attacks),
                      eps=config.eps_value, route="both", batch_size=settings.eval_batch_size,
                      limit=settings.eval_limit, device=config.device, seed=config.seed)
    write_output(cache, json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return best, result


# ---------------------------------------------------------------------------------------------
# Statistics over seeds

METRICS = ("clean", "pgd10", "pgd20", "worst_case")

# t_{0.975, df}: the two-sided 95% quantile of Student's t for df = 1..30 (standard tables, 3 decimals).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}


def t_quantile(df: int) -> float:
    """t_{0.975, df} from the table; above 30 degrees of freedom the normal's 1.960 (within 2% of t)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    return T975.get(df, 1.960)


def mean_sd(values: list[float]) -> dict[str, Any]:
    """n, mean and sample standard deviation (n-1; None for one value) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd}


def paired_difference(diffs: list[float]) -> dict[str, Any]:
    """mean, sd and the 95% t interval mean ± t_{0.975, n-1} sd / sqrt(n) of paired differences."""
    stats = mean_sd(diffs)
    if stats["n"] < 2:
        return {**stats, "t": None, "low": None, "high": None, "verdict": "a single seed cannot rank"}
    t = t_quantile(stats["n"] - 1)
    half = t * stats["sd"] / math.sqrt(stats["n"])
    low, high = stats["mean"] - half, stats["mean"] + half
    verdict = "supported" if low > 0 or high < 0 else "no significant difference"
    return {**stats, "t": t, "low": low, "high": high, "verdict": verdict}


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


def run_summary(config: TrainConfig) -> dict[str, Any]:
    """Training facts of one run from its metrics.jsonl: epochs, seconds, final validation figures."""
    from .plots import read_metrics

    metrics = read_metrics(config.run_dir)
    final = metrics[-1] if metrics else {}
    return {"epochs": len(metrics), "train_seconds": sum(m.get("seconds", 0.0) for m in metrics),
            "final_val": {k: v for k, v in final.items() if k.startswith("val_")}, "metrics": metrics}


# ---------------------------------------------------------------------------------------------
# Tables


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

    A bn model has one route (the shared BN, scored as 'adv'); it is labelled 'shared'.
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


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(rows: list[dict[str, Any]], attacks: tuple[str, ...], worst_case: bool = True,
                   norm_titles: dict[str, str] = NORM_TITLES) -> str:
    """A markdown table: norm, route, clean, one column per attack (and the per-example worst case)."""
    columns = ["clean", *attacks] + (["worst_case"] if worst_case else [])
    titles = ["clean", *(attack_title(a) for a in attacks)] + (["worst case"] if worst_case else [])
    lines = ["| norm | route | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(titles)]
    for row in rows:
        cells = [_cell(row.get(c)) for c in columns]
        lines.append(f"| {norm_titles.get(row['norm'], row['norm'])} | {row['route']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table_markdown() -> str:
    """The paper's CIFAR-10 table, labelled as the paper's (for README and results.md)."""
    titles = {**NORM_TITLES, "sabn": "SaAuxBN (SaBN)"}
    table = markdown_table(PAPER_CIFAR10["rows"], ("pgd10", "pgd20"), worst_case=False, norm_titles=titles)
    return f"The paper's figures, not measured here ({PAPER_CIFAR10['source']}):\n\n{table}"


def mean_sd_table(rows: list[dict[str, Any]], attacks: tuple[str, ...]) -> str:
    """The mean table: mean ± sd per cell and each row's n."""
    columns = ["clean", *attacks, "worst_case"]
    titles = ["clean", *(attack_title(a) for a in attacks), "worst case"]
    lines = ["| norm | route | n | " + " | ".join(titles) + " |", "|---|---|---|" + "---|" * len(titles)]
    for row in rows:
        cells = []
        for col in columns:
            mean, sd = row.get(col), row.get("sd", {}).get(col)
            cells.append(_cell(mean) if sd is None or mean is None else f"{mean:.2f} ± {sd:.2f}")
        lines.append(f"| {NORM_TITLES.get(row['norm'], row['norm'])} | {row['route']} | {row['n']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table(rows: list[dict[str, Any]], attacks: tuple[str, ...]) -> str:
    """Every per-seed figure: seed, norm, route, clean, attacks, worst case."""
    columns = ["clean", *attacks, "worst_case"]
    titles = ["clean", *(attack_title(a) for a in attacks), "worst case"]
    lines = ["| seed | norm | route | " + " | ".join(titles) + " |", "|---|---|---|" + "---|" * len(titles)]
    for row in sorted(rows, key=lambda r: r["seed"]):
        lines.append(f"| {row['seed']} | {NORM_TITLES.get(row['norm'], row['norm'])} | {row['route']} | "
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
             "mean ± t(0.975, n-1)·sd/√n):", "",
             "| norm | route | vs | figure | n | mean | sd | 95% interval | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    sentences = []
    for p in paired:
        what = "clean" if p["metric"] == "clean" else ("worst case" if p["metric"] == "worst_case" else attack_title(p["metric"]))
        sd = "-" if p["sd"] is None else f"{p['sd']:.2f}"
        interval = "-" if p["low"] is None else f"[{p['low']:.2f}, {p['high']:.2f}]"
        lines.append(f"| {title(p['norm'])} | {p['route']} | {title(baseline)} {p['baseline_route']} | {what} | "
                     f"{p['n']} | {p['mean']:+.2f} | {sd} | {interval} | {p['verdict']} |")
        head = f"{title(p['norm'])} {p['route']} vs {title(baseline)} {p['baseline_route']}, {what}"
        if p["low"] is None:
            sentences.append(f"- {head}: {p['mean']:+.2f} points on one seed; a single seed cannot rank them.")
        elif p["verdict"] == "supported":
            sentences.append(f"- {head}: {p['mean']:+.2f} points, interval [{p['low']:.2f}, {p['high']:.2f}] excludes 0 "
                             f"(n = {p['n']}): supported.")
        else:
            sentences.append(f"- {head}: {p['mean']:+.2f} points, interval [{p['low']:.2f}, {p['high']:.2f}] contains 0 "
                             f"(n = {p['n']}): no significant difference.")
    return [*lines, "", *sentences, ""]


def settings_lines(settings: CompareSettings, n_train: int, n_val: int, n_eval: int) -> list[str]:
    """The run's settings in plain words, for above the table."""
    c = settings.config
    arch = f"{c.arch}, width {c.width or 'default'}"
    steps_per_epoch = -(-n_train // c.batch_size)
    warm = min(c.warmup_steps, steps_per_epoch)  # the trainer warms up within the first epoch only
    warmup = f"linear warm-up from lr/10 over {warm} steps" if warm else "no warm-up"
    w = settings.clean_weight
    method = f"{', '.join(settings.method_list)} for every norm"
    if w > 0:
        objectives = [settings.norm_config("bn", method=m).objective_name for m in settings.method_list]
        objective = "objective(adv route)" if len(objectives) > 1 else (
            "CE(adv route, x_adv)" if objectives[0] == "pgd" else f"{objectives[0]}(adv route)")
        method += (f" (loss {w:g}*CE(clean route, x) + {1 - w:g}*{objective}; "
                   "the paper's BN baseline uses the same hybrid loss through one shared BN)")
    return [
        f"- dataset: {c.dataset}; {n_train} training examples, {n_val} validation examples "
        f"({'seed ' + str(c.seed) if settings.seeds is None else 'seeds ' + ','.join(map(str, settings.seed_list)) + ', each its own split and run'}), "
        f"test: the first {n_eval} test examples",
        f"- model: {arch}; norms: {', '.join(settings.norms)} (only the norm differs between runs)",
        f"- training: {c.epochs} epochs of {steps_per_epoch} steps, batch {c.batch_size}, SGD lr {c.lr:g} ({c.schedule}, "
        f"milestones {c.milestones}{_milestone_note(c)}, {warmup}), momentum {c.momentum:g}, weight decay {c.weight_decay:g}",
        f"- method{'s' if len(settings.method_list) > 1 else ''}: {method}",
        f"- training attack: Linf PGD-{c.steps}, eps {_eps_text(c)}, step {c.step_size_value:.4g}, "
        f"random start, through the adv route, BN in {c.resolved_attack_bn} mode",
        _select_line(settings),
        f"- evaluation: Linf eps {c.eps_value:.4g}, attacks {', '.join(settings.attacks)}, each route attacked and "
        f"scored through itself in eval mode; 'worst case' = per-example worst over all attacks",
    ]


def _select_line(settings: CompareSettings) -> str:
    c = settings.config
    if settings.select == "best":
        return (f"- checkpoint (--select best): best.pt of each run (best adv-route validation PGD-{c.val_steps} accuracy"
                f"{f' on {c.val_limit} validation examples' if c.val_limit else ''})")
    if settings.select == "last":
        return "- checkpoint (--select last): last.pt of each run (the final epoch)"
    n = select_epoch(settings.select)
    return (f"- checkpoint (--select {settings.select}): epoch{n}.pt of each run (the model after epoch {n} of "
            f"{c.epochs}, a fixed epoch as the reference evaluates 190 of 200)")


def _milestone_note(c: TrainConfig) -> str:
    """' = epochs 50,150' when the milestones are fractions of the epochs."""
    return f" = epochs {','.join(map(str, c.milestone_epochs))}" if "." in str(c.milestones) else ""


def _eps_text(c: TrainConfig) -> str:
    """eps as written, with its value when the text is a fraction (8/255 = 0.03137)."""
    return c.eps if str(c.eps) == f"{c.eps_value:g}" else f"{c.eps} = {c.eps_value:.4g}"


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
    parts += ["", paper_table_markdown(), ""]
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
            picked = (f"best.pt from epoch {best.get('epoch', '?')}" if name == "best.pt"
                      else f"last.pt (epoch {run['epochs']})" if name == "last.pt" else name)
            parts.append(f"- {norm}, seed {seed}: {run['run_dir']}, {run['epochs']} epochs in {run['train_seconds']:.0f} s, "
                         f"{picked}, evaluation {run['eval']['seconds']:.0f} s")
    if len(seeds) > 1:
        parts += ["", "Per seed:", "", seed_table(part["seed_rows"], attacks)]
    return parts


# ---------------------------------------------------------------------------------------------
# The whole comparison


def run_compare(settings: CompareSettings, resume: bool = False, force: bool = False, data=None,
                log: Callable[[str], None] | None = None, command: str | None = None, jobs: int = 1) -> dict[str, Any]:
    """Train, evaluate and report every norm (and method) of ``settings``; return the results written to results.json.

    ``data`` (an ImageData) skips loading the dataset; ``command`` is recorded in results.md (a
    resumed comparison keeps the first command and lists the resuming ones after it). ``jobs`` > 1
    trains the runs in that many processes side by side, each with CPUs/jobs torch threads (unless
    the config sets --threads): on a small CPU model that is faster than one process with every thread.
    """
    log = log or (lambda msg: None)
    settings.validate()
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"jobs must be a whole number >= 1, got {jobs!r}")
    out = settings.out
    check_compare_dir(out, resume, force)
    check_output_dir(out, "--out")
    lock = FolderLock(out, what="compare folder").acquire()  # one writer; each norm's run folder has its own lock
    try:
        check_compare_dir(out, resume, force)  # again, now that no one else can change it
        return _compare_locked(settings, out, resume, force, data, log, command, jobs)
    finally:
        lock.release()


@dataclass
class GridRun:
    """One run of the grid: its method, seed, norm, config and state ('new', 'partial' or 'done')."""

    method: str
    seed: int
    norm: str
    config: TrainConfig
    state: str

    @property
    def label(self) -> str:
        return f"{self.method} {self.norm} seed {self.seed}"


def grid_runs(settings: CompareSettings, force: bool) -> list[GridRun]:
    """Every run, seed by seed (a stopped grid has whole seeds done), then method, then norm."""
    runs = []
    for seed in settings.seed_list:
        for method in settings.method_list:
            for norm in settings.norms:
                config = settings.norm_config(norm, seed, method)
                runs.append(GridRun(method, seed, norm, config, "new" if force else run_state(config)))
    return runs


def check_selectable(settings: CompareSettings, runs: list[GridRun]) -> None:
    """--select epoch:N on finished runs that did not keep epochN.pt is refused before any work."""
    name = parse_select(settings.select)
    for run in runs:
        path = run.config.run_dir / name
        if name.startswith("epoch") and run.state == "done" and not path.is_file():
            raise epoch_not_kept(path)


def epoch_not_kept(path: Path) -> ConfigError:
    """The error for --select epoch:N when a run has no epochN.pt."""
    return ConfigError(f"{path} does not exist: that run was trained without keeping epoch "
                       f"{path.stem[len('epoch'):]}; retrain it (--force) or pick --select best or last")


def train_and_evaluate(settings: CompareSettings, run: GridRun, data, log: Callable[[str], None]):
    """(best, evaluation) of one run: train it (unless done), then evaluate the selected checkpoint."""
    train_norm(run.config, run.state, data, log)
    return evaluate_run(settings, run.config, data, log)


def run_grid(settings: CompareSettings, runs: list[GridRun], data, log: Callable[[str], None], jobs: int) -> list:
    """(best, evaluation) per run, in order: one after another, or in ``jobs`` processes side by side."""
    if jobs == 1 or len(runs) == 1:
        return [train_and_evaluate(settings, run, data, log) for run in runs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = settings.config.threads or max(1, available_cpus() // jobs)
    log(f"{len(runs)} runs in {min(jobs, len(runs))} processes side by side, {threads} torch thread(s) each")
    runs = [dataclasses.replace(r, config=dataclasses.replace(r.config, threads=threads, quiet=True)) for r in runs]
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(runs)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(threads, data))
    try:
        futures = [pool.submit(_worker_run, settings, run) for run in runs]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def config_data(c: TrainConfig):
    """The dataset a config trains on (the grid's runs share it)."""
    from .data import load_dataset

    return load_dataset(c.dataset, c.data_dir, image_size=c.image_size, mode=c.data_mode, workers=c.workers)


_WORKER_DATA: dict[str, Any] = {}


def _start_worker(threads: int, data) -> None:
    """A grid worker process: its torch threads, and the data when the caller passed it in."""
    import torch

    torch.set_num_threads(threads)
    if data is not None:
        _WORKER_DATA["data"] = data


def _worker_run(settings: CompareSettings, run: GridRun):
    """One run in a worker process; its messages go to stderr, prefixed with the run."""
    import sys

    if "data" not in _WORKER_DATA:
        c = run.config
        _WORKER_DATA["data"] = config_data(c)
    log = lambda msg: print(f"[{run.label}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    return train_and_evaluate(settings, run, _WORKER_DATA["data"], log)


def method_results(settings: CompareSettings, runs: list[GridRun], outcomes: list, method: str) -> dict[str, Any]:
    """One method's part of the results: per-seed runs, mean rows and paired differences."""
    per_norm: dict[str, dict[str, dict[str, Any]]] = {norm: {} for norm in settings.norms}
    for run, (best, evaluation) in zip(runs, outcomes):
        if run.method == method:
            per_norm[run.norm][str(run.seed)] = {"run_dir": str(run.config.run_dir), **run_summary(run.config),
                                                 "best": best, "eval": evaluation}
    rows, paired = seed_statistics(per_norm, settings.attacks, settings.baseline_norm)
    return {"rows": rows, "seed_rows": seed_rows(per_norm, settings.attacks), "paired": paired, "runs": per_norm}


def _compare_locked(settings: CompareSettings, out: Path, resume: bool, force: bool, data,
                    log: Callable[[str], None], command: str | None, jobs: int = 1) -> dict[str, Any]:
    from .data import split_train_val

    c = settings.config
    if data is None and jobs == 1:  # with jobs > 1 each worker loads its own
        data = config_data(c)
    runs = grid_runs(settings, force)
    check_selectable(settings, runs)  # before anything in the folder changes
    history = _command_history(out, resume, command)
    out.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    for stale in out.glob("curves-*.png"):
        stale.unlink(missing_ok=True)
    write_output(out / SETTINGS_FILE, json.dumps({**settings.to_dict(), **history}, indent=2) + "\n")
    start = time.perf_counter()
    outcomes = run_grid(settings, runs, data, log, jobs)
    by_method = {m: method_results(settings, runs, outcomes, m) for m in settings.method_list}
    if data is None:
        data = config_data(c)
    (train_x, _), val = split_train_val(data, c.val_split, settings.seed_list[0], c.limit, c.val_limit)
    first = by_method[settings.method_list[0]]
    results = {
        **history,
        "settings": settings.to_dict(),
        "method": settings.method_list[0] if settings.methods is None else None,
        "methods": settings.method_list,
        "seeds": settings.seed_list,
        "select": settings.select,
        "baseline": settings.baseline_norm,
        "n_train": len(train_x),
        "n_val": 0 if val is None else len(val[1]),
        "n_eval": next(iter(first["runs"].values()))[str(settings.seed_list[0])]["eval"]["n"],
        **({"rows": first["rows"], "seed_rows": first["seed_rows"], "paired": first["paired"], "runs": first["runs"]}
           if settings.methods is None else {"by_method": by_method}),
        "paper_cifar10": PAPER_CIFAR10,
        "seconds": time.perf_counter() - start,
        "jobs": jobs,
    }
    write_output(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_output(out / "results.md", results_markdown(results))
    for method, part in by_method.items():
        name = "curves.png" if settings.methods is None else f"curves-{method}.png"
        write_curves(settings, part["runs"], out / name, method if settings.methods is not None else None)
    return results


def write_curves(settings: CompareSettings, runs: dict[str, dict[str, dict[str, Any]]], path: Path,
                 method: str | None) -> None:
    """curves.png: validation accuracy per epoch per norm (mean and min-max band over seeds)."""
    from .plots import CurveRun, plot_learning_curves

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


def _command_history(out: Path, resume: bool, command: str | None) -> dict[str, Any]:
    """The first command of a comparison and, when resumed, every resuming command after it."""
    if not resume:
        return {"command": command, "resumed_with": []}
    saved = load_settings(out)
    resumed = [*saved.get("resumed_with", []), *([command] if command else [])]
    return {"command": saved.get("command"), "resumed_with": resumed}
