"""`robust compare`, `robust plot`, `robust analyze` on a tiny budget and synthetic Fashion-MNIST files."""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_refused

from robust.cli.compare import resolve_compare_settings
from robust.cli.main import cli
from robust.config import TrainConfig
from robust.analysis.gradients import gradient_analysis, norm_layers, spread_by_norm
from robust.compare.tables import (
    attack_title, mean_metrics, paper_comparable, paper_table_markdown, seed_statistics, settings_lines,
)
from robust.compare.settings import CompareSettings
from robust.compare.reference import PAPER_CIFAR10
from robust.stats import UNINFORMATIVE, mean_sd, paired_difference, t_quantile, uninformative
from robust.nn.factory import build_model
from robust.train.schedule import lr_at

ROWS_PER_NORM = {"bn": 1, "auxbn": 2, "sabn": 2}


def write_idx(path: Path, array: torch.Tensor) -> None:
    """An IDX file of unsigned bytes (the MNIST format), gzipped."""
    header = bytes([0, 0, 8, array.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.to(torch.uint8).numpy().tobytes())


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 images whose class is the position of a bright 4x4 patch, on noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randint(0, 60, (n, 16, 16), generator=g)
    for i, label in enumerate(y.tolist()):
        r, c = (label // 4) * 4, (label % 4) * 4
        x[i, r:r + 4, c:c + 4] = 230
    return x, y


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fmnist")
    for split, n, seed in (("train", 320, 0), ("t10k", 96, 1)):
        x, y = synthetic_images(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", y)
    return folder


def tiny_args(data_dir: Path, out: Path) -> list[str]:
    return ["compare", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--eps", "0.1", "--width", "4",
            "--limit", "128", "--epochs", "1", "--steps", "1", "--batch-size", "64", "--val-limit", "16",
            "--val-steps", "2", "--warmup-steps", "0", "--eval-limit", "32", "--device", "cpu",
            "--precision", "fp32", "--threads", "1", "--no-channels-last", "--quiet", "--out", str(out)]


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("cmp") / "run"
    result = invoke(tiny_args(data_dir, out))
    assert result.exit_code == 0, result.output
    return out


def measured_table(markdown: str) -> list[list[str]]:
    """The cells of the first markdown table (the measured one) without header rows."""
    block = markdown.split("Test accuracy")[1].split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_compare_writes_results_md_json_and_curves(compared):
    results = json.loads((compared / "results.json").read_text())
    assert set(results["runs"]) == {"bn", "auxbn", "sabn"}
    assert results["method"] == "hybrid" and results["settings"]["attacks"] == ["pgd10", "pgd20"]
    # validation is 10% of the 128 limited examples (13), the rest trains
    assert results["n_train"] == 115 and results["n_val"] == 13 and results["n_eval"] == 32
    assert results["paper_cifar10"] == PAPER_CIFAR10
    assert results["seeds"] == [0] and results["select"] == "best" and results["baseline"] == "bn"
    for norm, per_seed in results["runs"].items():
        assert list(per_seed) == ["0"]  # without --seeds: one seed, runs in <out>/<norm>/
        run = per_seed["0"]
        assert run["epochs"] == 1 and (compared / norm / "best.pt").is_file()
        assert set(run["eval"]["routes"]) == ({"adv"} if norm == "bn" else {"clean", "adv"})
        cfg = json.loads((compared / norm / "config.json").read_text())
        assert (cfg["norm"], cfg["method"], cfg["seed"], cfg["limit"]) == (norm, "hybrid", 0, 128)
    for row in results["rows"]:
        assert 0 <= row["worst_case"] <= row["pgd20"] <= row["clean"] <= 100
        assert row["worst_case"] <= row["pgd10"] <= row["clean"]
    cells = measured_table((compared / "results.md").read_text())
    assert len(cells) == sum(ROWS_PER_NORM.values()) == len(results["rows"])
    for norm, title in (("bn", "BN"), ("auxbn", "AuxBN"), ("sabn", "SaBN")):
        assert sum(c[0] == title for c in cells) == ROWS_PER_NORM[norm]
    assert [c[1] for c in cells if c[0] == "BN"] == ["adv"]  # results.json labels it "shared"
    for line, row in zip(cells, results["rows"]):
        assert line[2:] == [f"{row[k]:.2f}" for k in ("clean", "pgd10", "pgd20", "worst_case")]
    text = (compared / "results.md").read_text()
    assert "| norm | route | natural | PGD-10 | PGD-20 | worst case |" in text
    assert "hybrid for every norm" in text and "robust compare" in text
    assert "84.84" not in text and "not shown: this grid is fashion-mnist at eps 0.1" in text  # not the paper's setting
    assert "- training attack: Linf PGD-1 on CE, uniform random start, eps 0.1, step 0.025, through the adv route, BN in train mode" in text
    # one seed: the differences against bn are listed, but nothing is ranked
    assert {(p["norm"], p["n"], p["sd"], p["low"]) for p in results["paired"]} == {("auxbn", 1, None, None), ("sabn", 1, None, None)}
    assert text.count("a single seed cannot rank them.") == len(results["paired"]) == 16  # 2 norms x 2 routes x 4 figures
    assert (compared / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_an_existing_folder_and_resume_keeps_finished_runs(compared, data_dir):
    before = (compared / "results.json").read_text()
    refused = invoke(tiny_args(data_dir, compared))
    assert refused.exit_code == 2 and "--resume" in refused.output and len(refused.output.strip().splitlines()) == 1
    assert (compared / "results.json").read_text() == before
    stamps = {n: (compared / n / "last.pt").stat().st_mtime_ns for n in ROWS_PER_NORM}
    resumed = invoke(["compare", "--out", str(compared), "--resume", "--data-dir", str(data_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("not training it again") == 3 and resumed.output.count("reusing the evaluation") == 3
    assert {n: (compared / n / "last.pt").stat().st_mtime_ns for n in ROWS_PER_NORM} == stamps
    after = json.loads((compared / "results.json").read_text())
    assert after["rows"] == json.loads(before)["rows"] and after["command"] == json.loads(before)["command"]
    assert after["resumed_with"][-1].endswith("--resume") and "Resumed with:" in (compared / "results.md").read_text()


def test_resume_continues_a_partial_run(tmp_path, data_dir):
    out = tmp_path / "cmp"
    assert invoke(tiny_args(data_dir, out) + ["--norms", "sabn", "--eval-limit", "16"]).exit_code == 0
    resumed = invoke(["compare", "--out", str(out), "--resume", "--epochs", "2", "--data-dir", str(data_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed" in resumed.output and "reusing the evaluation" not in resumed.output
    metrics = [json.loads(l) for l in (out / "sabn" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    results = json.loads((out / "results.json").read_text())
    assert results["runs"]["sabn"]["0"]["epochs"] == 2 and results["n_eval"] == 16


@pytest.mark.parametrize("extra, message", [
    (["--norms", "bn,groupnorm"], "unknown norm 'groupnorm'"),
    (["--attacks", "pgd0"], "pgd0"),
    (["--norm", "bn"], "drop --norm"),
])
def test_compare_bad_input_is_one_line_and_writes_nothing(tmp_path, data_dir, extra, message):
    assert_refused(tmp_path, tiny_args(data_dir, tmp_path / "never") + extra, message)
    assert not (tmp_path / "never").exists()


def test_plot_draws_runs_from_metrics(compared, tmp_path):
    png = tmp_path / "curves.png"
    result = invoke(["plot", str(compared / "bn"), str(compared / "sabn"), "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    missing = invoke(["plot", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.png")])
    assert missing.exit_code == 2 and "metrics.jsonl" in missing.output and not (tmp_path / "x.png").exists()


def random_batches(n: int = 2, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(size, 1, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("norm", ["bn", "auxbn", "sabn"])
def test_gradient_analysis_reports_every_norm_layer(norm):
    torch.manual_seed(0)
    model = build_model(norm=norm, in_channels=1, width=4)
    stats_before = {k: v.clone() for k, v in model.state_dict().items()}
    result = gradient_analysis(model, random_batches(), eps=0.1, steps=2)
    assert [r["layer"] for r in result["layers"]] == [name for name, _ in norm_layers(model)]
    assert len(result["layers"]) == 16  # PreAct ResNet-18: 2 per block x 8 blocks (the reference has no final norm)
    for row in result["layers"]:
        assert -1.0 <= row["cosine"] <= 1.0
        shared = [row["shared_clean"], row["shared_adv"]]
        routes = [row["route_clean"], row["route_adv"]]
        if norm == "bn":  # the shared layer only
            assert all(v is not None and math.isfinite(v) and v > 0 for v in shared) and routes == [None, None]
        elif norm == "auxbn":  # no shared affine: cosine between the two routes' affine gradients
            assert shared == [None, None] and row["cosine"] == row["route_cosine"]
            assert all(math.isfinite(v) and v > 0 for v in routes)
        else:
            assert all(math.isfinite(v) and v > 0 for v in shared + routes)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats_before.items())  # model untouched


@pytest.mark.parametrize("norm", ["bn", "auxbn", "sabn"])
def test_gradient_analysis_reads_the_layer_norms_of_a_convnext(norm):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model("timm:convnext_atto", norm, 10, 1, image_size=32)
    own = [n for n, m in timm.create_model("convnext_atto", num_classes=10, in_chans=1).named_modules()
           if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 1, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))]
    result = gradient_analysis(model, batches, eps=0.1, steps=1)
    assert result["norm"] == norm
    assert [r["layer"].split("net.", 1)[-1] for r in result["layers"]] == own  # every norm of the model, once
    for row in result["layers"]:
        shared = [row["shared_clean"], row["shared_adv"]]
        routes = [row["route_clean"], row["route_adv"]]
        assert all(v is None or (math.isfinite(v) and v >= 0) for v in shared + routes)
        assert (shared == [None, None]) == (norm == "auxbn") and (routes == [None, None]) == (norm == "bn")


@pytest.mark.parametrize("norm", ["bn", "auxbn"])
@pytest.mark.precision
def test_gradient_analysis_at_eps_zero_compares_a_loss_with_itself(norm):
    # eps = 0: x_adv = x, and both routes start identical (bn shares one layer; auxbn's BNs are
    # initialised alike), so the clean and adversarial gradients coincide: cosine 1, equal norms.
    torch.manual_seed(0)
    result = gradient_analysis(build_model(norm=norm, in_channels=1, width=4), random_batches(1), eps=0.0, steps=1)
    part = "shared" if norm == "bn" else "route"
    for row in result["layers"]:
        assert row["cosine"] == pytest.approx(1.0, abs=1e-9)
        assert row[f"{part}_adv"] == pytest.approx(row[f"{part}_clean"], rel=1e-9)
    assert result["summary"][f"{part}_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("norm", ["bn", "sabn"])
def test_analyze_cli_on_a_compared_checkpoint(compared, data_dir, tmp_path, norm):
    out = tmp_path / "analysis"
    result = invoke(["analyze", str(compared / norm / "best.pt"), "--batches", "2", "--batch-size", "32",
                     "--data-dir", str(data_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["norm"] == norm and saved["settings"]["batches"] == 2 and saved["settings"]["eps"] == pytest.approx(0.1)
    assert len(saved["layers"]) == 16 and all(-1 <= r["cosine"] <= 1 for r in saved["layers"])
    assert (out / "gradients.png").read_bytes()[:4] == b"\x89PNG"
    assert re.search(r"^blocks\.0\.bn1\s", result.output, re.M) and "cosine of the shared affine" in result.output


def test_analyze_several_checkpoints_gives_each_norms_spread(compared, data_dir, tmp_path):
    out = tmp_path / "several"
    args = ["--batches", "1", "--batch-size", "32", "--data-dir", str(data_dir)]
    twice = invoke(["analyze", str(compared / "sabn"), str(compared / "sabn" / "best.pt"), *args, "--out", str(out)])
    assert twice.exit_code == 2 and "are the same checkpoint" in twice.output and not out.exists()
    copy = tmp_path / "sabn-copy.pt"  # the same weights in another file: a second checkpoint, counted as one
    shutil.copyfile(compared / "sabn" / "best.pt", copy)
    result = invoke(["analyze", str(compared / "bn"), str(compared / "sabn"), str(copy), *args,
                     "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "analysis.json").read_text())
    assert [r["norm"] for r in saved["runs"]] == ["bn", "sabn", "sabn"] and not (out / "gradients.png").exists()
    sabn = saved["by_norm"]["sabn"]
    assert sabn["n"] == 2 and sabn["figures"]["cosine"]["sd"] == 0.0  # the same weights twice
    assert sabn["figures"]["cosine"]["mean"] == pytest.approx(saved["runs"][1]["summary"]["cosine"])
    assert saved["by_norm"]["bn"]["figures"]["route_ratio"] is None  # bn has no per-route affine
    assert "sabn (n = 2; cosine of the shared affine (clean vs adv loss))" in result.output
    refused = invoke(["analyze", str(compared / "bn"), str(compared / "sabn"), *args, "-o", str(tmp_path / "g.png")])
    assert refused.exit_code == 2 and "-o draws one checkpoint" in refused.output


def test_spread_by_norm_equals_a_hand_computation():

    def result(norm, cosine, ratio):
        return {"norm": norm, "cosine_of": "shared affine", "summary": {"cosine": cosine, "shared_ratio": ratio}}

    spread = spread_by_norm([result("sabn", 0.5, 1.0), result("sabn", 0.7, 1.4), result("bn", 0.2, 2.0)])
    cosine = spread["sabn"]["figures"]["cosine"]
    assert cosine["n"] == 2 and cosine["mean"] == pytest.approx(0.6) and cosine["sd"] == pytest.approx(math.sqrt(0.02))
    assert spread["sabn"]["figures"]["shared_ratio"]["mean"] == pytest.approx(1.2)
    assert spread["bn"]["figures"]["cosine"] == {"n": 1, "mean": 0.2, "sd": None}
    assert spread["bn"]["figures"]["route_cosine"] is None


def test_paper_table_is_labelled_and_attack_titles_follow_the_paper():
    table = paper_table_markdown()
    assert table.startswith("The paper's figures, not measured here")
    assert "| SaAuxBN (SaBN) | adv | 84.08 | 44.93 | 43.14 |" in table and "| AuxBN | clean | 94.47 | - | - |" in table
    assert [attack_title(a) for a in ("pgd10", "pgd20", "autoattack", "apgd-ce")] == ["PGD-10", "PGD-20", "AutoAttack", "APGD-CE"]


# ---------------------------------------------------------------------------------------------
# Several seeds: --seeds, the statistics over seeds, --select, resuming a partial grid


@pytest.fixture(scope="module")
def grid(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("grid") / "run"
    result = invoke(tiny_args(data_dir, out) + ["--norms", "bn,sabn", "--seeds", "0,1", "--eval-limit", "16"])
    assert result.exit_code == 0, result.output
    return out


def test_seed_grid_writes_every_run_and_per_seed_figures(grid):
    results = json.loads((grid / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["baseline"] == "bn" and results["settings"]["seeds"] == [0, 1]
    for norm in ("bn", "sabn"):
        assert sorted(results["runs"][norm]) == ["0", "1"]
        for seed in (0, 1):
            cfg = json.loads((grid / norm / f"seed{seed}" / "config.json").read_text())
            assert (cfg["norm"], cfg["seed"], cfg["out"]) == (norm, seed, str(grid / norm / f"seed{seed}"))
            assert (grid / norm / f"seed{seed}" / "best.pt").is_file()
    # bn: one row (shared) per seed; sabn: adv and clean per seed
    assert sorted((r["seed"], r["norm"], r["route"]) for r in results["seed_rows"]) == [
        (0, "bn", "shared"), (0, "sabn", "adv"), (0, "sabn", "clean"),
        (1, "bn", "shared"), (1, "sabn", "adv"), (1, "sabn", "clean")]
    for row in results["seed_rows"]:
        run = results["runs"][row["norm"]][str(row["seed"])]
        route = "adv" if row["route"] == "shared" else row["route"]
        assert row["pgd20"] == run["eval"]["routes"][route]["pgd20"]
    text = (grid / "results.md").read_text()
    assert "mean ± sample standard deviation over n = 2 seeds (0, 1" in text and "| norm | route | n |" in text
    assert "Per seed:" in text and "--select best" in text and (grid / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_seed_statistics_equal_a_hand_computation(grid):
    results = json.loads((grid / "results.json").read_text())
    figures = {(r["norm"], r["route"], r["seed"]): r for r in results["seed_rows"]}
    rows = {(r["norm"], r["route"]): r for r in results["rows"]}
    for (norm, route), row in rows.items():
        assert row["n"] == 2
        for m in ("clean", "pgd10", "pgd20", "worst_case"):
            a, b = figures[(norm, route, 0)][m], figures[(norm, route, 1)][m]
            assert row[m] == pytest.approx((a + b) / 2)
            assert row["sd"][m] == pytest.approx(abs(a - b) / math.sqrt(2))  # n-1 = 1: sqrt(((a-b)/2)^2 * 2)
    paired = {(p["route"], p["metric"]): p for p in results["paired"]}
    assert {p["norm"] for p in results["paired"]} == {"sabn"} and len(paired) == 8  # 2 routes x 4 figures
    for (route, m), p in paired.items():
        assert (p["baseline"], p["baseline_route"]) == ("bn", "shared")
        d0 = figures[("sabn", route, 0)][m] - figures[("bn", "shared", 0)][m]
        d1 = figures[("sabn", route, 1)][m] - figures[("bn", "shared", 1)][m]
        mean, sd = (d0 + d1) / 2, abs(d0 - d1) / math.sqrt(2)
        assert p["diffs"] == {"0": pytest.approx(d0), "1": pytest.approx(d1)}
        assert (p["n"], p["mean"], p["sd"], p["t"]) == (2, pytest.approx(mean), pytest.approx(sd), 12.706)
        assert p["low"] == pytest.approx(mean - 12.706 * sd / math.sqrt(2))
        assert p["high"] == pytest.approx(mean + 12.706 * sd / math.sqrt(2))
        assert p["verdict"] == ("supported" if p["low"] > 0 or p["high"] < 0 else "no significant difference")
    text = (grid / "results.md").read_text()
    assert "Paired difference against BN" in text
    flagged = sum(uninformative(p) for p in results["paired"])  # 2 seeds, the interval containing 0
    assert text.count(": supported.") + text.count(": no significant difference.") == 8 - flagged
    assert text.count("2 seeds give no informative interval, so no verdict") == flagged
    assert text.count(UNINFORMATIVE) == flagged  # in the table, instead of the interval's figures
    assert "| verdict |" not in text  # each verdict once: in its sentence


def test_paired_difference_and_t_table():

    assert mean_sd([1.0, 2.0, 6.0]) == {"n": 3, "mean": 3.0, "sd": pytest.approx(math.sqrt(7))}  # (4+1+9)/2
    p = paired_difference([1.0, 2.0, 6.0])
    assert p["t"] == 4.303 and p["low"] == pytest.approx(3 - 4.303 * math.sqrt(7) / math.sqrt(3))
    assert p["verdict"] == "no significant difference"  # 3 - 6.57 < 0
    assert paired_difference([2.0, 2.2, 1.8])["verdict"] == "supported"  # 2 ± 4.303 * 0.2 / sqrt(3)
    assert paired_difference([-2.0, -2.2, -1.8])["verdict"] == "supported"
    single = paired_difference([1.5])
    assert (single["sd"], single["low"], single["verdict"]) == (None, None, "a single seed cannot rank")
    assert (t_quantile(1), t_quantile(9), t_quantile(30), t_quantile(100)) == (12.706, 2.262, 2.042, 1.960)


def test_extending_the_seeds_trains_only_the_new_seed(grid, data_dir, tmp_path):
    out = tmp_path / "grid"
    import shutil
    shutil.copytree(grid, out)
    for path in out.rglob("*"):  # the copied runs name the original folder; point them at the copy
        if path.name in ("config.json", "compare.json"):
            path.write_text(path.read_text().replace(str(grid), str(out)))
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/last.pt")}
    shutil.rmtree(out / "sabn" / "seed1")  # a partial grid: one run missing
    resumed = invoke(["compare", "--out", str(out), "--resume", "--seeds", "0,1,2", "--data-dir", str(data_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("not training it again") == 3  # bn seeds 0, 1 and sabn seed 0
    kept = {p: s for p, s in stamps.items() if "sabn/seed1" not in str(p)}
    assert len(kept) == 3 and {p: p.stat().st_mtime_ns for p in kept} == kept
    assert all((out / n / f"seed{k}" / "best.pt").is_file() for n in ("bn", "sabn") for k in (0, 1, 2))
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1, 2] and all(sorted(r) == ["0", "1", "2"] for r in results["runs"].values())
    assert all(r["n"] == 3 for r in results["rows"]) and all(p["t"] == 4.303 for p in results["paired"])


def test_select_last_evaluates_last_pt(tmp_path, data_dir):
    out = tmp_path / "last"
    result = invoke(tiny_args(data_dir, out) + ["--norms", "bn", "--eval-limit", "16", "--select", "last"])
    assert result.exit_code == 0, result.output
    assert "evaluating " + str(out / "bn" / "last.pt") in result.output
    results = json.loads((out / "results.json").read_text())
    assert results["select"] == "last" and results["paired"] == []
    assert "--select last" in (out / "results.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--seeds", ""], "--seeds is empty"),
    (["--seeds", "-1"], "seeds must be >= 0"),
    (["--seeds", "0,x"], "seeds '0,x' must be comma-separated"),
    (["--seeds", "1,1"], "repeat a seed"),
    (["--select", "epoch:x"], "epoch:N needs a whole epoch number"),
    (["--select", "epoch:3"], "the runs train 1 epochs; pick an epoch in 1..1"),
    (["--select", "worst"], "must be best, last or epoch:N"),
    (["--methods", "pgd,bogus"], "unknown method 'bogus' in methods"),
    (["--methods", "pgd,pgd"], "repeat a name"),
    (["--methods", "pgd,trades", "--method", "pgd"], "not both"),
    (["--methods", ","], "methods is empty"),
    (["--baseline", "auxbn", "--norms", "bn,sabn"], "baseline 'auxbn' is not one of the norms"),
])
def test_seed_and_select_bad_input_is_one_line_and_writes_nothing(tmp_path, data_dir, extra, message):
    assert_refused(tmp_path, tiny_args(data_dir, tmp_path / "never") + extra, message, one_line=True)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("milestones, epochs, expected", [
    ("0.25,0.75", 200, [50, 150]),  # the reference's 50/150 of 200
    ("0.25,0.75", 6, [2, 5]),  # 1.5 -> 2 and 4.5 -> 5: rounded half up
    ("0.5", 3, [2]),
    ("50,150", 200, [50, 150]),  # integers stay epochs
    ("2", 3, [2]),
])
def test_fractional_milestones_resolve_to_epochs(milestones, epochs, expected):

    c = TrainConfig(milestones=milestones, epochs=epochs).validate()
    assert c.milestone_epochs == expected
    steps = 10  # per epoch: the lr drops by 10x at the first step of each milestone epoch
    assert lr_at(expected[0] * steps - 1, c, steps) == pytest.approx(0.1)
    assert lr_at(expected[0] * steps, c, steps) == pytest.approx(0.01)


@pytest.mark.parametrize("milestones, message", [
    ("0.5,2", "a fraction of the epochs must be > 0 and < 1, got 2"),
    ("0.75,0.25", "must be ascending"),
    ("0.0,0.5", "got 0"),
    ("0.5,x", "fractions of the epochs"),
])
def test_bad_fractional_milestones_are_one_line_errors(tmp_path, data_dir, milestones, message):
    assert_refused(tmp_path, tiny_args(data_dir, tmp_path / "never") + ["--milestones", milestones], message,
                   one_line=True)
    assert not (tmp_path / "never").exists()


def test_compare_states_fractional_milestones_as_epochs(tmp_path, data_dir):
    out = tmp_path / "frac"
    result = invoke(tiny_args(data_dir, out) + ["--norms", "bn", "--eval-limit", "16", "--epochs", "2",
                                                 "--milestones", "0.5"])
    assert result.exit_code == 0, result.output
    assert "milestones 0.5 = epochs 1," in (out / "results.md").read_text()
    lrs = [json.loads(l)["lr"] for l in (out / "bn" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.01)


def test_mean_curve_over_seeds_and_its_band():

    seed0 = [{"epoch": 1, "val_adv_clean": 10.0, "val_adv_robust": 4.0}, {"epoch": 2, "val_adv_clean": 20.0, "val_adv_robust": 6.0}]
    seed1 = [{"epoch": 1, "val_adv_clean": 30.0, "val_adv_robust": 2.0}]  # stopped after epoch 1
    curve, band = mean_metrics([seed0, seed1])
    assert curve == [{"epoch": 1, "val_adv_clean": 20.0, "val_adv_robust": 3.0}]
    assert band == {"val_adv_clean": {1: (10.0, 30.0)}, "val_adv_robust": {1: (2.0, 4.0)}}
    assert mean_metrics([seed0]) == (seed0, None)


def test_seed_statistics_pair_routes_with_the_baselines_routes():

    def run(adv, clean=None):
        routes = {"adv": {"clean": adv, "pgd10": adv - 10, "pgd20": adv - 11, "worst_case": adv - 12}}
        if clean is not None:
            routes["clean"] = {"clean": clean, "pgd10": 1.0, "pgd20": 0.5, "worst_case": 0.0}
        return {"eval": {"routes": routes}}

    runs = {"bn": {"0": run(50.0), "1": run(54.0)}, "sabn": {"0": run(60.0, 70.0), "1": run(61.0, 72.0)}}
    rows, paired = seed_statistics(runs, ("pgd10", "pgd20"), baseline="sabn")
    bn = next(r for r in rows if r["norm"] == "bn")
    assert (bn["route"], bn["n"], bn["clean"], bn["sd"]["clean"]) == ("shared", 2, 52.0, pytest.approx(math.sqrt(8)))
    assert [(p["norm"], p["route"], p["baseline_route"]) for p in paired] == [("bn", "shared", "adv")] * 4
    clean = next(p for p in paired if p["metric"] == "clean")  # bn - sabn adv: -10 and -7
    assert clean["diffs"] == {"0": -10.0, "1": -7.0} and clean["mean"] == -8.5
    assert clean["sd"] == pytest.approx(1.5 * math.sqrt(2))  # ((1.5^2 + 1.5^2) / 1) ** 0.5
    # sd / sqrt(2) = 1.5: the interval -8.5 ± 12.706 * 1.5 = [-27.56, 10.56] contains 0
    assert (clean["low"], clean["high"]) == (pytest.approx(-8.5 - 19.059), pytest.approx(-8.5 + 19.059))
    assert clean["verdict"] == "no significant difference"
    rows, paired = seed_statistics(runs, ("pgd10", "pgd20"), baseline="bn")
    assert [(p["norm"], p["route"], p["baseline_route"]) for p in paired] == [("sabn", "adv", "shared")] * 4 + [("sabn", "clean", "shared")] * 4
    adv = next(p for p in paired if p["metric"] == "clean" and p["route"] == "adv")
    assert adv["mean"] == 8.5 and adv["verdict"] == "no significant difference"


def _per_seed_figures(results: dict, seed: int) -> dict:
    """{(method, norm, route): figures} of one seed, from a --methods results.json."""
    return {(m, row["norm"], row["route"]): {k: row[k] for k in ("clean", "pgd10", "pgd20", "worst_case")}
            for m, part in results["by_method"].items() for row in part["seed_rows"] if row["seed"] == seed}


def test_a_methods_grid_in_two_processes_equals_the_same_runs_in_one(tmp_path, data_dir):
    grid = ["--norms", "bn,sabn", "--methods", "pgd,trades", "--epochs", "2", "--select", "epoch:1", "--eval-limit", "8"]
    parallel = invoke(tiny_args(data_dir, tmp_path / "par") + grid + ["--seeds", "0,1", "--jobs", "2"])
    assert parallel.exit_code == 0, parallel.output
    assert "8 runs in 2 processes side by side, 1 torch thread(s) each" in parallel.output
    out = tmp_path / "par"
    for method in ("pgd", "trades"):
        for norm in ("bn", "sabn"):
            for seed in (0, 1):
                run = out / method / norm / f"seed{seed}"
                config = json.loads((run / "config.json").read_text())
                assert (config["method"], config["norm"], config["keep_epochs"]) == (method, norm, "1")
                kept = torch.load(run / "epoch1.pt", map_location="cpu", weights_only=False)
                assert kept["epoch"] == 0  # the model after epoch 1 (0-based in the checkpoint), not the last
        assert (out / f"curves-{method}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["pgd", "trades"] and sorted(results["by_method"]) == ["pgd", "trades"]
    assert all(len(p["diffs"]) == 2 for part in results["by_method"].values() for p in part["paired"])
    text = (out / "results.md").read_text()
    assert "## Method pgd" in text and "## Method trades" in text and "epoch1.pt of each run" in text
    resumed = invoke(["compare", "--out", str(out), "--resume", "--data-dir", str(data_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("not training it again") == 8 and resumed.output.count("reusing the evaluation") == 8
    assert json.loads((out / "results.json").read_text())["by_method"] == results["by_method"]
    serial = invoke(tiny_args(data_dir, tmp_path / "one") + grid + ["--seeds", "0"])
    assert serial.exit_code == 0, serial.output
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert _per_seed_figures(one, 0) == _per_seed_figures(results, 0)  # same runs, same figures, either way


def test_select_epoch_refuses_a_finished_run_that_kept_no_such_epoch(tmp_path, data_dir):
    out = tmp_path / "kept"
    first = invoke(tiny_args(data_dir, out) + ["--norms", "bn", "--eval-limit", "16", "--epochs", "2"])
    assert first.exit_code == 0, first.output
    before = (out / "results.md").read_text()
    again = invoke(["compare", "--out", str(out), "--resume", "--select", "epoch:1", "--data-dir", str(data_dir)])
    assert again.exit_code == 2 and "epoch1.pt does not exist" in again.output and "--force" in again.output
    assert len(again.output.strip().splitlines()) == 1 and (out / "results.md").read_text() == before


def test_the_papers_table_stands_beside_a_cifar10_grid_only_and_each_method_states_its_own_attack():
    assert paper_comparable(TrainConfig(dataset="cifar10", eps="8/255"))
    assert not paper_comparable(TrainConfig(dataset="cifar10", eps="4/255"))
    assert not paper_comparable(TrainConfig(dataset="fashion-mnist", eps="8/255"))
    settings = CompareSettings(TrainConfig(dataset="fashion-mnist", eps="0.1", steps=3, out="unused"),
                               norms=("bn", "sabn"), methods=("fast", "trades"))
    lines = [line for line in settings_lines(settings, 100, 10, 10) if line.startswith("- training attack")]
    assert lines == [
        "- training attack (fast): FGSM with a uniform random start, step 1.25 eps, projected, eps 0.1, "
        "through the adv route, BN in train mode",
        "- training attack (trades): Linf PGD-3 on the KL to f(x), from x + 0.001 N(0, 1), eps 0.1, "
        "step 0.025, through the adv route, BN in eval mode",
    ]


def test_the_settings_line_names_the_optimizer_schedule_and_the_modern_ingredients():
    plain = CompareSettings(TrainConfig(dataset="fashion-mnist", eps="0.1", out="unused"), norms=("sabn",))
    assert ("- training: 200 epochs of 1 steps, batch 128, SGD lr 0.1, momentum 0.9, weight decay 0.0005, "
            "multistep x0.1 at milestones 0.25,0.75 = epochs 50,150, linear warm-up from lr/10 over 1 steps"
            ) in settings_lines(plain, 100, 10, 10)
    modern = CompareSettings(TrainConfig(dataset="fashion-mnist", eps="0.1", out="unused", optimizer="adamw", lr=1e-3,
                                         weight_decay=0.05, schedule="cosine", warmup_steps=0, warmup_epochs=2.0,
                                         decay_norms=False, ema=0.995, label_smoothing=0.1, extra_data="x.npz",
                                         extra_fraction=0.75, epoch_size=512), norms=("sabn",))
    lines = settings_lines(modern, 1000, 10, 10)
    assert ("- training: 200 epochs of 4 steps, batch 128, AdamW lr 0.001, beta1 0.9, decoupled weight decay 0.05 "
            "(not on norm affines and biases), cosine to 0, after a linear warm-up from 0 over 2 epochs") in lines
    assert ("- also: weight average tau 0.995 (evaluated and selected); label smoothing 0.1; extra data x.npz at 0.75 "
            "of every batch, epochs of 512 examples") in lines


def test_a_method_option_given_by_name_reaches_every_run(tmp_path):
    (tmp_path / "grid.toml").write_text('method = "mart"\nbeta = 4.0\n')
    flags = {"method": "trades", "beta": 5.0, "dataset": "fashion-mnist", "eps": "0.1", "out": str(tmp_path / "c")}
    settings = resolve_compare_settings(flags, {}, None, resume=False)
    assert settings.config.method == "trades" and settings.config.objective_options == {"beta": 5.0}
    from_toml = resolve_compare_settings({"out": str(tmp_path / "d")}, {}, str(tmp_path / "grid.toml"), resume=False)
    assert from_toml.config.method == "mart" and from_toml.config.objective_options == {"beta": 4.0}
