"""Comparisons across ``robust compare`` folders: each folder a recipe variant, trained with the same
seeds; every row paired seed by seed against the first folder.

``python -m robust.compare.across BASE OTHER... [--norm sabn] [--route adv]`` prints a markdown
table: per folder the seeds, the mean training time, the route's clean and attack accuracies
(mean ± sd) and their paired differences against BASE with 95% t intervals. The figures are the
folders' own ``results.json``; nothing is trained or evaluated here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from robust.errors import ConfigError
from robust.stats import mean_sd, paired_difference


def read_results(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a finished comparison's results ({type(exc).__name__}); run robust compare "
                          "there first") from None


def per_seed(results: dict[str, Any], norm: str, route: str) -> dict[int, dict[str, float]]:
    """seed -> the route's figures and the run's training seconds."""
    out = {}
    for row in results["seed_rows"]:
        if row["norm"] == norm and row["route"] == route:
            run = results["runs"][norm][str(row["seed"])]
            out[int(row["seed"])] = {**{k: v for k, v in row.items() if isinstance(v, (int, float))},
                                     "train_seconds": run["train_seconds"]}
    if not out:
        raise ConfigError(f"the comparison has no {norm} {route}-route rows; pass --norm/--route it has")
    return out


def _interval(diffs: list[float]) -> str:
    d = paired_difference(diffs)
    if d["low"] is None:
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def across_table(folders: list[str], norm: str = "sabn", route: str = "adv", attack: str = "pgd20") -> str:
    """The markdown table described in the module docstring."""
    rows = [(folder, per_seed(read_results(folder), norm, route)) for folder in folders]
    base = rows[0][1]
    head = (f"| run | seeds | train s | clean | {attack} | Δ clean vs {Path(folders[0]).name} (95% CI) | "
            f"Δ {attack} (95% CI) |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for folder, seeds in rows:
        common = sorted(set(seeds) & set(base))
        clean, robust = (mean_sd([seeds[s][k] for s in seeds]) for k in ("clean", attack))
        seconds = mean_sd([seeds[s]["train_seconds"] for s in seeds])["mean"]
        paired = [_interval([seeds[s][k] - base[s][k] for s in common]) for k in ("clean", attack)]
        if folder == folders[0]:
            paired = ["(baseline)", "(baseline)"]
        sd = lambda st: f" ± {st['sd']:.2f}" if st["sd"] is not None else ""  # noqa: E731
        lines.append(f"| {Path(folder).name} | {','.join(map(str, sorted(seeds)))} | {seconds:.0f} | "
                     f"{clean['mean']:.2f}{sd(clean)} | {robust['mean']:.2f}{sd(robust)} | {paired[0]} | {paired[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robust.compare.across", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="robust compare output folders; the first is the baseline")
    parser.add_argument("--norm", default="sabn")
    parser.add_argument("--route", default="adv")
    parser.add_argument("--attack", default="pgd20")
    args = parser.parse_args(argv)
    try:
        print(across_table(args.folders, args.norm, args.route, args.attack))
    except (ConfigError, KeyError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
