"""Comparisons across compare folders: the paired differences and intervals equal a hand computation."""

from __future__ import annotations

import json
import math

from robust.compare.across import across_table, main


def _folder(path, figures):
    path.mkdir()
    rows = [{"seed": s, "norm": "sabn", "route": "adv", "clean": c, "pgd20": r} for s, (c, r) in figures.items()]
    runs = {"sabn": {str(s): {"train_seconds": 100.0 + s} for s in figures}}
    (path / "results.json").write_text(json.dumps({"seed_rows": rows, "runs": runs}))
    return str(path)


def test_rows_are_paired_seed_by_seed_against_the_first_folder(tmp_path, capsys):
    base = _folder(tmp_path / "plain", {0: (70.0, 50.0), 1: (71.0, 52.0), 2: (72.0, 51.0)})
    other = _folder(tmp_path / "ema", {0: (71.0, 51.0), 1: (71.5, 54.0), 2: (73.5, 52.0)})
    table = across_table([base, other])
    diffs = [1.0, 2.0, 1.0]  # pgd20, seed by seed
    mean, sd = 4 / 3, math.sqrt(sum((d - 4 / 3) ** 2 for d in diffs) / 2)
    half = 4.303 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert "| ema | 0,1,2 | 101 | 72.00 ± 1.32 | 52.33 ± 1.53 | +1.00 [" in table
    assert f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] |" in table
    assert "| plain | 0,1,2 | 101 | 71.00 ± 1.00 | 51.00 ± 1.00 | (baseline) | (baseline) |" in table
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a finished comparison" in capsys.readouterr().err
