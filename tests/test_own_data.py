"""Your own data and model: image folders, tensor files, streaming, torchvision/timm architectures.

Folders are written by the tests from real Fashion-MNIST images (PNG), a few at another size.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import invoke_in, tiny_config
from PIL import Image

import robust
from robust.checkpoint import load_checkpoint
from robust.data.lazy import (
    STATS_SAMPLE,
    ArrayReader,
    LazyImages,
    _worker_init,
    channel_stats,
    choose_mode,
    decode_image,
    read_batches,
)
from robust.data.load import load_dataset
from robust.data.loader import BatchLoader, augmentation_for, resized_crop_at
from robust.nn.norms import use_route
from robust.train.trainer import Trainer

CLASSES = ["bag", "coat", "trouser"]  # folder names; labels are their sorted positions
FMNIST_LABEL = {"bag": 8, "coat": 4, "trouser": 1}


def write_folder(root: Path, fmnist, per_class: int = 20, test_per_class: int = 6, odd_every: int = 0,
                 rgb: bool = False, test: str | None = "test") -> dict[str, list[np.ndarray]]:
    """An ImageFolder of real Fashion-MNIST images; every ``odd_every``-th one saved at 32x32."""
    written: dict[str, list[np.ndarray]] = {}
    splits = [("train", fmnist.train_x, fmnist.train_y, per_class)]
    if test:
        splits.append((test, fmnist.test_x, fmnist.test_y, test_per_class))
    for split, x, y, n in splits:
        for name in CLASSES:
            rows = (y == FMNIST_LABEL[name]).nonzero().flatten()[:n]
            folder = root / split / name
            folder.mkdir(parents=True)
            for j, i in enumerate(rows.tolist()):
                image = Image.fromarray(x[i, 0].numpy())
                if rgb:
                    image = image.convert("RGB")
                if odd_every and j % odd_every == odd_every - 1:
                    image = image.resize((32, 32), Image.BILINEAR)
                image.save(folder / f"{j:03d}.png")
                written.setdefault(f"{split}/{name}", []).append(x[i, 0].numpy())
    return written


def _quiet(msg: str) -> None:
    return None


# the whole (small) image folder, on the CPU, with checkpoints at epoch ends only
_config = partial(tiny_config, dataset="imagefolder", batch_size=16, limit=None, val_split=0.2, val_limit=None, lr=0.1,
                  schedule="multistep", device="cpu", save_every=0.0)


# ---------------------------------------------------------------------------------------------- data


@pytest.mark.precision
def test_imagefolder_reads_the_pixels_labels_and_statistics(tmp_path, fmnist):
    written = write_folder(tmp_path / "f", fmnist)
    data = load_dataset("imagefolder", tmp_path / "f", workers=0)
    assert data.info.classes == tuple(CLASSES) and data.num_classes == 3 and data.channels == 1
    assert data.train_x.shape == (60, 1, 28, 28) and data.test_x.shape == (18, 1, 28, 28)
    assert data.train_x.dtype == torch.uint8 and torch.bincount(data.train_y).tolist() == [20, 20, 20]
    for x, label in zip(data.train_x, data.train_y):  # every image is one of its class folder's, exactly
        assert any(np.array_equal(x[0].numpy(), w) for w in written[f"train/{CLASSES[label]}"])
    assert data.train_y[:12].unique().numel() == 3  # a fixed shuffled order, not class by class
    pixels = data.train_x.double() / 255
    assert data.mean == pytest.approx((pixels.mean().item(),), abs=1e-12)
    assert data.std == pytest.approx((pixels.std(unbiased=False).item(),), abs=1e-12)
    assert data.record()["classes"] == CLASSES and data.record()["input_size"] == [1, 28, 28]


def test_imagefolder_resizes_mixed_sizes_and_splits_without_a_test_folder(tmp_path, fmnist):
    write_folder(tmp_path / "f", fmnist, odd_every=5, test=None)
    data = load_dataset("imagefolder", tmp_path / "f", image_size=28, workers=0)
    assert len(data.train_y) == 48 and len(data.test_y) == 12  # a seeded 20% of train/
    again = load_dataset("imagefolder", tmp_path / "f", image_size=28, workers=0)
    assert torch.equal(data.test_x, again.test_x) and torch.equal(data.train_y, again.train_y)
    path = next((tmp_path / "f" / "train" / "bag").glob("004.png"))  # saved at 32x32
    with Image.open(path) as im:
        expected = np.asarray(im.resize((28, 28), Image.BILINEAR))
    assert np.array_equal(decode_image(str(path), 1, 28)[0], expected)
    big = load_dataset("imagefolder", tmp_path / "f", image_size=40, workers=0)
    assert big.train_x.shape[1:] == (1, 40, 40)


def test_tensor_files_round_trip(tmp_path, fmnist):
    x, y = fmnist.train_x[:50], fmnist.train_y[:50]
    xt, yt = fmnist.test_x[:10], fmnist.test_y[:10]
    nhwc = x.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "a.npz", x=nhwc, y=y.numpy(), x_test=xt.numpy(), y_test=yt.numpy())
    torch.save({"x": x, "y": y, "x_test": xt, "y_test": yt}, tmp_path / "b.pt")
    for name, mode in (("a.npz", "memory"), ("a.npz", "stream"), ("b.pt", "memory"), ("b.pt", "stream")):
        data = load_dataset("tensors", tmp_path / name, mode=mode, workers=0)
        assert data.streamed == (mode == "stream"), name
        train_x = data.train_x.load() if data.streamed else data.train_x
        test_x = data.test_x.load() if data.streamed else data.test_x
        assert torch.equal(train_x, x) and torch.equal(test_x, xt), (name, mode)
        assert torch.equal(data.train_y, y) and torch.equal(data.test_y, yt)
        assert data.num_classes == 10 and data.channels == 1
    np.savez_compressed(tmp_path / "c.npz", x=x.numpy(), y=y.numpy(), classes=np.array([f"c{i}" for i in range(12)]))
    data = load_dataset("tensors", tmp_path / "c.npz", workers=0)
    assert data.num_classes == 12 and data.info.classes[-1] == "c11"
    assert len(data.train_y) == 40 and len(data.test_y) == 10  # seeded test split
    assert torch.equal(torch.cat([data.train_x, data.test_x]).flatten(1).sum(1).sort().values,
                       x.flatten(1).sum(1).sort().values)


@pytest.mark.precision
def test_auto_mode_streams_what_does_not_fit_and_augmentation_scales_with_size(tmp_path, fmnist):
    assert choose_mode("auto", 100, budget=1000) == "memory" and choose_mode("auto", 2000, budget=1000) == "stream"
    write_folder(tmp_path / "f", fmnist, per_class=4, test_per_class=2)
    assert load_dataset("imagefolder", tmp_path / "f", mode="auto", budget=10, workers=0).streamed
    assert not load_dataset("imagefolder", tmp_path / "f", mode="auto", budget=10**9, workers=0).streamed
    assert augmentation_for(28, 28) == {"pad": 4, "resized_crop": False}  # as for the built-in datasets
    assert augmentation_for(64, 64)["pad"] == 8 and augmentation_for(16, 20)["pad"] == 2
    assert augmentation_for(224, 224) == {"pad": 0, "resized_crop": True}
    x = torch.rand(2, 3, 8, 10)
    whole = torch.tensor([[0.0, 0.0, 8.0, 10.0]] * 2)
    torch.testing.assert_close(resized_crop_at(x, whole), x, atol=1e-6, rtol=0)
    loader = BatchLoader(torch.zeros(64, 3, 224, 224, dtype=torch.uint8), torch.zeros(64, dtype=torch.long), 32,
                         augment=True, flip=True, **augmentation_for(224, 224))
    boxes = loader._draw(1000, torch.Generator().manual_seed(0))["boxes"]
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 224).all() and (left + w <= 224).all()
    assert (h * w / 224 ** 2).min() >= 0.08 - 1e-6


def test_streaming_gives_the_in_memory_batches_and_weights(tmp_path, fmnist):
    write_folder(tmp_path / "f", fmnist, per_class=16, test_per_class=4, odd_every=4)
    memory = load_dataset("imagefolder", tmp_path / "f", image_size=28, mode="memory", workers=0)
    stream = load_dataset("imagefolder", tmp_path / "f", image_size=28, mode="stream", workers=2)
    assert stream.streamed and not memory.streamed
    assert memory.mean == stream.mean and memory.std == stream.std
    loaders = [BatchLoader(d.train_x, d.train_y, 10, augment=True, flip=True, seed=3, workers=2, pad=4)
               for d in (memory, stream)]
    for loader in loaders:
        loader.set_epoch(1, skip=2)
    batches = [list(loader) for loader in loaders]
    assert [b[0] for b in batches[1][:2]] == [None, None] and len(batches[1]) == 5
    for (xa, ya), (xb, yb) in zip(*batches):
        assert (xa is None and xb is None) or (torch.equal(xa, xb) and torch.equal(ya, yb))

    results = []
    for mode in ("memory", "stream"):
        out = tmp_path / mode
        Trainer(_config(out, data_dir=str(tmp_path / "f"), image_size=28, data_mode=mode, workers=2),
                log=_quiet).fit()
        results.append(load_checkpoint(out / "last.pt"))
    a, b = results
    assert a["data"]["classes"] == CLASSES and a["data"]["input_size"] == [1, 28, 28]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["metrics"]["val_adv_robust"] == b["metrics"]["val_adv_robust"]


def test_the_co_guard_measures_the_same_fixed_batch_streamed_and_in_memory(tmp_path, fmnist):
    """One-step methods' guard takes its batch from the loader's images, which streamed are LazyImages."""
    write_folder(tmp_path / "f", fmnist, per_class=8, test_per_class=2)
    results = []
    for mode in ("memory", "stream"):
        trainer = Trainer(_config(tmp_path / mode, data_dir=str(tmp_path / "f"), data_mode=mode, workers=2,
                                  method="nfgsm", val_split=0.0), log=_quiet).setup()
        assert trainer.guard is not None and trainer.loader.streamed == (mode == "stream")
        assert trainer.guard.x.dtype == torch.float32 and trainer.guard.x.shape == (16, 1, 28, 28)
        results.append((trainer.guard.x, trainer.guard.y, trainer.fit()["co_guard_pgd_acc"]))
    (xa, ya, acc_a), (xb, yb, acc_b) = results
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and acc_a == acc_b


def test_stats_use_a_fixed_sample_of_large_sets():

    calls = []

    def read(positions):
        calls.append(positions)
        return torch.full((len(positions), 2, 1, 1), 51, dtype=torch.uint8)

    mean, std = channel_stats(read, STATS_SAMPLE + 500, 2)
    assert sum(len(p) for p in calls) == STATS_SAMPLE and mean == pytest.approx((0.2, 0.2)) and std == (1 / 255, 1 / 255)


# ---------------------------------------------------------------------------------------------- end to end


def _run(args: list[str], cwd: Path):
    return invoke_in(cwd, args)


def test_imagefolder_trains_and_evaluates_end_to_end(tmp_path, fmnist):
    write_folder(tmp_path / "f", fmnist, per_class=24, test_per_class=8, odd_every=6)
    result = _run(["train", "--dataset", "imagefolder", "--data-dir", "f", "--image-size", "28", "--width", "4",
                   "--epochs", "1", "--steps", "1", "--eps", "0.1", "--batch-size", "24", "--val-steps", "1",
                   "--precision", "fp32", "--no-channels-last", "--workers", "0", "--quiet", "--out", "run"], tmp_path)
    assert result.exit_code == 0, result.output
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    assert state["model_args"]["num_classes"] == 3 and state["model_args"]["in_channels"] == 1
    assert state["data"]["data_dir"] == str((tmp_path / "f").resolve()) and state["data"]["image_size"] == 28
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["epoch"] == 1 and "val_adv_robust" in line
    # eval rebuilds everything from the checkpoint, also from another folder
    (tmp_path / "elsewhere").mkdir()
    result = _run(["eval", str(tmp_path / "run"), "--attack", "pgd2", "--quiet", "--json", "e.json"], tmp_path / "elsewhere")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "elsewhere" / "e.json").read_text())
    assert report["n"] == 24 and set(report["routes"]) == {"clean", "adv"}
    model = robust.load_model(tmp_path / "run").eval()
    data = load_dataset("imagefolder", tmp_path / "f", image_size=28, workers=0)
    x = data.test_x.float() / 255
    with torch.no_grad(), use_route(model, "adv"):
        correct = int((model(x).argmax(1) == data.test_y).sum())
    assert report["routes"]["adv"]["clean"] == pytest.approx(100 * correct / 24, abs=1e-9)


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.precision
def test_torchvision_resnet18_trains_exports_and_loads_into_torchvision(tmp_path, fmnist):
    import torchvision

    write_folder(tmp_path / "f", fmnist, per_class=8, test_per_class=2, rgb=True)
    out = tmp_path / "run"
    config = _config(out, data_dir=str(tmp_path / "f"), arch="torchvision:resnet18", width=None, image_size=16,
                     batch_size=8, limit=16, val_split=0.25, val_limit=4, workers=0)
    Trainer(config, log=_quiet).fit()
    state = load_checkpoint(out / "last.pt")
    assert state["model_args"]["arch"] == "torchvision:resnet18" and state["model_args"]["width"] is None
    assert "bn1.stats.adv.running_mean" in state["model"] and "conv1.weight" in state["model"]
    assert state["model"]["bn1.stats.adv.num_batches_tracked"] > 0  # trained: the adv route moved
    model = robust.load_model(out / "last.pt").eval()  # rebuilt from the file alone

    result = _run(["export", str(out / "last.pt"), "--route", "adv", "-o", "adv.pt"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "torchvision.models.resnet18(num_classes=3)" in result.output
    exported = torch.load(tmp_path / "adv.pt", weights_only=True)
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(exported["model"])  # strict: the same keys and shapes
    plain.eval()
    mean = torch.tensor(exported["input_normalization"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(exported["input_normalization"]["std"]).view(1, -1, 1, 1)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), use_route(model, "adv"):
        expected = model(x)
    with torch.no_grad():
        torch.testing.assert_close(plain((x - mean) / std), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(robust.load_model(tmp_path / "adv.pt")(x), expected, atol=1e-5, rtol=0)

    resumed = Trainer(_config(out, data_dir=str(tmp_path / "f"), arch="torchvision:resnet18", width=None,
                              image_size=16, batch_size=8, limit=16, val_split=0.25, val_limit=4, workers=0,
                              epochs=2), resume=True, log=_quiet).fit()
    assert resumed["epoch"] == 2


@pytest.mark.precision
def test_timm_resnet_exports_into_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = robust.build_model("timm:resnet18", "sabn", num_classes=5, in_channels=1, mean=[0.3], std=[0.3])
    model.train()
    with robust.split_routes(model, 2):
        model(torch.rand(4, 1, 16, 16))  # both routes' statistics move away from the init
    model.eval()
    plain = timm.create_model("resnet18", num_classes=5, in_chans=1)
    plain.load_state_dict(robust.export_route(model, "adv").state_dict())
    plain.eval()
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_route(model, "adv"):
        torch.testing.assert_close(plain((x - 0.3) / 0.3), model(x), atol=1e-5, rtol=0)


def test_models_with_other_norms_are_refused_by_name():
    with pytest.raises(ValueError, match=r"timm:test_efficientnet_evos has norm layers .*: EvoNorm2dS0 x13"):
        robust.build_model("timm:test_efficientnet_evos", "sabn", 10, 3)
    with pytest.raises(ValueError, match="did you mean resnet18"):
        robust.build_model("torchvision:resnet19", "sabn", 10, 3)


def test_external_model_state_dict_is_the_library_models():
    import torchvision

    model = robust.build_model("torchvision:resnet18", "bn", 4, 3)
    assert set(model.state_dict()) == set(torchvision.models.resnet18(num_classes=4).state_dict())
    copy = robust.build_model("torchvision:resnet18", "bn", 4, 3)
    copy.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values()))
    assert isinstance(model.net.bn1, nn.Module) and model.normalize.mean.flatten().tolist() == pytest.approx(
        [0.485, 0.456, 0.406])


def test_sigterm_to_the_process_group_stops_a_streaming_run_cleanly(tmp_path, fmnist):
    """kill -TERM of the whole group (a terminal, a job scheduler) also reaches the DataLoader workers."""
    import os
    import signal
    import subprocess
    import sys
    import time

    write_folder(tmp_path / "f", fmnist, per_class=16, test_per_class=2)
    args = ["train", "--dataset", "imagefolder", "--data-dir", "f", "--data-mode", "stream", "--workers", "2",
            "--width", "4", "--epochs", "500", "--steps", "1", "--eps", "0.1", "--batch-size", "8", "--val-split", "0",
            "--precision", "fp32", "--no-channels-last", "--quiet", "--save-every", "0", "--out", "run"]
    proc = subprocess.Popen([sys.executable, "-m", "robust.cli", *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 143, rest
    finally:
        proc.kill()
    assert "stopped by SIGTERM" in rest and "Traceback" not in rest, rest
    assert load_checkpoint(tmp_path / "run" / "last.pt")["position"]["epoch"] >= 1


def _lazy(n: int = 64, workers: int = 2):

    pixels = np.arange(n * 64, dtype=np.uint8).reshape(n, 1, 8, 8)
    return pixels, LazyImages(ArrayReader(pixels, channels_last=False), np.arange(n), (1, 8, 8), workers=workers)


def test_a_group_signal_while_reading_workers_start_does_not_kill_them(monkeypatch):
    """SIGTERM that reaches a worker before its init ran (torch's own worker handler would kill it) is discarded."""
    import os
    import signal

    import robust.data.lazy as sources

    original = _worker_init

    def signalled_while_starting(worker_id: int) -> None:  # a kill of the process group, as the worker starts
        os.kill(os.getpid(), signal.SIGTERM)
        original(worker_id)

    monkeypatch.setattr(sources, "_worker_init", signalled_while_starting)
    pixels, images = _lazy()
    batches = [np.arange(i, i + 8) for i in range(0, 64, 8)]
    read = list(read_batches(images, batches, workers=2))
    assert all(torch.equal(b, torch.from_numpy(pixels[i])) for b, i in zip(read, batches))


def test_reading_workers_left_running_do_not_hold_up_the_exit(tmp_path):
    """A streamed pass abandoned in a reference cycle: the process still exits (its workers ignore SIGTERM)."""
    import subprocess
    import sys

    script = (
        "import numpy as np, sys\n"
        "from robust.data.lazy import ArrayReader, LazyImages, read_batches\n"
        "x = np.zeros((64, 1, 8, 8), dtype=np.uint8)\n"
        "images = LazyImages(ArrayReader(x, channels_last=False), np.arange(64), (1, 8, 8), workers=2)\n"
        "reading = read_batches(images, [np.arange(i, i + 8) for i in range(0, 64, 8)], 2)\n"
        "next(reading)\n"
        "cycle = [reading]; cycle.append(cycle)  # only the garbage collector would free it, after the exit handlers\n"
        "del reading\n"
        "print('done', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "done" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr
