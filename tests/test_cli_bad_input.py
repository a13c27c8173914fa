"""The bad-input battery through the CLI, grouped by command: exit code 2, one `Error:` line naming
the problem and the fix, no traceback, and nothing written or overwritten (the folder tree is
compared byte for byte; every refusal is checked by helpers.assert_refused).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import re
import shutil
import signal
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_refused, invoke_in, snapshot

from robust.checkpoint import build_checkpoint, load_model, save_checkpoint
from robust.config import TrainConfig
from robust.errors import ConfigError
from robust.nn.factory import build_model
from robust.train.trainer import Trainer

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TRAIN = ["train", "--dataset", "fashion-mnist", "--width", "4", "--epochs", "1", "--limit", "64", "--steps", "1",
         "--no-channels-last", "--quiet"]
COMPARE = ["compare", "--dataset", "fashion-mnist", "--width", "4", "--epochs", "1", "--limit", "64", "--steps", "1",
           "--norms", "bn", "--eval-limit", "8", "--no-channels-last", "--quiet"]
OWN = ["train", "--width", "4", "--epochs", "1", "--limit", "16", "--steps", "1", "--no-channels-last", "--quiet",
       "--workers", "0", "--out", "run"]


# =================================================================================================
# Shared inputs: a trained run, good and bad checkpoints, work that must not start
# =================================================================================================


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fmnist) -> Path:
    """A real (tiny) run folder: config.json, metrics.jsonl, last.pt, best.pt."""
    out = tmp_path_factory.mktemp("trained") / "run"
    config = TrainConfig(dataset="fashion-mnist", width=4, epochs=1, limit=64, batch_size=32, steps=1, val_limit=16,
                         val_steps=1, warmup_steps=0, channels_last=False, precision="fp32", quiet=True, out=str(out))
    Trainer(config, data=fmnist, log=lambda m: None).fit()
    return out


@pytest.fixture()
def run(tmp_path, trained_run) -> Path:
    """A copy of the trained run as ``run`` in the test's folder (where the CLI runs)."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def _work_must_not_start(monkeypatch) -> None:
    """Make every command's real work fail loudly: a refusal must come before it."""
    import importlib

    def started(*args, **kwargs):
        raise AssertionError("the work started before the output was checked")

    for module, name in [("robust.cli.evaluate", "evaluate"), ("robust.cli.evaluate", "load_model"),
                         ("robust.cli.export", "load_model"), ("robust.cli.analyze", "analyze_checkpoint"),
                         ("robust.cli.bench", "run_bench"), ("robust.cli.plot", "plot_learning_curves"),
                         ("robust.cli.evaluate", "load_test_split"), ("robust.train.trainer", "train_step")]:
        monkeypatch.setattr(importlib.import_module(module), name, started)


def _ok(folder: Path, args: list[str]):
    result = invoke_in(folder, args)
    assert result.exit_code == 0, result.output
    return result


class _RunsCode:
    """A pickle payload: unpickling it calls os.mkdir(marker) (harmless, and visible)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _tiny_checkpoint(arch: str = "preact_resnet18", **fields) -> dict:
    torch.manual_seed(0)
    model = build_model(arch, "sabn", 10, 1, 4, (0.286,), (0.353,))
    return build_checkpoint(model, dataset="fashion-mnist", eps=0.1, **fields)


def _bad_checkpoints(folder: Path, marker: Path) -> dict[str, Path]:
    """One file per kind of bad checkpoint, each named for what is wrong with it."""
    good = save_checkpoint(_tiny_checkpoint(epoch=0), folder / "good.pt")
    paths = {}
    paths["truncated"] = folder / "truncated.pt"
    paths["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    paths["text"] = folder / "text.pt"
    paths["text"].write_text("these are not the weights you are looking for\n")
    paths["foreign"] = folder / "foreign.pt"  # a valid torch file, but not one of ours
    torch.save({"state_dict": {"w": torch.zeros(3)}}, paths["foreign"])
    other = _tiny_checkpoint("preact_resnet34", epoch=0)  # weights of another architecture ...
    other["model_args"] = dict(_tiny_checkpoint()["model_args"])  # ... claiming to be a ResNet-18
    paths["other_arch"] = save_checkpoint(other, folder / "other_arch.pt")
    paths["pickle"] = folder / "pickle.pt"  # a plain pickle that runs code
    paths["pickle"].write_bytes(pickle.dumps({"format": "robust-checkpoint", "model": _RunsCode(str(marker))}, protocol=2))
    paths["torch_pickle"] = folder / "torch_pickle.pt"  # the same payload inside torch's zip format
    torch.save({"format": "robust-checkpoint", "model": _RunsCode(str(marker))}, paths["torch_pickle"])
    good.unlink()
    return paths


def test_the_malicious_payload_is_live(tmp_path):
    """Guard for the tests below: plain unpickling really would run the code."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_RunsCode(str(marker))))
    assert marker.is_dir()


CHECKPOINT_PROBLEMS = {
    "missing": "does not exist",
    "truncated": "is not a checkpoint",
    "text": "is not a checkpoint",
    "foreign": "not a robust checkpoint",
    "other_arch": "do not fit",
    "pickle": "was refused",
    "torch_pickle": "was refused",
}


@pytest.fixture()
def good_checkpoint(tmp_path) -> Path:
    (tmp_path / "ckpt").mkdir()
    return save_checkpoint(_tiny_checkpoint(epoch=0), tmp_path / "ckpt" / "model.pt")


@pytest.fixture()
def bn_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = build_model("preact_resnet18", "bn", 10, 1, 4, (0.286,), (0.353,))
    return save_checkpoint(build_checkpoint(model, dataset="fashion-mnist", eps=0.1), tmp_path / "bn.pt")


# =================================================================================================
# train
# =================================================================================================


# ---- flags --------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps, problem", [
    ("8/0", "is not a number"), ("abc", "is not a number"), ("-1", "outside (0, 1]"), ("0", "outside (0, 1]"),
    ("2", "outside (0, 1]"),
])
def test_train_refuses_bad_eps(tmp_path, eps, problem):
    assert_refused(tmp_path, [*TRAIN, "--eps", eps, "--out", "run"], f"eps '{eps}'", problem, "8/255")


