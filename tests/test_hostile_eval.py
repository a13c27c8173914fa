"""Hostile input on the evaluation side, "nothing lost": the AutoAttack benchmark, `robust.evaluate` and the other
Python entry points, export, report, analyze, pseudo-label and the messages a refusal gives.

Every refusal is exit code 2 with one `Error:` line naming the problem and the fix, no traceback, nothing written
or overwritten (``assert_refused``, ``bench_refused``); in Python, the library's error type. Grouped by class:
data lost or changed silently, settings mixed silently, crashes and resources, misleading messages.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_refused, invoke_in, snapshot

import robust
from robust.checkpoint import build_checkpoint, load_model, read_checkpoint, save_checkpoint
from robust.errors import ConfigError, DataError
from robust.bench import attack_gradients, autoattack
from robust.nn.factory import build_model
from robust.nn.norms import export_route
from robust.outputs import FolderLock
from robust.runtime import available_cpus

FMNIST = "/usr/share/datasets/fashion-mnist"
REPO = Path(__file__).resolve().parents[1]
DATA = {"dataset": "fashion-mnist", "input_size": [1, 28, 28], "data_dir": FMNIST}


# ---- helpers ------------------------------------------------------------------------------------


class _RunsCode:
    """A pickle payload: unpickling it calls os.mkdir(marker) (harmless, and visible)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def tiny_model(norm: str = "bn", width: int = 4, arch: str = "preact_resnet18"):
    torch.manual_seed(0)
    return build_model(arch, norm, 10, 1, width, (0.286,), (0.353,))


