"""`robust compare`, `robust plot`, `robust analyze` on a tiny budget and synthetic Fashion-MNIST files."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from robust.cli.main import cli
from robust import build_model
from robust.analysis import gradient_analysis, norm_layers
from robust.compare import PAPER_CIFAR10, attack_title, paper_table_markdown

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
    for norm, run in results["runs"].items():
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
    assert [c[1] for c in cells if c[0] == "BN"] == ["shared"]
    for line, row in zip(cells, results["rows"]):
        assert line[2:] == [f"{row[k]:.2f}" for k in ("clean", "pgd10", "pgd20", "worst_case")]
    text = (compared / "results.md").read_text()
    assert "| norm | route | clean | PGD-10 | PGD-20 | worst case |" in text
    assert "hybrid for every norm" in text and "robust compare" in text and "84.84" in text
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
    assert results["runs"]["sabn"]["epochs"] == 2 and results["n_eval"] == 16


@pytest.mark.parametrize("extra, message", [
    (["--norms", "bn,groupnorm"], "unknown norm 'groupnorm'"),
    (["--attacks", "pgd0"], "pgd0"),
    (["--norm", "bn"], "drop --norm"),
])
def test_compare_bad_input_is_one_line_and_writes_nothing(tmp_path, data_dir, extra, message):
    out = tmp_path / "never"
    result = invoke(tiny_args(data_dir, out) + extra)
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()


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


@pytest.mark.parametrize("norm", ["bn", "auxbn"])
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


def test_paper_table_is_labelled_and_attack_titles_follow_the_paper():
    table = paper_table_markdown()
    assert table.startswith("The paper's figures, not measured here")
    assert "| SaAuxBN (SaBN) | adv | 84.08 | 44.93 | 43.14 |" in table and "| AuxBN | clean | 94.47 | - | - |" in table
    assert [attack_title(a) for a in ("pgd10", "pgd20", "autoattack", "apgd-ce")] == ["PGD-10", "PGD-20", "AutoAttack", "APGD-CE"]