@pytest.mark.parametrize("flag", ["--batch-size", "--epochs", "--steps"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_train_refuses_non_positive_counts(tmp_path, flag, value):
    assert_refused(tmp_path, [*TRAIN, flag, value, "--out", "run"], f"{flag[2:]} must be >= 1, got {value}")


@pytest.mark.parametrize("flag, value, valid", [
    ("--norm", "groupnorm", "'bn', 'auxbn', 'sabn'"),
    ("--method", "madry", "'pgd', 'hybrid', 'trades', 'mart', 'fast', 'nfgsm'"), ("--dataset", "imagenet", "'cifar10'"),
])
def test_train_refuses_unknown_names(tmp_path, flag, value, valid):
    assert_refused(tmp_path, ["train", flag, value, "--out", "run"], f"'{value}' is not one of", valid)


def test_train_refuses_an_unknown_arch(tmp_path):  # not a click choice: torchvision:NAME and timm:NAME are open
    assert_refused(tmp_path, ["train", "--arch", "resnet9000", "--out", "run"], "unknown arch 'resnet9000'",
             "preact_resnet18", "torchvision:NAME")


@pytest.mark.parametrize("args, problem", [
    (["--nproc", "0"], "--nproc must be >= 1"), (["--save-every", "-1"], "save-every must be >= 0"),
    (["--limit", "0"], "limit must be >= 1"),
])
def test_train_refuses_bad_launch_options(tmp_path, args, problem):
    assert_refused(tmp_path, [*TRAIN, *args, "--out", "run"], problem)


@pytest.mark.parametrize("args, problem", [
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--momentum", "-inf"], "momentum must be a finite number"),
    (["--val-split", "nan"], "val-split must be a finite number"),
    (["--save-every", "inf"], "save-every must be a finite number"),
    (["--seed", "-1"], "seed must be in [0, 9223372036854775807], got -1"),
    (["--seed", str(2**63)], "seed must be in [0, 9223372036854775807]"),
    (["--threads", "100000"], "threads must be in [1, "),
    (["--out", ""], "--out is empty"),
    (["--out", " "], "--out is empty"),
    (["--data-dir", ""], "--data-dir is empty"),
    (["--eps", ""], "--eps is empty"),
    (["--milestones", ""], "--milestones is empty"),
    (["--config", ""], "--config is empty"),
])
def test_train_refuses_bad_values_before_writing(tmp_path, args, problem):
    assert_refused(tmp_path, [*TRAIN, *args], problem)
    assert not (tmp_path / "runs").exists()


def test_train_refuses_to_overwrite_an_existing_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert_refused(tmp_path, [*TRAIN, "--out", "run"], "already exists", "--resume", "--force")


# ---- config files (TOML) and Python configs -----------------------------------------------------


@pytest.mark.parametrize("toml, problem", [
    ('epochs = "3"', "epochs must be a whole number, got the text '3'; write it without quotes"),
    ('lr = "0.1"', "lr must be a number, got the text '0.1'; write it without quotes"),
    ('seed = "abc"', "seed must be a whole number"),
    ("out = 5", "out must be a path (text), got 5"),
    ("epochs = 1.5", "epochs must be a whole number, got 1.5"),
    ("width = 4.5", "width must be a whole number, got 4.5"),
    ("lr = nan", "lr must be a finite number"),
    ("clean_weight = inf", "clean-weight must be a finite number"),
    ('quiet = "yes"', "quiet must be true or false"),
    ("data_dir = 5", "data-dir must be a path"),
    ("seed = -1", "seed must be in [0, 9223372036854775807], got -1"),
    ("seed = 9223372036854775808", "seed must be in [0, 9223372036854775807]"),
    ("threads = 100000", "the CPUs available here"),
    ('out = ""', "out is empty"),
    ('eps = ""', "eps is empty"),
    ("milestones = 50", "milestones must be text"),
    ("[model]\nwidth = 4", "unknown config field(s): model"),
])
def test_train_refuses_mistyped_toml_values(tmp_path, toml, problem):
    (tmp_path / "run.toml").write_text(toml + "\n")
    assert_refused(tmp_path, ["train", "--config", "run.toml", "--dataset", "fashion-mnist"], problem)
    assert not (tmp_path / "runs").exists()


def test_train_refuses_a_toml_file_that_is_not_utf8(tmp_path):
    (tmp_path / "run.toml").write_bytes('dataset = "fashion-mnist"\n# caf\xe9\n'.encode("latin-1"))
    assert_refused(tmp_path, ["train", "--config", "run.toml"], "run.toml is not UTF-8", "save it as UTF-8")


def test_train_refuses_an_unreadable_toml_file(tmp_path, monkeypatch):
    import robust.config

    (tmp_path / "run.toml").write_text('dataset = "fashion-mnist"\n')

    def denied(*args, **kwargs):  # root reads a chmod 000 file, so the refusal is simulated
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(robust.config, "open", denied, raising=False)
    assert_refused(tmp_path, ["train", "--config", "run.toml"], "cannot read config file run.toml (Permission denied)")


@pytest.mark.parametrize("field, value, problem", [
    ("width", 4.5, "width must be a whole number"), ("epochs", 1.5, "epochs must be a whole number"),
    ("out", 5, "out must be a path"), ("lr", float("nan"), "lr must be a finite number"), ("epochs", True, "epochs"),
])
def test_python_configs_are_validated_before_anything_is_written(tmp_path, fmnist, field, value, problem):
    config = TrainConfig(dataset="fashion-mnist", width=4, epochs=1, limit=32, out=str(tmp_path / "run"))
    setattr(config, field, value)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        Trainer(config, data=fmnist).setup()
    assert list(tmp_path.iterdir()) == []


# ---- resume -------------------------------------------------------------------------------------


def _resume_folder(tmp_path: Path, kind: str, marker: Path) -> Path:
    """A run folder whose config.json is fine and whose last.pt is bad in the way ``kind`` says."""
    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(dataset="fashion-mnist", width=4, epochs=2, limit=64, steps=1, channels_last=False,
                         quiet=True, out="run")
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    if kind != "missing":
        (tmp_path / "bad").mkdir()
        shutil.copy(_bad_checkpoints(tmp_path / "bad", marker)[kind], run / "last.pt")
        shutil.rmtree(tmp_path / "bad")
    return run


@pytest.mark.parametrize("kind", list(CHECKPOINT_PROBLEMS))
def test_train_resume_refuses_bad_checkpoints(tmp_path, kind):
    marker = tmp_path / "ran"
    _resume_folder(tmp_path, kind, marker)
    problem = "last.pt does not exist" if kind == "missing" else CHECKPOINT_PROBLEMS[kind]
    if kind == "other_arch":
        problem = "does not fit the configured model"
    assert_refused(tmp_path, ["train", "--out", "run", "--resume"], problem)
    assert not marker.exists()  # the pickled code never ran


def test_train_resume_refuses_a_changed_architecture(tmp_path):
    run = _resume_folder(tmp_path, "missing", tmp_path / "ran")
    save_checkpoint(_tiny_checkpoint(epoch=0, optimizer={}, scheduler={"step": 0}), run / "last.pt")
    assert_refused(tmp_path, ["train", "--out", "run", "--resume", "--arch", "preact_resnet34"],
             "cannot resume run with other settings", "--arch preact_resnet18 (given: preact_resnet34)",
             "resume without those flags")


def test_train_resume_refuses_an_unreadable_config_json(tmp_path, run):
    (run / "config.json").write_text("{not json")
    assert_refused(tmp_path, ["train", "--out", "run", "--resume"], "run/config.json is unreadable", "--force")


# ---- Fashion-MNIST data folders (offline) -------------------------------------------------------


def _data_folder(tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for f in FMNIST.iterdir():
        if damage == "missing" and f.name.startswith("t10k-labels"):
            continue
        if f.name.startswith("train-labels") and damage in ("truncated", "corrupt"):
            raw = gzip.decompress(f.read_bytes())
            body = raw[: len(raw) // 2] if damage == "truncated" else b"\x00\x00\x0d\x01" + raw[4:]
            (folder / f.name.removesuffix(".gz")).write_bytes(body)
        else:
            os.symlink(f, folder / f.name)
    return folder


@pytest.mark.parametrize("damage, problem", [
    ("missing", "missing t10k-labels-idx1-ubyte"),
    ("truncated", "is truncated"),
    ("corrupt", "is not an IDX file"),
])
def test_train_refuses_a_damaged_data_folder(tmp_path, damage, problem):
    _data_folder(tmp_path, damage)
    assert_refused(tmp_path, [*TRAIN, "--data-dir", "data", "--out", "run"], problem, "data")


def test_train_refuses_a_truncated_gzip_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for f in FMNIST.iterdir():
        if f.name.startswith("train-labels"):
            (folder / f.name).write_bytes(f.read_bytes()[:1000])
        else:
            os.symlink(f, folder / f.name)
    assert_refused(tmp_path, [*TRAIN, "--data-dir", "data", "--out", "run"], "cannot read", "--data-dir")


# ---- your own data and model --------------------------------------------------------------------


def _folder(root: Path, sizes=((28, 28),), classes=("a", "b"), test_classes=None, per_class: int = 3) -> Path:
    """DIR/train/<class>/*.png (and DIR/test/...) of small gray images, sizes cycling through ``sizes``."""
    from PIL import Image

    folder = root / "imgs"
    for split, names in (("train", classes), ("test", test_classes)):
        for name in names or ():
            (folder / split / name).mkdir(parents=True)
            for j in range(per_class):
                w, h = sizes[j % len(sizes)]
                Image.new("L", (w, h), color=40 * j).save(folder / split / name / f"{j}.png")
    return folder


def test_train_refuses_an_empty_image_folder(tmp_path):
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    assert_refused(tmp_path, [*OWN, "--dataset", "imagefolder", "--data-dir", "imgs"], "imgs/train is empty", "one folder of images per class")


def test_train_refuses_class_folders_that_differ(tmp_path):
    _folder(tmp_path, classes=("a", "b", "c"), test_classes=("a", "b", "d"))
    assert_refused(tmp_path, [*OWN, "--dataset", "imagefolder", "--data-dir", "imgs"],
             "class folders differ between train/ and test/", "only in train/: c", "only in test/: d")


@pytest.mark.parametrize("damage, problem", [("truncated", "truncated"), ("text", "cannot identify image file")])
def test_train_refuses_a_damaged_image(tmp_path, damage, problem):
    folder = _folder(tmp_path, test_classes=("a", "b"))
    bad = folder / "train" / "b" / "1.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-30])
    else:
        bad.write_text("not an image")
    assert_refused(tmp_path, [*OWN, "--dataset", "imagefolder", "--data-dir", "imgs"], f"cannot read image {bad.relative_to(tmp_path)}",
             problem, "remove or replace the file")


def test_train_refuses_mixed_sizes_without_image_size(tmp_path):
    _folder(tmp_path, sizes=((28, 28), (32, 32)))
    assert_refused(tmp_path, [*OWN, "--dataset", "imagefolder", "--data-dir", "imgs"], "differ in size", "28x28 (4 files)",
             "32x32 (2 files)", "--image-size N")


def test_train_refuses_imagefolder_without_data_dir(tmp_path):
    assert_refused(tmp_path, [*OWN, "--dataset", "imagefolder"], "--dataset imagefolder needs --data-dir")


@pytest.mark.parametrize("arrays, problem", [
    (dict(x=np.zeros((4, 8, 8, 1), np.uint8), y=np.array([0, 1, 2, -1])), "label -1 is out of range"),
    (dict(x=np.zeros((4, 1, 8, 8), np.uint8), y=np.array([0, 1, 2, 3]), classes=np.array(["a", "b", "c"])),
     "label 3 is out of range (labels must be 0..2"),
    (dict(x=np.zeros((4, 1, 8, 8), np.uint8), y=np.array([0, 1, 0])), "y has 3 labels but x has 4 images"),
    (dict(x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 0, 1])), "x must be uint8 images"),
    (dict(x=np.zeros((4, 1, 8, 8), np.uint8), y=np.array([0, 1, 0, 1]), x_test=np.zeros((2, 1, 8, 8), np.uint8)),
     "x_test without y_test"),
    (dict(images=np.zeros((4, 1, 8, 8), np.uint8)), "it needs x (images) and y (labels)"),
])
def test_train_refuses_bad_tensor_files(tmp_path, arrays, problem):
    np.savez(tmp_path / "data.npz", **arrays)
    assert_refused(tmp_path, [*OWN, "--dataset", "tensors", "--data-dir", "data.npz"], "data.npz", problem)


@pytest.mark.parametrize("arch, problem", [
    ("torchvision:resnet19", "torchvision has no classification model 'resnet19' (did you mean resnet18"),
    ("timm:test_efficientnet_evos", "cannot be made dual-route: EvoNorm2dS0 x13"),
    ("keras:resnet18", "write torchvision:NAME or timm:NAME"),
])
def test_train_refuses_unbuildable_architectures(tmp_path, arch, problem):
    _folder(tmp_path, test_classes=("a", "b"))
    assert_refused(tmp_path, [*OWN[:1], *OWN[3:], "--dataset", "imagefolder", "--data-dir", "imgs", "--arch", arch], problem)


def test_train_says_how_to_get_timm(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    assert_refused(tmp_path, [*OWN[:1], *OWN[3:], "--dataset", "fashion-mnist", "--arch", "timm:resnet18"],
             "needs timm, which is not installed", "pip install 'robust[timm]'")


def test_a_damaged_image_found_while_streaming_stops_in_one_line(tmp_path):
    folder = _folder(tmp_path, test_classes=("a", "b"), per_class=8)
    bad = folder / "train" / "a" / "5.png"
    bad.write_bytes(bad.read_bytes()[:-30])  # the header still reads: found only when decoded
    result = invoke_in(tmp_path, [*OWN, "--dataset", "imagefolder", "--data-dir", "imgs", "--data-mode", "stream",
                                   "--workers", "1", "--val-split", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1 and "cannot read image imgs/train/a/5.png" in errors[0], result.output


# =================================================================================================
# eval
# =================================================================================================


@pytest.mark.parametrize("kind", list(CHECKPOINT_PROBLEMS))
def test_eval_refuses_bad_checkpoints(tmp_path, kind):
    marker = tmp_path / "ran"
    (tmp_path / "bad").mkdir()
    paths = _bad_checkpoints(tmp_path / "bad", marker)
    path = tmp_path / "bad" / "missing.pt" if kind == "missing" else paths[kind]
    assert_refused(tmp_path, ["eval", str(path), "--limit", "8"], CHECKPOINT_PROBLEMS[kind])
    assert not marker.exists()


@pytest.mark.parametrize("args, problem", [
    (["--attack", "deepfool"], "deepfool"),
    (["--route", "sideways"], "'sideways' is not one of"),
    (["--eps", "8/0"], "is not a number"),
    (["--eps", "abc"], "is not a number"),
    (["--eps", "-1"], "outside"),
    (["--eps", "2"], "outside"),
    (["--limit", "0"], "0"),
])
def test_eval_refuses_bad_flags(tmp_path, good_checkpoint, args, problem):
    assert_refused(tmp_path, ["eval", str(good_checkpoint), *args], problem)


@pytest.mark.parametrize("args, problem", [
    (["--eps-sweep", ""], "--eps-sweep is empty"),
    (["--eps-sweep", ","], "eps list ',' is empty"),
    (["--eps-sweep", "0,,0.1"], "eps list '0,,0.1' has an empty item"),
    (["--eps-sweep", "0,0.1,"], "eps list '0,0.1,' has an empty item"),
    (["--attack", ""], "--attack is empty"),
    (["--json", ""], "--json is empty"),
    (["--data-dir", ""], "--data-dir is empty"),
    (["--seed", "-1"], "-1"),
    (["--threat", "l2"], "pass --eps for --threat l2"),
])
def test_eval_refuses_empty_and_incomplete_flags(tmp_path, run, monkeypatch, args, problem):
    _work_must_not_start(monkeypatch)
    assert_refused(tmp_path, ["eval", "run", "--limit", "8", *args], problem)


def test_eval_refuses_an_empty_checkpoint_argument(tmp_path, run, monkeypatch):
    _work_must_not_start(monkeypatch)
    assert_refused(tmp_path, ["eval", ""], "CHECKPOINT is empty")


def test_a_real_read_only_folder_is_refused_before_the_evaluation(tmp_path, run, monkeypatch):
    # /sys refuses new files for everyone (root included) on most systems; /proc refuses them everywhere on Linux
    folder = next((f for f in ("/sys", "/proc") if Path(f).is_dir() and _probe_fails(f)), None)
    if folder is None:
        pytest.skip("no folder here refuses new files (neither /sys nor /proc)")
    _work_must_not_start(monkeypatch)
    assert_refused(tmp_path, ["eval", "run", "--attack", "autoattack", "--json", f"{folder}/robust-e.json"],
             f"cannot write to {folder}")


def _probe_fails(folder: str) -> bool:
    try:
        Path(folder, ".robust-test-probe").touch()
    except OSError:
        return True
    Path(folder, ".robust-test-probe").unlink()
    return False


def test_a_failed_final_write_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path, run, monkeypatch):
    import robust.outputs

    (tmp_path / "e.json").write_text("previous")
    real = robust.outputs.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(robust.outputs.os, "fsync", lambda fd: real(fd) if monkeypatch_state["probe"] else full(fd))
    monkeypatch_state = {"probe": True}
    original_probe = robust.outputs.probe_folder

    def probe(*args, **kwargs):
        result = original_probe(*args, **kwargs)
        monkeypatch_state["probe"] = False  # the disk fills up during the evaluation
        return result

    monkeypatch.setattr(robust.outputs, "probe_folder", probe)
    result = invoke_in(tmp_path, ["eval", "run", "--attack", "fgsm", "--limit", "8", "--json", "e.json", "--force"])
    assert result.exit_code != 0
    assert (tmp_path / "e.json").read_text() == "previous"
    assert not list(tmp_path.glob(".*.tmp"))


def test_eval_says_which_file_it_scored(tmp_path, run):
    (run / "best.pt").unlink()
    result = _ok(tmp_path, ["eval", "run", "--attack", "fgsm", "--limit", "8", "--json", "e.json"])
    assert "run has no best.pt" in result.output and "using run/last.pt" in result.output
    assert result.output.count("run/last.pt:") == 1  # the table's header names the file
    assert json.loads((tmp_path / "e.json").read_text())["checkpoint"] == "run/last.pt"


def test_eval_l2_with_an_explicit_eps_runs(tmp_path, run):
    result = _ok(tmp_path, ["eval", "run", "--attack", "pgd2", "--limit", "8", "--threat", "l2", "--eps", "0.5"])
    assert "l2 eps 0.5" in result.output


# =================================================================================================
# export
# =================================================================================================


def test_export_refuses_an_empty_output_path(tmp_path, run, monkeypatch):
    _work_must_not_start(monkeypatch)
    assert_refused(tmp_path, ["export", "run", "-o", ""], "-o/--out is empty")


def test_a_route_a_model_lacks_is_refused_by_eval_export_and_load_model_alike(tmp_path, bn_checkpoint):
    rule = "this model has a single route (adv)"
    assert_refused(tmp_path, ["eval", "bn.pt", "--route", "clean", "--limit", "8"], rule)
    assert_refused(tmp_path, ["export", "bn.pt", "--route", "clean", "-o", "bn_clean.pt"], rule)
    with pytest.raises(ConfigError, match=re.escape(rule)):
        load_model(bn_checkpoint, route="clean")


# =================================================================================================
# compare, analyze, plot
# =================================================================================================


@pytest.mark.parametrize("args, problem", [
    (["--norms", ""], "--norms is empty"),
    (["--norms", ","], "norms is empty"),
    (["--attacks", ""], "--attacks is empty"),
    (["--attacks", " , "], "attacks is empty"),
    (["--eval-limit", "0"], "eval-limit must be >= 1, got 0"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--seed", "-1"], "seed must be in [0,"),
])
def test_compare_refuses_bad_values(tmp_path, args, problem):
    base = [a for a in COMPARE if a not in ("--norms", "bn")]
    assert_refused(tmp_path, [*base, *args, "--out", "cmp"], problem)


@pytest.mark.parametrize("toml, problem", [
    ("norms = 5", "norms must be comma-separated names or a list of names"),
    ('norms = ""', "norms is empty"),
    ('eval_limit = "5"', "eval-limit must be a whole number"),
    ("eval_batch_size = 0", "eval-batch-size must be >= 1, got 0"),
    ('epochs = "3"', "epochs must be a whole number"),
])
def test_compare_refuses_mistyped_toml_values(tmp_path, toml, problem):
    (tmp_path / "cmp.toml").write_text(toml + "\n")
    assert_refused(tmp_path, ["compare", "--config", "cmp.toml", "--dataset", "fashion-mnist", "--out", "cmp"], problem)


@pytest.mark.parametrize("args, problem", [
    (["analyze", "run", "--seed", "-1"], "-1"), (["analyze", "run", "--batches", "0"], "batches must be >= 1"),
])
def test_analyze_refuses_out_of_range_values(tmp_path, run, monkeypatch, args, problem):
    _work_must_not_start(monkeypatch)
    assert_refused(tmp_path, args, problem)


def test_plot_refuses_a_blank_output_path(tmp_path, run, monkeypatch):
    _work_must_not_start(monkeypatch)
    assert_refused(tmp_path, ["plot", "run", "-o", " "], "-o/--output is empty")


def test_force_replaces_an_existing_plot(tmp_path, run):
    (tmp_path / "keep.png").write_text("mine")
    _ok(tmp_path, ["plot", "run", "-o", "keep.png", "--force"])
    assert (tmp_path / "keep.png").read_bytes().startswith(b"\x89PNG")
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_existing_folder_as_output_gets_the_default_name(tmp_path, run):
    (tmp_path / "figs").mkdir()
    _ok(tmp_path, ["plot", "run", "-o", "figs"])
    assert (tmp_path / "figs" / "curves.png").is_file()
    assert_refused(tmp_path, ["plot", "run", "-o", "figs/"], "figs/curves.png already exists", "--force")


# =================================================================================================
# bench
# =================================================================================================


@pytest.mark.parametrize("args, problem", [
    (["bench", "--threads", "100000"], "the CPUs available here"), (["bench", "--json", ""], "--json is empty"),
])
def test_bench_refuses_bad_values(tmp_path, run, monkeypatch, args, problem):
    _work_must_not_start(monkeypatch)
    assert_refused(tmp_path, args, problem)


# =================================================================================================
# all commands
# =================================================================================================


# ---- outputs checked before the work ------------------------------------------------------------


# command -> (arguments with {P} for the output path, the output's file name)
OUTPUT_COMMANDS = {
    "eval --json": (["eval", "run", "--attack", "fgsm", "--limit", "8", "--json", "{P}"], "e.json"),
    "eval --plot": (["eval", "run", "--attack", "fgsm", "--limit", "8", "--eps-sweep", "0,0.1", "--plot", "{P}"], "sweep.png"),
    "analyze --out": (["analyze", "run", "--batches", "1", "--out", "{P}"], "grads"),
    "analyze -o": (["analyze", "run", "--batches", "1", "-o", "{P}"], "g.png"),
    "bench --json": (["bench", "--width", "4", "--batch-size", "8", "--iters", "1", "--repeats", "1", "--json", "{P}"], "b.json"),
    "plot -o": (["plot", "run", "-o", "{P}"], "curves.png"),
    "export -o": (["export", "run", "-o", "{P}"], "m.pt"),
    "compare --out": ([*COMPARE, "--out", "{P}"], "cmp"),
    "train --out": ([*TRAIN, "--out", "{P}"], "newrun"),
}


def _with_path(args: list[str], path: str) -> list[str]:
    return [a.replace("{P}", path) for a in args]


def _read_only(monkeypatch) -> None:
    """What a read-only folder answers to creating a file (we run as root in CI, where chmod does not stop writes)."""
    import robust.outputs

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(robust.outputs.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(robust.outputs.os, "open", refuse)


def _full_disk(monkeypatch) -> None:
    import robust.outputs

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(robust.outputs.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))


@pytest.mark.parametrize("command", list(OUTPUT_COMMANDS))
@pytest.mark.parametrize("fault, problem", [
    ("read-only folder", "Read-only file system"), ("path through a file", "is a file"), ("full disk", "MB free"),
])
def test_outputs_are_checked_before_the_work(tmp_path, run, monkeypatch, command, fault, problem):
    args, name = OUTPUT_COMMANDS[command]
    (tmp_path / "afile").write_text("a file, not a folder")
    path = f"afile/{name}" if fault == "path through a file" else f"new/{name}"
    _work_must_not_start(monkeypatch)
    if fault == "read-only folder":
        _read_only(monkeypatch)
    elif fault == "full disk":
        _full_disk(monkeypatch)
    assert_refused(tmp_path, _with_path(args, path), problem)


# ---- no silent overwrite ------------------------------------------------------------------------


FILE_COMMANDS = [c for c in OUTPUT_COMMANDS if c not in ("compare --out", "train --out")]


@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_an_existing_output_file_is_kept_without_force(tmp_path, run, monkeypatch, command):
    args, name = OUTPUT_COMMANDS[command]
    if command == "analyze --out":  # a folder output: its analysis.json exists
        (tmp_path / name).mkdir()
        (tmp_path / name / "analysis.json").write_text("mine")
    else:
        (tmp_path / name).write_text("mine")
    _work_must_not_start(monkeypatch)
    assert_refused(tmp_path, _with_path(args, name), "already exists", "--force")


@pytest.mark.parametrize("command, written", [
    ("export -o", "newdir/run-adv.pt"), ("plot -o", "newdir/curves.png"), ("eval --json", "newdir/eval.json"),
])
def test_an_output_path_ending_in_a_separator_is_a_folder(tmp_path, run, command, written):
    args, _ = OUTPUT_COMMANDS[command]
    _ok(tmp_path, _with_path(args, "newdir/"))
    assert (tmp_path / written).is_file() and not (tmp_path / "newdir").is_file()
    if written.endswith(".pt"):
        assert load_model(tmp_path / written).build_args["norm"] == "bn"


# ---- Ctrl-C: exit 130, nothing written ----------------------------------------------------------


def _interrupt(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)  # the KeyboardInterrupt arrives here
    raise AssertionError("SIGINT was not delivered")


@pytest.fixture()
def ctrl_c():
    """Python's own SIGINT handler for the test, as a terminal gives it: a process started in the
    background by a non-interactive shell (some CI runners) inherits SIGINT as ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("args, work", [
    (["eval", "run", "--attack", "fgsm", "--limit", "8", "--json", "e.json"], ("robust.cli.evaluate", "evaluate")),
    (["analyze", "run", "--batches", "1", "--out", "grads"], ("robust.cli.analyze", "analyze_checkpoint")),
    (["bench", "--width", "4", "--json", "b.json"], ("robust.cli.bench", "run_bench")),
    (["export", "run", "-o", "m.pt"], ("robust.cli.export", "load_model")),
])
def test_sigint_exits_130_everywhere_and_writes_nothing(tmp_path, run, monkeypatch, ctrl_c, args, work):
    import importlib

    monkeypatch.setattr(importlib.import_module(work[0]), work[1], _interrupt)
    before = snapshot(tmp_path)
    result = invoke_in(tmp_path, args)
    assert result.exit_code == 130, result.output
    assert "Aborted (SIGINT)" in result.output and "Traceback" not in result.output
    assert snapshot(tmp_path) == before
