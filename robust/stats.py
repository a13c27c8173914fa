"""Statistics over seeds: mean and sample standard deviation, paired differences with 95% t intervals."""

from __future__ import annotations

import math
from typing import Any

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


def uninformative(p: dict[str, Any]) -> bool:
    """True for an interval from 2 values that contains 0: t_{0.975, 1} = 12.7 makes it span most of the scale,
    so it is flagged rather than printed as figures (one that excludes 0 still says something)."""
    return p.get("n") == 2 and p.get("low") is not None and p["low"] <= 0 <= p["high"]


UNINFORMATIVE = "uninformative: 2 seeds (t = 12.7); run 3 or more"
