"""End to end on the real Fashion-MNIST files, through the CLI: train a tiny SaBN model, evaluate it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from robust.cli.main import cli

TRAIN = ["train", "--dataset", "fashion-mnist", "--eps", "0.1", "--width", "8", "--limit", "1500", "--epochs", "2",
         "--steps", "2", "--batch-size", "64", "--schedule", "onecycle", "--val-limit", "100", "--val-steps", "3",
         "--quiet", "--seed", "0", "--precision", "fp32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    result = CliRunner().invoke(cli, [*TRAIN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_writes_the_run_folder_and_a_summary(trained):
    out, output = trained
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    assert "route" in output and "val PGD %" in output
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert json.loads((out / "config.json").read_text())["width"] == 8


def test_robust_accuracy_is_well_above_chance(trained, tmp_path):
    out, _ = trained
    report = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, ["eval", str(out), "--attack", "pgd20", "--limit", "250", "--quiet",
                                      "--json", str(report)])
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["n"] == 250 and figures["eps"] == pytest.approx(0.1)
    adv = figures["routes"]["adv"]
    # Bounds from the spread of this training and evaluation over --seed 0-4, each with native kernels
    # and with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, one torch thread, on an Intel Xeon with
    # AVX512-BF16 without AMX, 2026-12-07; min/mean/max (sd):
    #   adv route clean     native 46.0/53.9/60.4, AVX2 49.2/54.4/61.6 (sd 4.9 over all 10)
    #   adv route PGD-20    native 28.0/32.7/35.6, AVX2 28.4/31.6/33.2 (sd 2.5)
    #   clean route clean   native 42.0/49.9/56.8, AVX2 40.4/50.0/56.4 (sd 6.5)
    # Each bound is the lower of (min - 10) and (mean - 4 sd), rounded down to a multiple of 5.
    # Chance is 10%.
    assert adv["clean"] > 30 and adv["pgd20"] > 15, adv
    assert adv["pgd20"] <= adv["clean"]
    assert figures["routes"]["clean"]["clean"] > 20


def test_rerunning_into_the_same_folder_is_refused_and_changes_nothing(trained):
    out, _ = trained
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = CliRunner().invoke(cli, [*TRAIN, "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output and "--resume" in result.output
    assert "Traceback" not in result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