def write_checkpoint(path: Path, model=None, **fields) -> Path:
    fields = {k: v for k, v in {"dataset": "fashion-mnist", "eps": 0.1, "data": DATA, **fields}.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(build_checkpoint(model if model is not None else tiny_model(), **fields), path)


def run_folder(folder: Path, model=None, **fields) -> Path:
    """A run folder as robust train leaves it: best.pt, config.json, metrics.jsonl."""
    write_checkpoint(folder / "best.pt", model, **fields)
    (folder / "config.json").write_text(json.dumps({"dataset": "fashion-mnist", "seed": 0}) + "\n")
    (folder / "metrics.jsonl").write_text("")
    return folder


def bad_files(folder: Path) -> dict[str, Path]:
    """Files that are no checkpoint: JSON, random bytes, empty, and two that would run code."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"json": folder / "a.json", "random": folder / "random.pt", "empty": folder / "empty.pt",
             "malicious": folder / "evil.pt", "malicious_pickle": folder / "evil.pkl"}
    files["json"].write_text(json.dumps({"format": "robust-checkpoint"}))
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["empty"].write_bytes(b"")
    marker = str(folder / "ran")
    torch.save({"format": "robust-checkpoint", "model": _RunsCode(marker)}, files["malicious"])
    files["malicious_pickle"].write_bytes(pickle.dumps({"model": _RunsCode(marker)}, protocol=2))
    return files


def bench_refused(folder: Path, args: list, *expected: str, command=autoattack.command) -> str:
    """``assert_refused`` for ``python -m robust.bench.autoattack`` (or another developer ``command``)."""
    return assert_refused(folder, args, *expected, command=command)


@pytest.fixture()
def lab(tmp_path) -> Path:
    """runs/a (a run folder), model.pt (a checkpoint outside a run), an existing old.json, and bad files."""
    run_folder(tmp_path / "runs" / "a")
    write_checkpoint(tmp_path / "model.pt")
    (tmp_path / "old.json").write_text('{"kept": true}\n')
    bad_files(tmp_path / "bad")
    return tmp_path


# =================================================================================================
# Data lost or changed silently
# =================================================================================================


# ---- the benchmark writes only through the output checks ----------------------------------------


@pytest.mark.parametrize("json_arg, expected", [
    ("runs/a/best.pt", "is the file this command reads"),  # the checkpoint it scores
    ("runs/a/config.json", "a run's own files are never overwritten"),
    ("runs/a/metrics.jsonl", "a run's own files are never overwritten"),
    ("model.pt", "is the file this command reads"),
    ("old.json", "already exists; pass --force"),
    ("runs/a", "already exists"),  # a folder: its autoattack_bench.json is new, but ...
])
def test_the_benchmark_never_replaces_the_run_or_an_existing_file(lab, json_arg, expected):
    checkpoint = "model.pt" if json_arg == "model.pt" else "runs/a"
    if json_arg == "runs/a":  # ... an existing one there is kept too
        (lab / "runs" / "a" / "autoattack_bench.json").write_text("{}\n")
    bench_refused(lab, [checkpoint, "--limit", "4", "--json", json_arg], expected)


@pytest.mark.parametrize("json_arg", ["runs/a/best.pt", "runs/a/config.json", "model.pt"])
def test_the_benchmark_never_replaces_the_run_even_with_force(lab, json_arg):
    checkpoint = "model.pt" if json_arg == "model.pt" else "runs/a"
    bench_refused(lab, [checkpoint, "--limit", "4", "--json", json_arg, "--force"], "not even with --force")


def test_the_benchmark_module_refuses_to_write_over_the_checkpoint_as_a_user_runs_it(lab):
    before = snapshot(lab)
    done = subprocess.run([sys.executable, "-m", "robust.bench.autoattack", "runs/a", "--limit", "4",
                           "--json", "runs/a/best.pt"], cwd=lab, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert "is the file this command reads" in done.stderr
    assert snapshot(lab) == before



@pytest.mark.parametrize("command", [autoattack.command, attack_gradients.command])
def test_a_developer_command_picks_a_run_folders_checkpoint_as_robust_eval_does(lab, command):
    (lab / "runs" / "a" / "best.pt").rename(lab / "runs" / "a" / "last.pt")  # stopped early: no best.pt
    args = ["runs/a", "--limit", "4", "--json", "runs/a/last.pt"]  # refused: the file it reads is last.pt
    bench_refused(lab, args, "is the file this command reads", command=command)
    ours = invoke_in(lab, args, command=command).output.splitlines()
    theirs = invoke_in(lab, ["eval", "runs/a", "--limit", "4", "--attack", "clean"]).output.splitlines()
    assert ours[0] == theirs[0] == f"note: runs/a has no best.pt (no validation, or training stopped early); using {Path('runs/a/last.pt')}"


# ---- robust.evaluate refuses what it cannot score -----------------------------------------------


def _images(n=8, size=28):
    torch.manual_seed(0)
    return torch.rand(n, 1, size, size), torch.arange(n) % 10


def _nan_patch(x):
    x = x.clone()
    x[0, 0, :4, :4] = float("nan")
    return x


def _with_inf(x):
    x = x.clone()
    x[3, 0, 5, 5] = float("inf")
    return x


@pytest.mark.parametrize("make, error, words", [
    (lambda x, y: (_nan_patch(x), y), ConfigError, "NaN or infinite value(s), the first in example 0"),
    (lambda x, y: (torch.full_like(x, float("nan")), y), ConfigError, "NaN or infinite"),
    (lambda x, y: (_with_inf(x), y), ConfigError, "the first in example 3"),
    (lambda x, y: (x * 2, y), ConfigError, "must lie in [0, 1]"),
    (lambda x, y: (x - 0.5, y), ConfigError, "must lie in [0, 1]"),
    (lambda x, y: (x, y.float() + 0.7), ConfigError, "class indices as integers"),  # 2.7 would be scored as 2
    (lambda x, y: (x, y.float()), ConfigError, "pass y.long()"),
    (lambda x, y: (x, y > 4), ConfigError, "torch.bool"),
    (lambda x, y: (x, y - 3), DataError, "label -3 of evaluation example 0 is outside the model's 10 classes"),
    (lambda x, y: (x, y + 5), DataError, "outside the model's 10 classes"),
    (lambda x, y: (x.repeat(1, 3, 1, 1), y), DataError, "channel(s)"),
    (lambda x, y: (x, y[:5]), ConfigError, "the same length"),
    (lambda x, y: (x[:0], y[:0]), ConfigError, "no examples"),
    (lambda x, y: (x[0], y), ConfigError, "(N, C, H, W)"),
    (lambda x, y: (x, y[:, None]), ConfigError, "(N,)"),
    (lambda x, y: ((x * 255).to(torch.int32), y), ConfigError, "uint8 or float"),
    (lambda x, y: (x.numpy(), y), ConfigError, "tensors"),
    (lambda x, y: (x,), ConfigError, "a tuple (x, y)"),
])
def test_evaluate_refuses_data_it_cannot_score(make, error, words):
    model = tiny_model().eval()
    x, y = _images()
    with pytest.raises(error) as refused:
        robust.evaluate(model, make(x, y), attacks="pgd1", eps=0.1)
    assert words in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("size", [32, 24])
def test_evaluate_refuses_images_of_another_size_than_the_checkpoints(tmp_path, size):
    model = load_model(write_checkpoint(tmp_path / "m.pt"))  # trained on 1x28x28
    assert model.input_shape == (1, 28, 28)
    with pytest.raises(DataError, match=f"are 1x{size}x{size} .* trained on 1x28x28"):
        robust.evaluate(model, _images(size=size), attacks="pgd1", eps=0.1)
    assert robust.evaluate(model, _images(), attacks="clean", eps=0.1)["n"] == 8  # its own size is scored


@pytest.mark.parametrize("setting, words", [
    ({"limit": 0}, "limit must be >= 1"), ({"limit": -5}, "limit must be >= 1"), ({"limit": 2.5}, "whole number"),
    ({"batch_size": 0}, "batch-size must be >= 1"), ({"batch_size": 2.5}, "whole number"),
    ({"restarts": 0}, "restarts must be >= 1"), ({"queries": 0}, "queries must be >= 1"),
    ({"jobs": 0}, "jobs must be >= 1"), ({"jobs": 9}, "more than the 8 images"),
    ({"threads": 0}, "threads must be in [1, "), ({"threads": 100000}, "the CPUs available here"),
    ({"seed": -1}, "seed must be in [0, "), ({"seed": "1"}, "whole number"),
    ({"eps": "8/0"}, "eps"), ({"eps": -1}, "eps"), ({"eps": None}, "eps is required"),
    ({"threat": "l3"}, "unknown threat"), ({"route": "sideways"}, "unknown route"),
    ({"route": "clean"}, "single route"), ({"attacks": "pgd5,nonsense"}, "nonsense"),
])
def test_evaluate_refuses_settings_it_cannot_use(setting, words):
    with pytest.raises(ConfigError) as refused:
        robust.evaluate(tiny_model().eval(), _images(), **{"attacks": "pgd1", "eps": 0.1, **setting})
    assert words in str(refused.value)


# ---- the RobustBench entry says what the run did -------------------------------------------------


@pytest.mark.parametrize("extra, expected", [("extra.npz", True), (None, False)])
def test_model_info_says_whether_the_run_trained_with_extra_data(tmp_path, extra, expected):
    run_folder(tmp_path / "run", config={"extra_data": extra, "dataset": "fashion-mnist"})
    result = invoke_in(tmp_path, ["export", "run", "--robustbench", "Smith2026Sandwich", "-o", "zoo"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "zoo/model_info/fashion-mnist/Linf/Smith2026Sandwich.json").read_text())
    assert info["additional_data"] is expected


# =================================================================================================
# Settings ignored or mixed silently
# =================================================================================================


@pytest.mark.parametrize("second", ["runs/a", "runs/a/", "./runs/a", "runs/../runs/a", "link"])
def test_report_refuses_a_run_given_twice(lab, second):
    (lab / "link").symlink_to(lab / "runs" / "a")
    assert_refused(lab, ["report", "runs/a", second, "--images", "0", "-o", "r.html"], "same run folder", "once")


def test_analyze_refuses_a_checkpoint_given_twice(lab):
    assert_refused(lab, ["analyze", "runs/a", "runs/a/best.pt", "--batches", "1"], "same checkpoint")


@pytest.mark.parametrize("other", [dict(arch="preact_resnet34"), dict(width=8), dict(norm="sabn", width=8)])
def test_analyze_refuses_to_pool_two_architectures(lab, other):
    write_checkpoint(lab / "other.pt", tiny_model(**{"norm": "bn", **other}))
    assert_refused(lab, ["analyze", "runs/a", "other.pt", "--batches", "1", "--out", "pooled"],
                   "preact_resnet18, width 4", "analyse each architecture's checkpoints in its own call")


@pytest.mark.parametrize("args, words", [
    (["--model", "runs/a", "--route", "clean"], "single route (adv)"),  # export refuses it too
    (["--teacher-epochs", "1", "--route", "clean"], "a bn model with a single route"),
])
def test_pseudo_label_refuses_the_clean_route_of_a_single_route_teacher(lab, args, words):
    assert_refused(lab, ["pseudo-label", "--unlabelled", "fashion-mnist[100:110]", "-o", "extra.npz", *args,
                         "--data-dir", FMNIST, "--quiet"], words)
    assert_refused(lab, ["export", "runs/a", "--route", "clean", "-o", "clean.pt"], "single route (adv)")


@pytest.mark.parametrize("command", [["eval", "runs/a", "--attack", "clean", "--limit", "4"],
                                     ["train", "--out", "t", "--epochs", "1", "--limit", "64"]])
@pytest.mark.parametrize("threads", ["0", "999", str(available_cpus() + 1)])
def test_eval_and_train_refuse_the_same_thread_counts_with_the_same_words(lab, command, threads):
    note = " (the CPUs available here)" if int(threads) > 0 else ""
    assert_refused(lab, [*command, "--threads", threads], f"threads must be in [1, {available_cpus()}]{note}, got {threads}")


def test_the_threads_and_jobs_rules_for_torchrun_are_in_the_docs():
    for page in ("distributed.md", "evaluation.md"):
        text = " ".join((REPO / "docs" / page).read_text().split())
        assert "`--jobs N` under torchrun starts N processes on every rank" in text, page


# =================================================================================================
# Crashes, hangs, resources
# =================================================================================================


@pytest.mark.parametrize("args, words", [
    (["--limit", "0"], "0"), (["--limit", "-5"], "-5"), (["--limit", "３"], "not ASCII"),
    (["--rounds", "0"], "0"), (["--batch-size", "0"], "0"), (["--seed", "-1"], "-1"),
    (["--jobs", "0"], "0"), (["--threads", "0"], "0"),
    (["--threads", "100000"], "the CPUs available here"),
    (["--eps", "8/0"], "eps"), (["--eps", "abc"], "eps"), (["--eps", "0"], "--eps 0 attacks nothing"),
    (["--eps", "2"], "eps"), (["--eps", "-1"], "eps"),
    (["--variants", "fp32,,bf16"], "empty name"), (["--variants", "jobs,fast16"], "unknown fast16"),
    (["--variants", ","], "empty name"),
    (["--route", "sideways"], "sideways"), (["--precision", "fp16"], "fp16"),
    (["--json", ""], "--json is empty"),
    (["--route", "clean"], "single route (adv)"),
    (["--jobs", "9", "--limit", "4"], "--jobs 9 is more than the 4 images"),
])
def test_the_benchmark_checks_every_input_before_any_work(lab, args, words):
    bench_refused(lab, ["runs/a", *args], words)


@pytest.mark.parametrize("checkpoint, words", [
    ("missing.pt", "does not exist"), ("runs", "holds no best.pt"), ("bad/a.json", "is not a checkpoint"),
    ("bad/random.pt", "is not a checkpoint"), ("bad/empty.pt", "is not a checkpoint"),
    ("bad/evil.pt", "was refused and nothing of it ran"), ("bad/evil.pkl", "was refused and nothing of it ran"),
])
def test_the_benchmark_refuses_a_file_that_is_no_checkpoint(lab, checkpoint, words):
    bench_refused(lab, [checkpoint, "--limit", "4"], words)
    assert not (lab / "bad" / "ran").exists()


def test_the_benchmark_refuses_a_checkpoint_without_dataset_or_eps(lab):
    save_checkpoint(build_checkpoint(tiny_model()), lab / "bare.pt")
    bench_refused(lab, ["bare.pt"], "records no dataset")
    write_checkpoint(lab / "no-eps.pt", eps=None)
    bench_refused(lab, ["no-eps.pt"], "records no training eps")


@pytest.mark.parametrize("call, words", [
    (lambda tmp: export_route(str(tmp / "runs/a"), "adv"), "export_route takes a model, got the path"),
    (lambda tmp: export_route(5, "adv"), "export_route takes a model, got 5"),
    (lambda tmp: export_route(tiny_model("sabn"), "Adv"), "unknown route 'Adv'"),
    (lambda tmp: load_model(5), "must be a path"),
    (lambda tmp: load_model(None), "must be a path"),
    (lambda tmp: load_model(""), "must be a path"),
    (lambda tmp: load_model(tiny_model()), "got a model (PreActResNet"),
    (lambda tmp: read_checkpoint(3.5), "must be a path"),
])
def test_python_entry_points_refuse_what_is_no_model_or_path(lab, call, words):
    with pytest.raises(ConfigError) as refused:
        call(lab)
    assert words in str(refused.value)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_export_route_returns_the_model_in_the_mode_it_came_in(tmp_path, mode):
    model = tiny_model("sabn").train(mode == "train")
    exported = export_route(model, "adv")
    assert {m.training for m in exported.modules()} == {mode == "train"}
    assert {m.training for m in model.modules()} == {mode == "train"}  # the original is left as it was
    assert "in the mode ``model`` is in" in export_route.__doc__
    assert not load_model(write_checkpoint(Path(tmp_path) / "m.pt", model), route="adv").training  # always eval


# =================================================================================================
# Misleading messages
# =================================================================================================


@pytest.mark.parametrize("name", ["json", "random", "empty"])
def test_a_file_that_is_no_checkpoint_is_called_so_not_malware(lab, name):
    path = f"bad/{Path(bad_files(lab / 'bad')[name]).name}"
    line = assert_refused(lab, ["eval", path, "--limit", "4"], "is not a checkpoint", "robust train or robust export")
    assert "run code" not in line


@pytest.mark.parametrize("command", [["eval", "bad/evil.pt", "--limit", "4"], ["eval", "bad/evil.pkl", "--limit", "4"],
                                     ["eval", "bad/evil.pt", "--arch", "preact_resnet18", "--dataset", "fashion-mnist"],
                                     ["export", "bad/evil.pt", "-o", "e.pt"],
                                     ["pseudo-label", "--model", "bad/evil.pt", "--unlabelled", "fashion-mnist[0:4]", "-o", "e.npz"]])
def test_a_malicious_file_gets_our_sentence_not_torchs_advice(lab, command):
    line = assert_refused(lab, command, "would import", "mkdir", "was refused and nothing of it ran")
    for torchs in ("Re-running", "weights_only", "Weights only load failed", "trusted source"):
        assert torchs not in line
    assert not (lab / "bad" / "ran").exists()


def test_a_malicious_tensor_file_gets_our_sentence_too(lab):
    (lab / "data").mkdir()
    torch.save({"x": _RunsCode(str(lab / "bad" / "ran")), "y": torch.zeros(2)}, lab / "data" / "evil.pt")
    line = assert_refused(lab, ["train", "--dataset", "tensors", "--data-dir", "data/evil.pt", "--out", "t",
                                "--epochs", "1"],
                          "was refused and nothing of it ran")
    assert "Re-running" not in line and not (lab / "bad" / "ran").exists()


def test_a_plain_state_dict_without_arch_is_told_to_add_arch(lab):
    torch.save(tiny_model().state_dict(), lab / "sd.pt")
    for extra in (["--dataset", "fashion-mnist"], ["--mean", "0.5", "--std", "0.5", "--dataset", "fashion-mnist"]):
        line = assert_refused(lab, ["eval", "sd.pt", *extra], "add --arch")
        assert "drop" not in line
    assert_refused(lab, ["eval", "model.pt", "--dataset", "fashion-mnist"], "drop --dataset")  # ours knows its own


@pytest.mark.parametrize("outputs, words", [
    (["--state", "x.json", "--json", "x.json"], "--state and --json are the same file"),
    (["--state", "x.json", "--per-example", "x.json"], "--state and --per-example are the same file"),
    (["--json", "x.json", "--per-example", "x.json"], "--json and --per-example are the same file"),
    (["--json", "out/", "--per-example", "out/eval.json"], "--json and --per-example are the same file"),
    (["--plot", "x.png", "--json", "x.png", "--eps-sweep", "0,0.1"], "--json and --plot are the same file"),
])
def test_two_outputs_on_one_file_are_said_to_collide(lab, outputs, words):
    line = assert_refused(lab, ["eval", "runs/a", "--attack", "clean", "--limit", "4", *outputs], words)
    assert "the file this command reads" not in line
    assert_refused(lab, ["eval", "runs/a", "--limit", "4", "--state", "runs/a/best.pt", "--force"],
                   "is the file this command reads")


@pytest.mark.parametrize("teacher_out, out", [("extra.npz", "extra.npz"), ("t", "t/extra.npz"), ("./t", "t/x/e.npz")])
def test_pseudo_label_collisions_are_found_before_the_teacher_trains(lab, teacher_out, out):
    assert_refused(lab, ["pseudo-label", "--teacher-epochs", "1", "--teacher-out", teacher_out, "-o", out,
                         "--unlabelled", "fashion-mnist[100:110]", "--data-dir", FMNIST, "--quiet"], "collide")


@pytest.mark.parametrize("args, words", [
    (["--teacher-epochs", "1", "--unlabelled", "missing.npz"], "--unlabelled missing.npz"),
    (["--teacher-epochs", "1", "--unlabelled", "images.txt"], "not a folder"),
    (["--model", "runs/a", "--teacher-out", "t", "--unlabelled", "fashion-mnist[100:110]"], "drop it"),
    (["--model", "runs/a", "--unlabelled", "u.npz", "--force"], "is the file this command reads"),
])
def test_pseudo_label_inputs_are_checked_before_the_teacher_trains(lab, args, words):
    np.savez(lab / "u.npz", x=np.zeros((4, 1, 28, 28), np.uint8))
    (lab / "images.txt").write_text("no images")
    out = "u.npz" if "u.npz" in args else "extra.npz"
    assert_refused(lab, ["pseudo-label", *args, "-o", out, "--data-dir", FMNIST, "--quiet"], words)


def test_balanced_with_a_one_class_teacher_names_balanced_not_min_confidence(lab):
    model = tiny_model()
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([10.0] + [0.0] * 9))  # it predicts class 0 for everything
    run_folder(lab / "teacher", model)
    np.savez(lab / "u.npz", x=np.random.default_rng(0).integers(0, 256, (6, 1, 28, 28), dtype=np.uint8))
    line = assert_refused(lab, ["pseudo-label", "--model", "teacher", "--unlabelled", "u.npz", "-o", "e.npz",
                                "--per-class", "3", "--balanced", "--quiet"], "--balanced", "class 1 no image",
                          "drop --balanced")
    assert "--min-confidence" not in line
    line = assert_refused(lab, ["pseudo-label", "--model", "teacher", "--unlabelled", "u.npz", "-o", "e.npz",
                                "--min-confidence", "1", "--quiet"], "lower --min-confidence", "the highest is")


def test_the_convnext_size_message_suggests_what_works():
    model = build_model("timm:convnext_atto", "bn", 10, 1).eval()
    with pytest.raises(robust.errors.ModelError) as refused:
        model(torch.rand(2, 1, 28, 28))
    assert "ours take any, e.g. preact_resnet18" in str(refused.value) and "--dataset imagefolder" in str(refused.value)


def test_a_resume_on_a_locked_run_says_nothing_of_resuming(tmp_path):
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", FMNIST, "--width", "4", "--limit", "64",
            "--batch-size", "32", "--steps", "1", "--val-steps", "1", "--precision", "fp32", "--no-channels-last",
            "--quiet", "--warmup-steps", "0", "--out", "run"]
    assert invoke_in(tmp_path, [*args, "--epochs", "1"]).exit_code == 0
    with FolderLock(tmp_path / "run"):
        before = snapshot(tmp_path / "run")
        result = invoke_in(tmp_path, [*args, "--epochs", "2", "--resume"])
        assert result.exit_code == 2 and "in use by another process" in result.output, result.output
        assert "resumed" not in result.output
        assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("args", [["eval", "missing.pt"], ["eval", "runs/a", "--limit", "0"], ["nonsense"]])
def test_under_torchrun_only_rank_zero_speaks(lab, monkeypatch, args):
    monkeypatch.setenv("RANK", "1")
    before = snapshot(lab)
    result = invoke_in(lab, args)
    assert result.exit_code == 2 and result.output == ""  # rank 0 prints the line
    assert snapshot(lab) == before
    monkeypatch.setenv("RANK", "0")
    assert invoke_in(lab, args).output.count("Error:") == 1
