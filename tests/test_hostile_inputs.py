"""Hostile input, "nothing lost": every refusal is exit code 2 with one `Error:` line naming the problem and the
fix, no traceback, nothing written or overwritten; Ctrl-C exits 130 keeping finished work.

Grouped by the class of problem: data changed without a word, settings mixed on resume, signals across
processes, tracebacks on unusual files and digits, resources without bounds, overwrites, empty values.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_refused, invoke_in, snapshot

from robust.checkpoint import build_checkpoint, save_checkpoint
from robust.config import TrainConfig
from robust.data import load_dataset
from robust.data.lazy import MAX_IMAGE_SIDE, choose_mode, decode_image
from robust.errors import ConfigError, DataError, ModelError, PeerFailed, TrainingInterrupted
from robust.eval.evaluation import evaluate
from robust.nn.external import ExternalModel, build_external
from robust.nn.factory import build_model
from robust.runtime import available_cpus
from robust.train.trainer import Trainer

FMNIST = "/usr/share/datasets/fashion-mnist"
REPO = Path(__file__).resolve().parents[1]
TINY = ["--width", "4", "--epochs", "1", "--steps", "1", "--no-channels-last", "--quiet", "--precision", "fp32",
        "--warmup-steps", "0", "--val-steps", "1"]


# ---- helpers ------------------------------------------------------------------------------------


def tensors_file(path, n=24, n_classes=3, size=8, channels=1, **extra) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    y = np.arange(n) % n_classes
    np.savez(path, **{"x": x, "y": y, **extra})
    return Path(path)


def tiny_config(out, **overrides) -> TrainConfig:
    base = dict(dataset="fashion-mnist", data_dir=FMNIST, width=4, epochs=1, batch_size=32, limit=64, steps=1, eps="0.1",
                val_split=0.1, val_limit=16, val_steps=1, warmup_steps=0, schedule="cosine", channels_last=False,
                quiet=True, precision="fp32", out=str(out))
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fmnist) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny_config(out), data=fmnist, log=lambda m: None).fit()
    return out


@pytest.fixture()
def run(tmp_path, trained) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


# =================================================================================================
# Data changed without a word
# =================================================================================================


def _gray16(path, values):
    Image.fromarray(np.asarray(values, dtype=np.uint16)).save(path)


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.array([[0, 255, 256, 4095], [32768, 40000, 65280, 65535]] * 2, dtype=np.uint16)
    _gray16(tmp_path / "a.png", values)
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    got = decode_image(str(tmp_path / "a.png"), 1, None)[0]
    assert np.array_equal(got, (values >> 8).astype(np.uint8))  # 40000 -> 156, not 255
    rgb = decode_image(str(tmp_path / "a.png"), 3, None)  # a folder of mixed modes reads it as RGB
    assert all(np.array_equal(rgb[c], got) for c in range(3))
    for split in ("train/a", "train/b"):
        (tmp_path / "f" / split).mkdir(parents=True)
        for i in range(3):
            _gray16(tmp_path / "f" / split / f"{i}.png", values // (i + 1))
    data = load_dataset("imagefolder", tmp_path / "f", workers=0)
    assert data.channels == 1 and int(data.train_x.max()) == 255 and 0 < data.mean[0] < 1
    assert len(torch.unique(data.train_x)) > 4  # grey levels survive, not only black and white


def test_float_and_32_bit_images_out_of_0_255_are_refused_in_range_read_exactly(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif is a floating-point image \(PIL mode F\).*save it as an 8-bit"):
        decode_image(str(tmp_path / "f.tif"), 1, None)
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(DataError, match=r"32-bit integer image .* \[70000, 70000\]"):
        decode_image(str(tmp_path / "i.tif"), 1, None)
    Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 4).save(tmp_path / "ok.tif")
    assert np.array_equal(decode_image(str(tmp_path / "ok.tif"), 1, None)[0], np.arange(64).reshape(8, 8) * 4)


def test_a_stray_label_is_refused_naming_it_and_its_index(tmp_path):
    y = np.arange(24) % 3
    y[7] = 10 ** 6
    tensors_file(tmp_path / "stray.npz", y=y)
    message = assert_refused(tmp_path, ["train", *TINY, "--dataset", "tensors", "--data-dir", "stray.npz", "--workers", "0",
                                 "--out", "r"], "label 1000000 is out of range", "at y[7]", "classes array")
    assert "at most one class per example" in message
    y_test = np.array([0, 1, 5])
    tensors_file(tmp_path / "t.npz", x_test=np.zeros((3, 1, 8, 8), np.uint8), y_test=y_test,
                 classes=np.array(["a", "b", "c"]))
    with pytest.raises(DataError, match=r"label 5 is out of range .* 0\.\.2 \(classes has 3 names\)\) at y_test\[2\]"):
        load_dataset("tensors", tmp_path / "t.npz", workers=0)


@pytest.mark.parametrize("classes, problem", [
    (np.array("abc"), "1-D array of at least 2 class names"),
    (np.array([["a", "b"], ["c", "d"]]), "1-D array"),
    (np.array(["a", "b", "a"]), "names a more than once"),
    (np.array(["a", " ", "c"]), "empty name at index 1"),
    (np.array([1.5, 2.5, 3.5]), "1-D array of at least 2 class names"),
])
def test_classes_that_are_not_a_list_of_names_are_refused(tmp_path, classes, problem):
    tensors_file(tmp_path / "c.npz", classes=classes)
    with pytest.raises(DataError, match=problem):
        load_dataset("tensors", tmp_path / "c.npz", workers=0)


def test_evaluation_refuses_labels_and_channels_the_model_does_not_have():
    model = build_model("preact_resnet18", "sabn", num_classes=3, in_channels=1, width=4)
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(DataError, match=r"label 7 of evaluation example 2 is outside the model's 3 classes \(0\.\.2\)"):
        evaluate(model, (x, torch.tensor([0, 1, 7, 2])), attacks="clean", eps=0.1, device="cpu")
    with pytest.raises(DataError, match="label -1 of evaluation example 0"):
        evaluate(model, (x, torch.tensor([-1, 1, 2, 2])), attacks="clean", eps=0.1, device="cpu")
    with pytest.raises(DataError, match=r"3 channel\(s\) but the model takes 1"):
        evaluate(model, (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 2])), attacks="clean",
                 eps=0.1, device="cpu")


def _checkpoint_on(tmp_path, data_file, classes=3, size=8):
    model = build_model("preact_resnet18", "sabn", num_classes=classes, in_channels=1, width=4)
    data = {"dataset": "tensors", "data_dir": str(data_file.resolve()), "input_size": [1, size, size], "image_size": None,
            "classes": None}
    save_checkpoint(build_checkpoint(model, dataset="tensors", data=data, eps=0.1, kind="train"), tmp_path / "m.pt")
    return tmp_path / "m.pt"


def test_eval_refuses_data_that_does_not_fit_the_checkpoint(tmp_path):
    _checkpoint_on(tmp_path, tensors_file(tmp_path / "own.npz"))
    tensors_file(tmp_path / "five.npz", n_classes=5)
    assert_refused(tmp_path, ["eval", "m.pt", "--attack", "clean", "--data-dir", "five.npz"],
            "has 5 classes but the checkpoint's model has 3", "--data-dir")
    tensors_file(tmp_path / "big.npz", size=12)
    assert_refused(tmp_path, ["eval", "m.pt", "--attack", "clean", "--data-dir", "big.npz"],
            "are 1x12x12", "trained on 1x8x8")
    tensors_file(tmp_path / "rgb.npz", channels=3)
    assert_refused(tmp_path, ["eval", "m.pt", "--attack", "clean", "--data-dir", "rgb.npz"], "3x8x8", "1x8x8")
    ok = invoke_in(tmp_path, ["eval", "m.pt", "--attack", "clean"])
    assert ok.exit_code == 0, ok.output


def test_eval_reads_a_compressed_npz_it_cannot_stream(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (24, 1, 8, 8), dtype=np.uint8)
    np.savez_compressed(tmp_path / "z.npz", x=x, y=np.arange(24) % 3)
    _checkpoint_on(tmp_path, tmp_path / "z.npz")
    result = invoke_in(tmp_path, ["eval", "m.pt", "--attack", "clean"])
    assert result.exit_code == 0, result.output


# =================================================================================================
# Settings mixed: a resumed grid trains its missing runs with its finished runs' settings
# =================================================================================================


COMPARE = ["compare", "--dataset", "fashion-mnist", "--data-dir", FMNIST, *TINY, "--limit", "64", "--norms", "bn",
           "--eval-limit", "8", "--attacks", "pgd10", "--eps", "0.1", "--out", "cmp"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compared")
    result = invoke_in(folder, COMPARE)
    assert result.exit_code == 0, result.output
    return folder


@pytest.mark.parametrize("flags, named", [
    (["--eps", "0.2"], "--eps 0.1, not 0.2"),
    (["--dataset", "mnist"], "--dataset fashion-mnist, not mnist"),
    (["--lr", "0.5"], "--lr 0.1, not 0.5"),
    (["--seed", "3"], "--seed 0, not 3"),
    (["--method", "trades"], "--method unset (the default), not trades"),
    (["--step-size", "0.01"], "--step-size unset (the default), not 0.01"),
    (["--no-fused"], "--fused true, not false"),
])
def test_compare_resume_refuses_settings_that_differ_from_the_grid(tmp_path, compared, flags, named):
    folder = Path(shutil.copytree(compared, tmp_path / "c"))
    message = assert_refused(folder, ["compare", "--out", "cmp", "--resume", "--data-dir", FMNIST, *flags], named,
                      "start a new comparison with another --out")
    assert "cannot resume cmp" in message


def test_compare_resume_with_the_same_values_is_no_change(tmp_path, compared):
    folder = Path(shutil.copytree(compared, tmp_path / "c"))
    result = invoke_in(folder, ["compare", "--out", "cmp", "--resume", "--data-dir", FMNIST, "--eps", "1/10", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "not training it again" in result.output


@pytest.mark.parametrize("content", ["[]", '{"config": 3}', '{"config": {}, "norms": 5, "attacks": []}', "\xff"])
def test_compare_resume_refuses_a_broken_compare_json(tmp_path, compared, content):
    folder = Path(shutil.copytree(compared, tmp_path / "c"))
    (folder / "cmp" / "compare.json").write_bytes(content.encode("latin-1"))
    assert_refused(folder, ["compare", "--out", "cmp", "--resume", "--data-dir", FMNIST], "--force")


# =================================================================================================
# Signals across processes
# =================================================================================================


def test_the_interrupt_errors_survive_pickling():
    again = pickle.loads(pickle.dumps(TrainingInterrupted(signal.SIGTERM, "stopped")))
    assert (type(again), again.signum, str(again), again.exit_code) == (TrainingInterrupted, signal.SIGTERM, "stopped", 143)
    peer = pickle.loads(pickle.dumps(PeerFailed("rank 1 failed", True)))
    assert (str(peer), peer.bad_input) == ("rank 1 failed", True)


def _start(folder, args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "robust.cli", *args], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(path_glob, folder, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if list(Path(folder).glob(path_glob)):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("sig, code, group", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
                         ids=["ctrl-c to the process group", "sigterm to compare alone"])
def test_ctrl_c_on_compare_jobs_2_exits_cleanly_and_keeps_the_runs(tmp_path, sig, code, group):
    args = ["compare", "--dataset", "fashion-mnist", "--data-dir", FMNIST, "--width", "4", "--epochs", "30", "--steps", "1",
            "--no-channels-last", "--quiet", "--precision", "fp32", "--warmup-steps", "0", "--limit", "256",
            "--batch-size", "16", "--save-every", "0", "--val-steps", "1", "--val-limit", "16", "--norms", "bn,sabn",
            "--eval-limit", "8", "--eps", "0.1", "--jobs", "2", "--out", "cmp"]
    proc = _start(tmp_path, args)
    try:
        assert _wait_for("cmp/bn/metrics.jsonl", tmp_path, 120) and _wait_for("cmp/sabn/metrics.jsonl", tmp_path, 60)
        if group:
            os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does: the whole process group
        else:
            os.kill(proc.pid, sig)  # compare alone: it stops its workers itself
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "BrokenProcessPool" not in err, err
    assert "rerun with --resume" in err
    for norm in ("bn", "sabn"):
        state = torch.load(tmp_path / "cmp" / norm / "last.pt", map_location="cpu", weights_only=False)
        assert state["epoch"] >= 0  # a loadable last.pt with finished epochs: the work is kept
        assert not (tmp_path / "cmp" / norm / ".lock").exists()


# =================================================================================================
# Tracebacks on unusual files, digits and models
# =================================================================================================


def _npz_with(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, raw in members.items():
            zf.writestr(name + ".npy", raw)


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _forged_npy(shape, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("mode", ["memory", "stream", "auto"])
def test_an_npz_member_that_declares_terabytes_is_refused_before_allocating(tmp_path, compression, mode):
    x = np.zeros((16, 1, 8, 8), np.uint8)
    _npz_with(tmp_path / "f.npz", {"x": _forged_npy((10 ** 12, 1, 8, 8), x.tobytes()), "y": _npy(np.arange(16) % 2)},
              compression)
    with pytest.raises(DataError, match=r"declares shape \(1000000000000, 1, 8, 8\) of uint8 \(58.2 TiB\) but holds 1 KiB"):
        load_dataset("tensors", tmp_path / "f.npz", mode=mode, workers=0)


def test_unusual_tensor_files_are_refused_in_one_line(tmp_path):
    x = torch.zeros(16, 1, 8, 8, dtype=torch.uint8)
    y = torch.arange(16) % 2
    cases = {
        "obj.npz": lambda p: np.savez(p, x=x.numpy(), y=y.numpy(), meta=np.array([1, "a"], dtype=object)),
        "bf16.pt": lambda p: torch.save({"x": x.bfloat16(), "y": y}, p),
        "ragged.pt": lambda p: torch.save({"x": x, "y": [[1], [1, 2]]}, p),
        "empty_axis.npz": lambda p: np.savez(p, x=np.zeros((16, 0, 8, 8), np.uint8), y=y.numpy()),
        "bool_y.npz": lambda p: np.savez(p, x=x.numpy(), y=np.ones(16, bool)),
        "float_x.pt": lambda p: torch.save({"x": x.float(), "y": y}, p),
        "classes_int.pt": lambda p: torch.save({"x": x, "y": y, "classes": 5}, p),
        "list.pt": lambda p: torch.save([x, y], p),
        "uint64.npz": lambda p: np.savez(p, x=x.numpy(), y=np.array([2 ** 64 - 1] + [0] * 15, np.uint64)),
        "truncated.npz": lambda p: (np.savez(p, x=x.numpy(), y=y.numpy()), p.write_bytes(p.read_bytes()[:300])),
    }
    for name, write in cases.items():
        write(tmp_path / name)
        assert_refused(tmp_path, ["train", *TINY, "--dataset", "tensors", "--data-dir", name, "--workers", "0", "--out", "r"],
                name)


@pytest.mark.parametrize("args, named", [
    (["train", "--epochs", "３"], "'３' has characters that are not ASCII"),
    (["train", "--seed", "٣"], "'٣'"),
    (["train", "--batch-size", "１６"], "'１６'"),
    (["train", "--lr", "０.1"], "'０.1'"),
    (["train", "--beta", "６"], "'６'"),
    (["train", "--eps", "８/255"], "eps '８/255' has digits that are not ASCII"),
    (["train", "--step-size", "２/255"], "step-size"),
    (["train", "--milestones", "1０,20"], "milestones"),
    (["train", "--keep-epochs", "²"], "keep-epochs '²'"),
    (["train", "--method", "trades", "--method-options", "beta=６"], "method-options"),
    (["train", "--eps", "1e400"], "too large"),
    (["train", "--eps", "1e999999999"], "out of range"),
    (["compare", "--seeds", "0,٣"], "seeds '0,٣'"),
    (["compare", "--select", "epoch:²"], "select 'epoch:²'"),
    (["compare", "--eval-limit", "٣"], "'٣'"),
    (["eval", "x.pt", "--limit", "٣"], "'٣'"),
    (["eval", "x.pt", "--attack", "pgd٢٠"], "attack 'pgd٢٠'"),
    (["eval", "x.pt", "--eps", "８/255"], "'８/255'"),
    (["eval", "x.pt", "--eps-sweep", "0,８/255"], "'８/255'"),
    (["analyze", "x.pt", "--eps", "８/255"], "'８/255'"),
    (["bench", "--iters", "２"], "'２'"),
    (["demo", "--seed", "３"], "'３'"),
])
def test_numbers_with_digits_that_are_not_ascii_are_refused(tmp_path, args, named):
    assert_refused(tmp_path, args, named)


def test_models_whose_forward_returns_no_logits_are_refused_at_build(tmp_path):
    with pytest.raises(ModelError, match=r"torchvision:googlenet returns a GoogLeNetOutputs \(a tuple\) in training mode"):
        build_external("torchvision:googlenet", "sabn", 10, 3, (0.5,) * 3, (0.25,) * 3)

    class Dict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(1)

        def forward(self, x):
            return {"logits": self.bn(x).mean((2, 3))}

    class Wrong(Dict):
        def forward(self, x):
            return self.bn(x).flatten(1)

    model = ExternalModel(Dict(), (0.5,), (0.25,), "timm:dicty", 10)
    with pytest.raises(ModelError, match="timm:dicty returns a dict in training mode, not a logits tensor"):
        model(torch.rand(2, 1, 8, 8))
    wrong = ExternalModel(Wrong(), (0.5,), (0.25,), "timm:wrong", 10).eval()
    with pytest.raises(ModelError, match=r"a tensor of shape \(2, 64\), not \(2, 10\) in eval mode"):
        wrong(torch.rand(2, 1, 8, 8))
    # through the CLI: one line, and nothing left behind
    tensors_file(tmp_path / "d.npz", size=32, channels=3)
    assert_refused(tmp_path, ["train", "--dataset", "tensors", "--data-dir", "d.npz", "--arch", "torchvision:googlenet", "--epochs",
                       "1", "--workers", "0", "--quiet", "--out", "r"], "torchvision:googlenet returns", "pick another")


def test_the_build_check_changes_nothing(monkeypatch):
    torch.manual_seed(5)
    build_external("torchvision:resnet18", "sabn", 10, 1, (0.5,), (0.25,))
    checked = torch.rand(3)
    monkeypatch.setattr("robust.nn.external.check_logits", lambda *args: None)
    torch.manual_seed(5)
    model = build_external("torchvision:resnet18", "sabn", 10, 1, (0.5,), (0.25,))
    assert torch.equal(torch.rand(3), checked)  # the check drew nothing from the RNG
    assert model.training and all(int(b) == 0 for n, b in model.state_dict().items() if n.endswith("num_batches_tracked"))


# =================================================================================================
# Resources without bounds
# =================================================================================================


def test_more_workers_than_cpus_are_refused(tmp_path):
    tensors_file(tmp_path / "d.npz")
    assert_refused(tmp_path, ["train", *TINY, "--dataset", "tensors", "--data-dir", "d.npz", "--workers", "1000", "--out", "r"],
            f"workers 1000 is more than the {available_cpus()} CPU(s)", f"--workers {available_cpus()} or fewer")


def test_an_image_size_too_large_to_decode_is_refused_naming_it(tmp_path):
    for split in ("train/a", "train/b"):
        (tmp_path / "f" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "f" / split / f"{i}.png")
    assert_refused(tmp_path, ["train", *TINY, "--dataset", "imagefolder", "--data-dir", "f", "--workers", "0", "--image-size",
                       "100000", "--out", "r"], "--image-size 100000 is too large", f"the largest is {MAX_IMAGE_SIDE}")
    for split in ("train/a", "train/b"):
        (tmp_path / "g" / split).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (MAX_IMAGE_SIDE + 1, 4)).save(tmp_path / "g" / split / f"{i}.png")
    assert_refused(tmp_path, ["train", *TINY, "--dataset", "imagefolder", "--data-dir", "g", "--workers", "0", "--out", "r"],
            f"are {MAX_IMAGE_SIDE + 1}x4, larger than {MAX_IMAGE_SIDE} on a side", "pass --image-size")


def test_memory_mode_beyond_the_memory_available_is_refused():
    with pytest.raises(DataError, match=r"need 9\.3 GiB but about 2\.0 GiB .* --data-mode stream"):
        choose_mode("memory", 10 ** 10, 2 ** 30)
    assert choose_mode("auto", 10 ** 10, 2 ** 30) == "stream" and choose_mode("memory", 10, None) == "memory"


# =================================================================================================
# Overwrites: a run's own files are never replaced by an output
# =================================================================================================


@pytest.mark.parametrize("args, named", [
    (["export", "run", "-o", "run/best.pt", "--force"], "is the file this command reads"),
    (["export", "run", "-o", "run/last.pt", "--force"], "the last.pt of the run folder"),
    (["export", "run/last.pt", "-o", "run/config.json", "--force"], "the config.json of the run folder"),
    (["eval", "run", "--attack", "clean", "--json", "run/best.pt", "--force"], "the best.pt of the run folder"),
    (["eval", "run", "--attack", "clean", "--json", "run/metrics.jsonl", "--force"], "metrics.jsonl"),
    (["plot", "run", "-o", "run/last.pt", "--force"], "the last.pt of the run folder"),
    (["analyze", "run", "-o", "run/best.pt", "--force"], "the best.pt of the run folder"),
])
def test_outputs_never_replace_a_runs_own_files_even_with_force(tmp_path, run, args, named):
    assert_refused(tmp_path, args, named, "not even with --force")


def test_export_never_writes_onto_its_input_file(tmp_path, run):
    shutil.copy(run / "best.pt", tmp_path / "model.pt")
    assert_refused(tmp_path, ["export", "model.pt", "-o", "model.pt", "--force"], "is the file this command reads")
    os.symlink(tmp_path / "model.pt", tmp_path / "link.pt")
    assert_refused(tmp_path, ["export", "model.pt", "-o", "link.pt", "--force"], "is the file this command reads")
    assert_refused(tmp_path, ["eval", "model.pt", "--attack", "clean", "--json", "model.pt", "--force"], "is the file this command reads")
    ok = invoke_in(tmp_path, ["export", "run", "-o", "exports/"])
    assert ok.exit_code == 0 and (tmp_path / "exports" / "run-adv.pt").is_file(), ok.output


def _image_folder_with_a_truncated_image(root: Path) -> Path:
    for split in ("train/a", "train/b", "test/a", "test/b"):
        (root / split).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(root / split / f"{i}.png")
    bad = root / "train" / "b" / "3.png"
    bad.write_bytes(bad.read_bytes()[:41])  # the header reads; decoding fails
    return root


def test_a_run_that_fails_in_its_first_epoch_leaves_nothing_that_blocks_its_rerun(tmp_path):
    _image_folder_with_a_truncated_image(tmp_path / "f")
    args = ["train", *TINY, "--dataset", "imagefolder", "--data-dir", "f", "--data-mode", "stream", "--workers", "0",
            "--batch-size", "4", "--val-split", "0", "--out", "r"]
    first = assert_refused(tmp_path, args, "cannot read image", "3.png")
    assert not (tmp_path / "r").exists()
    assert assert_refused(tmp_path, args, "cannot read image") == first  # the same error, not "already exists"


def test_a_forced_replace_that_fails_in_its_first_epoch_keeps_the_run_it_replaced(tmp_path, run):
    _image_folder_with_a_truncated_image(tmp_path / "f")
    before = snapshot(run)
    assert_refused(tmp_path, ["train", *TINY, "--dataset", "imagefolder", "--data-dir", "f", "--data-mode", "stream", "--workers",
                       "0", "--batch-size", "4", "--val-split", "0", "--out", "run", "--force"], "cannot read image")
    assert snapshot(run) == before  # config.json, metrics.jsonl, last.pt, best.pt: byte for byte


def test_a_forced_replace_drops_the_old_run_once_its_first_epoch_is_saved(tmp_path, run, fmnist):
    Trainer(tiny_config(run, seed=3), data=fmnist, force=True, log=lambda m: None).fit()
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    assert json.loads((run / "config.json").read_text())["seed"] == 3


# =================================================================================================
# Empty values
# =================================================================================================


@pytest.mark.parametrize("value", [",", " , ", ",,"])
def test_a_list_of_only_commas_is_empty(tmp_path, value):
    assert_refused(tmp_path, ["train", "--milestones", value], "milestones", "empty (only commas)")
    assert_refused(tmp_path, ["train", "--method", "trades", "--method-options", value], "method-options", "empty")
    (tmp_path / "c.toml").write_text(f'milestones = "{value}"\n')
    assert_refused(tmp_path, ["train", "--config", "c.toml"], "milestones", "empty")


# =================================================================================================
# Settings mixed on a train resume: only --epochs and how the run executes may change
# =================================================================================================


@pytest.mark.parametrize("flags, named", [
    (["--eps", "0.2"], "--eps 0.1 (given: 0.2)"),
    (["--seed", "5"], "--seed 0 (given: 5)"),
    (["--limit", "512"], "--limit 64 (given: 512)"),
    (["--method", "trades"], "--method unset (the default) (given: trades)"),
    (["--beta", "6"], "--method-options unset (the default) (given: beta=6.0)"),
    (["--lr", "0.05"], "--lr 0.1 (given: 0.05)"),
    (["--val-split", "0.2"], "--val-split 0.1 (given: 0.2)"),
    (["--val-limit", "8"], "--val-limit 16 (given: 8)"),
    (["--step-size", "0.01"], "--step-size unset (the default) (given: 0.01)"),
    (["--clean-weight", "0.3"], "--clean-weight unset (the default) (given: 0.3)"),
    (["--schedule", "multistep"], "--schedule cosine (given: multistep)"),
    (["--milestones", "0.5"], "--milestones 0.25,0.75 (given: 0.5)"),
    (["--ema", "0.9"], "--ema 0.0 (given: 0.9)"),
    (["--norm", "bn"], "--norm sabn (given: bn)"),
    (["--width", "8"], "--width 4 (given: 8)"),
    (["--recipe", "rice2020"], "--recipe unset (the default) (given: rice2020)"),
    (["--tensorboard", "tb"], "--tensorboard unset (the default) (given: tb)"),
    (["--no-fused"], "--fused true (given: false)"),
    (["--data-dir", "."], f"--data-dir {FMNIST} (given: .)"),
])
def test_train_resume_refuses_every_changed_setting_naming_saved_and_given(tmp_path, run, flags, named):
    message = assert_refused(tmp_path, ["train", "--out", "run", "--resume", "--epochs", "2", *flags], named,
                             "cannot resume run with other settings", "a resume may change only --epochs", one_line=True)
    assert message.count("(given:") == 1  # only the field that changed


def test_train_resume_names_every_changed_setting_at_once(tmp_path, run):
    message = assert_refused(tmp_path, ["train", "--out", "run", "--resume", "--eps", "0.2", "--seed", "5"],
                             "--eps 0.1 (given: 0.2)", "--seed 0 (given: 5)")
    assert message.count("(given:") == 2


def test_train_resume_refuses_a_changed_setting_from_a_toml_file(tmp_path, run):
    (tmp_path / "c.toml").write_text('eps = "0.2"\nlimit = 512\n')
    assert_refused(tmp_path, ["train", "--config", "c.toml", "--out", "run", "--resume"], "--eps 0.1 (given: 0.2)",
                   "--limit 64 (given: 512)")


def test_trainer_resume_refuses_a_changed_setting_before_writing(tmp_path, run, fmnist):
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"--seed 0 \(given: 5\)"):
        Trainer(tiny_config(run, seed=5, epochs=2), data=fmnist, resume=True, log=lambda m: None).fit()
    assert snapshot(run) == before


def test_train_resume_may_change_epochs_and_execution_and_keeps_the_saved_spelling(tmp_path, run):
    result = invoke_in(tmp_path, ["train", "--out", "run", "--resume", "--epochs", "2", "--eps", "1/10", "--threads", "1",
                                  "--save-every", "0", "--no-quiet", "--quiet", "--data-mode", "memory"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["eps"] == "0.1" and saved["threads"] == 1  # 1/10 is the run's 0.1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_resume_to_more_epochs_keeps_the_fraction_milestones_already_passed(tmp_path, fmnist):
    out = tmp_path / "run"
    Trainer(tiny_config(out, epochs=4, schedule="multistep"), data=fmnist, log=lambda m: None).fit()  # drops at 1, 3
    Trainer(tiny_config(out, epochs=6, schedule="multistep"), data=fmnist, resume=True, log=lambda m: None).fit()
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001, 0.001], rel=1e-12)  # not back up to 0.01 at 5
    assert json.loads((out / "config.json").read_text())["milestones"] == "1,3"


def test_an_old_run_saved_with_milestones_past_its_end_resumes_as_it_trained(tmp_path, run):
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "schedule": "multistep", "milestones": "50,150"}))
    last = torch.load(run / "last.pt", weights_only=True)
    save_checkpoint({**last, "config": {**last["config"], "schedule": "multistep", "milestones": "50,150"}}, run / "last.pt")
    result = invoke_in(tmp_path, ["train", "--out", "run", "--resume", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == 0.1  # the old default's milestones never fired in this run, and do not now


# =================================================================================================
# Milestones, recipes and sizes: refused before anything is written
# =================================================================================================


@pytest.mark.parametrize("args, named", [
    (["--schedule", "multistep", "--epochs", "10", "--milestones", "50,150"], "epoch 50 is not before the run's end"),
    (["--schedule", "multistep", "--epochs", "10", "--milestones", "5,10"], "epoch 10 is not before the run's end"),
    (["--schedule", "multistep", "--epochs", "3", "--milestones", "1,2,3"], "epoch 3 is not before the run's end"),
    (["--recipe", "rice2020", "--epochs", "10", "--milestones", "100,150"], "epoch 100 is not before the run's end"),
])
def test_a_milestone_past_the_last_epoch_is_refused(tmp_path, args, named):
    assert_refused(tmp_path, ["train", *TINY, "--data-dir", FMNIST, "--dataset", "fashion-mnist", "--out", "r", *args],
                   named, "fractions of the run", one_line=True)


def test_a_milestone_past_the_last_epoch_is_refused_from_toml(tmp_path):
    (tmp_path / "c.toml").write_text('epochs = 10\nschedule = "multistep"\nmilestones = "50,150"\n')
    assert_refused(tmp_path, ["train", "--config", "c.toml", "--out", "r"], "epoch 50 is not before the run's end")


def _extra(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (8, 1, 28, 28), dtype=np.uint8), y=np.arange(8) % 10)
    return path


@pytest.mark.parametrize("args, named", [
    (["--arch", "wide_resnet10_99999999"], "widen factor 99999999"),
    (["--arch", "wide_resnet1006_2"], "depth 1006"),
    (["--width", "100000000"], "width must be in [1, 4096]"),
    (["--width", "4000"], "billion parameters"),
    (["--arch", "wide_resnet70_256"], "billion parameters"),
    (["--batch-size", "100000"], "batch-size 100000 is above 65,536"),
    (["--extra-data", "e.npz", "--epoch-size", "1000000000000"], "epoch-size 1000000000000 is above 10,000,000"),
])
def test_sizes_without_bounds_are_refused_before_anything_is_written_and_a_rerun_is_possible(tmp_path, args, named):
    _extra(tmp_path / "e.npz")
    tiny = [a for a in TINY if a not in ("--width", "4")]
    command = ["train", *tiny, "--data-dir", FMNIST, "--dataset", "fashion-mnist", "--out", "r", *args]
    first = assert_refused(tmp_path, command, named, one_line=True)
    assert not (tmp_path / "r").exists()
    assert assert_refused(tmp_path, command, named) == first  # the same refusal, not "already exists"


def test_python_configs_refuse_the_same_sizes():
    for fields, named in [(dict(width=10 ** 8), "width"), (dict(arch="wide_resnet10_99999999"), "widen factor"),
                          (dict(batch_size=10 ** 6), "batch-size"), (dict(width=4000), "billion parameters")]:
        with pytest.raises(ConfigError, match=named):
            TrainConfig(**fields).validate()


# =================================================================================================
# One rule for comma lists, options given twice, tensorboard into another run
# =================================================================================================


@pytest.mark.parametrize("args, named", [
    (["train", "--milestones", "0.25,,0.75"], "milestones '0.25,,0.75' has an empty item"),
    (["train", "--milestones", "0.25,0.75,"], "has an empty item"),
    (["train", "--keep-epochs", "1,,2"], "keep-epochs '1,,2' has an empty item"),
    (["train", "--keep-epochs", "1,"], "keep-epochs '1,' has an empty item"),
    (["train", "--method", "trades", "--method-options", "beta=1,,gamma=2"], "has an empty item"),
    (["train", "--method", "trades", "--method-options", "beta=1,beta=2"], "gives beta twice"),
    (["train", "--method", "trades", "--method-options", "beta=1, beta=1"], "gives beta twice"),
    (["compare", "--norms", "bn,,sabn"], "norms 'bn,,sabn' has an empty item"),
    (["compare", "--attacks", "pgd5,,pgd10"], "has an empty item"),
])
def test_every_comma_list_refuses_empty_items_and_repeated_options(tmp_path, args, named):
    assert_refused(tmp_path, [*args, "--out", "r"], named)


def test_eval_attack_list_refuses_empty_items(tmp_path, run):
    assert_refused(tmp_path, ["eval", "run", "--attack", "pgd5,,pgd10"], "attack 'pgd5,,pgd10' has an empty item")


def test_method_options_given_twice_in_toml_are_refused(tmp_path):
    (tmp_path / "c.toml").write_text('method = "trades"\nmethod_options = "beta=1,beta=2"\n')
    assert_refused(tmp_path, ["train", "--config", "c.toml", "--out", "r"], "gives beta twice")


@pytest.mark.parametrize("where", ["run/tb", "run", "run/a/b"])
def test_tensorboard_inside_another_runs_folder_is_refused(tmp_path, run, where):
    message = assert_refused(tmp_path, ["train", *TINY, "--data-dir", FMNIST, "--dataset", "fashion-mnist", "--out", "new",
                                        "--tensorboard", where], f"--tensorboard {where} is inside the run folder",
                             "another run's")
    assert str(run) in message and not (tmp_path / "new").exists()


def test_trainer_takes_a_dict_and_refuses_other_types(tmp_path):
    config = Trainer(tiny_config(tmp_path / "r").to_dict()).config
    assert config == tiny_config(tmp_path / "r").validate()
    for wrong in (5, "runs/a", None):
        with pytest.raises(ConfigError, match="Trainer needs a TrainConfig or a dict"):
            Trainer(wrong)
    with pytest.raises(ConfigError, match="unknown config field"):
        Trainer({"epochz": 3})
    assert not (tmp_path / "r").exists()


def test_running_out_of_memory_in_training_is_one_line_and_leaves_a_rerunnable_folder(tmp_path, monkeypatch):
    def exhausted(self, epoch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "train_one_epoch", exhausted)
    args = ["train", *TINY, "--data-dir", FMNIST, "--dataset", "fashion-mnist", "--limit", "64", "--out", "r"]
    for _ in range(2):  # the second time the same error, not "already exists"
        result = invoke_in(tmp_path, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "out of memory while training (CUDA out of memory." in errors[0], result.output
        assert not [p for p in (tmp_path / "r").rglob("*") if p.is_file()]


def test_a_toml_list_with_an_empty_item_is_refused_as_a_comma_list_is(tmp_path):
    (tmp_path / "c.toml").write_text('norms = ["bn", "", "sabn"]\n')
    assert_refused(tmp_path, ["compare", "--config", "c.toml", "--out", "r"], "norms ['bn', '', 'sabn'] has an empty item")
