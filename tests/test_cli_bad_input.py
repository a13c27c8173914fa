"""The bad-input battery through the CLI: exit code 2, one `Error:` line naming the problem and the
fix, no traceback, and nothing written or overwritten (the folder tree is compared byte for byte).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from robust import build_model
from robust.checkpoint import build_checkpoint, save_checkpoint
from robust.config import TrainConfig

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TRAIN = ["train", "--dataset", "fashion-mnist", "--width", "4", "--epochs", "1", "--limit", "64", "--steps", "1",
         "--no-channels-last", "--quiet"]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _refused(folder: Path, args: list[str], *expected: str) -> str:
    """Run the CLI in ``folder``; assert the bad-input contract; return the error line."""
    before = _snapshot(folder)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1, result.output
    for text in expected:
        assert text in errors[0], errors[0]
    assert _snapshot(folder) == before  # nothing written or overwritten
    return errors[0]


# ---- training flags -------------------------------------------------------------------------------


@pytest.mark.parametrize("eps, problem", [
    ("8/0", "is not a number"), ("abc", "is not a number"), ("-1", "outside (0, 1]"), ("0", "outside (0, 1]"),
    ("2", "outside (0, 1]"),
])
def test_train_refuses_bad_eps(tmp_path, eps, problem):
    _refused(tmp_path, [*TRAIN, "--eps", eps, "--out", "run"], f"eps '{eps}'", problem, "8/255")


@pytest.mark.parametrize("flag", ["--batch-size", "--epochs", "--steps"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_train_refuses_non_positive_counts(tmp_path, flag, value):
    _refused(tmp_path, [*TRAIN, flag, value, "--out", "run"], f"{flag[2:]} must be >= 1, got {value}")


@pytest.mark.parametrize("flag, value, valid", [
    ("--norm", "groupnorm", "'bn', 'auxbn', 'sabn'"),
    ("--method", "trades", "'pgd', 'hybrid', 'fast'"), ("--dataset", "imagenet", "'cifar10'"),
])
def test_train_refuses_unknown_names(tmp_path, flag, value, valid):
    _refused(tmp_path, ["train", flag, value, "--out", "run"], f"'{value}' is not one of", valid)


def test_train_refuses_an_unknown_arch(tmp_path):  # not a click choice: torchvision:NAME and timm:NAME are open
    _refused(tmp_path, ["train", "--arch", "resnet9000", "--out", "run"], "unknown arch 'resnet9000'",
             "preact_resnet18", "torchvision:NAME")


@pytest.mark.parametrize("args, problem", [
    (["--nproc", "0"], "--nproc must be >= 1"), (["--save-every", "-1"], "save-every must be >= 0"),
    (["--limit", "0"], "limit must be >= 1"),
])
def test_train_refuses_bad_launch_options(tmp_path, args, problem):
    _refused(tmp_path, [*TRAIN, *args, "--out", "run"], problem)


def test_train_refuses_to_overwrite_an_existing_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    _refused(tmp_path, [*TRAIN, "--out", "run"], "already exists", "--resume", "--force")


# ---- checkpoints ----------------------------------------------------------------------------------


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
    "truncated": "not a readable checkpoint",
    "text": "not a readable checkpoint",
    "foreign": "not a robust checkpoint",
    "other_arch": "do not fit",
    "pickle": "was refused",
    "torch_pickle": "was refused",
}


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
    _refused(tmp_path, ["train", "--out", "run", "--resume"], problem)
    assert not marker.exists()  # the pickled code never ran


def test_train_resume_refuses_a_changed_architecture(tmp_path):
    run = _resume_folder(tmp_path, "missing", tmp_path / "ran")
    save_checkpoint(_tiny_checkpoint(epoch=0, optimizer={}, scheduler={"step": 0}), run / "last.pt")
    _refused(tmp_path, ["train", "--out", "run", "--resume", "--arch", "preact_resnet34"],
             "another model: arch 'preact_resnet18' (asked: 'preact_resnet34')", "drop those flags")


@pytest.mark.parametrize("kind", list(CHECKPOINT_PROBLEMS))
def test_eval_refuses_bad_checkpoints(tmp_path, kind):
    marker = tmp_path / "ran"
    (tmp_path / "bad").mkdir()
    paths = _bad_checkpoints(tmp_path / "bad", marker)
    path = tmp_path / "bad" / "missing.pt" if kind == "missing" else paths[kind]
    _refused(tmp_path, ["eval", str(path), "--limit", "8"], CHECKPOINT_PROBLEMS[kind])
    assert not marker.exists()


# ---- eval flags -----------------------------------------------------------------------------------


@pytest.fixture()
def good_checkpoint(tmp_path) -> Path:
    (tmp_path / "ckpt").mkdir()
    return save_checkpoint(_tiny_checkpoint(epoch=0), tmp_path / "ckpt" / "model.pt")


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
    _refused(tmp_path, ["eval", str(good_checkpoint), *args], problem)


# ---- data folders (offline) -------------------------------------------------------------------------


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
    _refused(tmp_path, [*TRAIN, "--data-dir", "data", "--out", "run"], problem, "data")


def test_train_refuses_a_truncated_gzip_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for f in FMNIST.iterdir():
        if f.name.startswith("train-labels"):
            (folder / f.name).write_bytes(f.read_bytes()[:1000])
        else:
            os.symlink(f, folder / f.name)
    _refused(tmp_path, [*TRAIN, "--data-dir", "data", "--out", "run"], "cannot read", "--data-dir")


# ---- your own data and model ------------------------------------------------------------------------

OWN = ["train", "--width", "4", "--epochs", "1", "--limit", "16", "--steps", "1", "--no-channels-last", "--quiet",
       "--workers", "0", "--out", "run"]


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
    _refused(tmp_path, [*OWN, "--dataset", "imagefolder", "--data-dir", "imgs"], "imgs/train is empty", "one folder of images per class")


def test_train_refuses_class_folders_that_differ(tmp_path):
    _folder(tmp_path, classes=("a", "b", "c"), test_classes=("a", "b", "d"))
    _refused(tmp_path, [*OWN, "--dataset", "imagefolder", "--data-dir", "imgs"],
             "class folders differ between train/ and test/", "only in train/: c", "only in test/: d")


@pytest.mark.parametrize("damage, problem", [("truncated", "truncated"), ("text", "cannot identify image file")])
def test_train_refuses_a_damaged_image(tmp_path, damage, problem):
    folder = _folder(tmp_path, test_classes=("a", "b"))
    bad = folder / "train" / "b" / "1.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-30])
    else:
        bad.write_text("not an image")
    _refused(tmp_path, [*OWN, "--dataset", "imagefolder", "--data-dir", "imgs"], f"cannot read image {bad.relative_to(tmp_path)}",
             problem, "remove or replace the file")


def test_train_refuses_mixed_sizes_without_image_size(tmp_path):
    _folder(tmp_path, sizes=((28, 28), (32, 32)))
    _refused(tmp_path, [*OWN, "--dataset", "imagefolder", "--data-dir", "imgs"], "differ in size", "28x28 (4 files)",
             "32x32 (2 files)", "--image-size N")


def test_train_refuses_imagefolder_without_data_dir(tmp_path):
    _refused(tmp_path, [*OWN, "--dataset", "imagefolder"], "--dataset imagefolder needs --data-dir")


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
    _refused(tmp_path, [*OWN, "--dataset", "tensors", "--data-dir", "data.npz"], "data.npz", problem)


@pytest.mark.parametrize("arch, problem", [
    ("torchvision:resnet19", "torchvision has no classification model 'resnet19' (did you mean resnet18"),
    ("torchvision:vit_b_16", "cannot be made dual-route: LayerNorm x25"),
    ("keras:resnet18", "write torchvision:NAME or timm:NAME"),
])
def test_train_refuses_unbuildable_architectures(tmp_path, arch, problem):
    _folder(tmp_path, test_classes=("a", "b"))
    _refused(tmp_path, [*OWN[:1], *OWN[3:], "--dataset", "imagefolder", "--data-dir", "imgs", "--arch", arch], problem)


def test_train_says_how_to_get_timm(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    _refused(tmp_path, [*OWN[:1], *OWN[3:], "--dataset", "fashion-mnist", "--arch", "timm:resnet18"],
             "needs timm, which is not installed", "pip install 'robust[timm]'")


def test_a_damaged_image_found_while_streaming_stops_in_one_line(tmp_path):
    folder = _folder(tmp_path, test_classes=("a", "b"), per_class=8)
    bad = folder / "train" / "a" / "5.png"
    bad.write_bytes(bad.read_bytes()[:-30])  # the header still reads: found only when decoded
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(cli, [*OWN, "--dataset", "imagefolder", "--data-dir", "imgs", "--data-mode", "stream",
                                          "--workers", "1", "--val-split", "0"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1 and "cannot read image imgs/train/a/5.png" in errors[0], result.output
