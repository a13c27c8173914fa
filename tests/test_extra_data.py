"""Extra training data: the file's checks, the mixed sampler's shares and passes, soft labels in
every loss, exact resume inside an epoch, and a memory-mapped pool that is never read whole."""

from __future__ import annotations

import json
import os
import signal
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_refused, tiny_config

import robust.train.trainer as trainer_module
from robust.checkpoint import load_checkpoint
from robust.data.extra import ExtraData, load_extra_data
from robust.data.mixed import MixedBatchLoader, PoolStream
from robust.data.types import ImageData
from robust.errors import DataError, TrainingInterrupted
from robust.objectives import get_objective, hard_labels
from robust.objectives.mart import mart_loss
from robust.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(fmnist) -> ImageData:
    return ImageData("fashion-mnist", fmnist.train_x[:100], fmnist.train_y[:100], fmnist.test_x[:10], fmnist.test_y[:10])


def extra_file(path: Path, fmnist, n: int = 50, soft: bool = False, **changes) -> Path:
    """``n`` Fashion-MNIST training images from the far end of the set, with their labels (or
    probabilities: 0.91 on the label, 0.01 elsewhere)."""
    x, y = fmnist.train_x[-n:].numpy(), fmnist.train_y[-n:].numpy()
    labels = np.eye(10, dtype=np.float32)[y] * 0.9 + 0.01 if soft else y
    np.savez(path, **{"x": x, "y": labels, **changes})
    return path


def test_hard_and_soft_labels_are_read_and_checked(tmp_path, fmnist):
    hard = load_extra_data(extra_file(tmp_path / "h.npz", fmnist), (1, 28, 28), 10)
    assert hard.y.dtype == torch.int64 and torch.equal(hard.y, fmnist.train_y[-50:]) and not hard.soft
    assert torch.equal(hard.x, fmnist.train_x[-50:])
    soft = load_extra_data(extra_file(tmp_path / "s.npz", fmnist, soft=True), (1, 28, 28), 10)
    assert soft.soft and soft.y.shape == (50, 10)
    assert torch.allclose(soft.y.sum(1), torch.ones(50)) and torch.equal(soft.y.argmax(1), fmnist.train_y[-50:])


@pytest.mark.parametrize("changes, named", [
    ({"x": np.zeros((5, 1, 32, 32), np.uint8), "y": np.zeros(5, np.int64)}, "1x32x32 (C x H x W) but the dataset's are 1x28x28"),
    ({"x": np.zeros((5, 1, 28, 28), np.uint8), "y": np.full(5, 10)}, "label 10 at y[0] is outside 0..9"),
    ({"x": np.zeros((5, 1, 28, 28), np.uint8), "y": np.full((5, 3), 1 / 3, np.float32)}, "probabilities over 3 classes"),
    ({"x": np.zeros((5, 1, 28, 28), np.uint8), "y": np.full((5, 10), 0.2, np.float32)}, "y[0] is not a probability row"),
    ({"x": np.zeros((5, 1, 28, 28), np.uint8), "y": np.zeros(4, np.int64)}, "y has 4 rows but x has 5"),
])
def test_an_extra_file_that_does_not_fit_the_dataset_is_refused(tmp_path, changes, named):
    np.savez(tmp_path / "bad.npz", **changes)
    with pytest.raises(DataError, match=named.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        load_extra_data(tmp_path / "bad.npz", (1, 28, 28), 10)


def test_every_batch_has_the_stated_share_and_each_pass_visits_every_example_once():
    labelled_n, extra_n, batch, fraction = 37, 23, 10, 0.3
    x = torch.arange(labelled_n, dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 4, 4).contiguous()
    y = torch.zeros(labelled_n, dtype=torch.long)
    extra = ExtraData(torch.full((extra_n, 1, 4, 4), 200, dtype=torch.uint8),
                      torch.ones(extra_n, dtype=torch.long), Path("e"), "memory")
    loader = MixedBatchLoader(x, y, extra, batch, extra_fraction=fraction, num_classes=2, augment=True, flip=False, pad=0)
    assert (loader.labelled_count, loader.extra_count) == (7, 3)
    assert len(loader) == -(-labelled_n // 7)  # an epoch is one pass over the labelled pool
    for epoch in range(2):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            assert xb.shape[0] == batch and int(yb.sum()) == 3  # 3 of every 10 from the extra pool
            assert int((xb[:, 0, 0, 0] == 200 / 255).sum()) == 3
    for stream in loader.streams:  # each pass of a pool is one permutation of it
        n = stream.size
        assert sorted(stream.indices(0, n).tolist()) == list(range(n))
        assert sorted(stream.indices(n, n).tolist()) == list(range(n))
        assert not torch.equal(stream.indices(0, n), stream.indices(n, n))  # reshuffled when used up


def test_the_pool_streams_are_a_function_of_position_alone():
    a, b = PoolStream(11, 1, seed=3), PoolStream(11, 1, seed=3)
    whole = a.indices(0, 40)
    assert torch.equal(torch.cat([b.indices(i, 4) for i in range(0, 40, 4)]), whole)
    assert not torch.equal(PoolStream(11, 0, seed=3).indices(0, 11), whole[:11])  # each pool its own order


def test_soft_one_hot_labels_give_the_losses_of_hard_labels():
    torch.manual_seed(0)
    logits, natural = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.tensor([0, 3, 1, 2, 2, 0])
    one_hot = F.one_hot(y, 4).float()
    assert torch.equal(hard_labels(one_hot), y)
    for name in ("pgd", "trades", "mart", "fast"):
        objective = get_objective(name)(0.1, 0.025, 1, label_smoothing=0.1)
        assert torch.allclose(objective.loss(logits, one_hot, natural), objective.loss(logits, y, natural), atol=1e-6), name
    soft = torch.full((6, 4), 0.25)
    assert torch.allclose(get_objective("pgd")(0.1, 0.025, 1).ce(logits, soft),
                          (-F.log_softmax(logits, 1).mean(1)).mean(), atol=1e-6)  # CE against a uniform target
    assert torch.allclose(mart_loss(natural, logits, one_hot, 6.0), mart_loss(natural, logits, y, 6.0), atol=1e-6)


_config = partial(tiny_config, epochs=2, limit=64, seed=4, extra_fraction=0.5, epoch_size=96)


def _stop_at_step(monkeypatch, step: int) -> None:
    original, calls = trainer_module.train_step, {"n": 0}

    def stepping(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(trainer_module, "train_step", stepping)


@pytest.mark.parametrize("soft", [False, True])
def test_a_run_with_extra_data_resumes_inside_an_epoch_to_the_same_weights(tmp_path, data, fmnist, monkeypatch, soft):
    extra = str(extra_file(tmp_path / "extra.npz", fmnist, soft=soft))
    straight = Trainer(_config(tmp_path / "straight", extra_data=extra), data=data, log=lambda m: None).fit()
    _stop_at_step(monkeypatch, 5)  # epoch 2, step 2 of 3
    with pytest.raises(TrainingInterrupted):
        Trainer(_config(tmp_path / "cut", extra_data=extra), data=data, log=lambda m: None).fit()
    monkeypatch.undo()
    resumed = Trainer(_config(tmp_path / "cut", extra_data=extra), data=data, resume=True, log=lambda m: None).fit()
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("straight", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_adv_robust"] == straight["val_adv_robust"]
    lines = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]


def test_an_epoch_counts_epoch_size_examples(tmp_path, data, fmnist):
    extra = str(extra_file(tmp_path / "extra.npz", fmnist))
    messages = []
    Trainer(_config(tmp_path / "run", extra_data=extra, epochs=1), data=data, log=messages.append).fit()
    assert "+ 50 extra (hard labels) at 0.5 of every batch, 3 batches per epoch" in messages[0]  # 96 / 32
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["images_per_s"] > 0


def _anonymous_rss_bytes() -> int:
    """Resident memory of this process's own (anonymous) pages: a set read whole would land here. Pages
    of a memory-mapped file are the kernel's page cache (RssFile), shared and reclaimable, and how many
    of them get mapped per touched row depends on the file system (huge pages on tmpfs)."""
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("RssAnon:"))


def test_a_memory_mapped_extra_set_is_read_batch_by_batch_not_whole(tmp_path):
    n = 60_000  # 60,000 32x32x3 images: 184 MB on disk
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(n, 3, 32, 32))
    x[::1000] = 7
    x.flush()
    y = np.arange(n) % 10
    np.savez(tmp_path / "big.npz", x=x, y=y)  # uncompressed: memory-mappable
    del x
    os.remove(tmp_path / "x.npy")
    before = _anonymous_rss_bytes()
    extra = load_extra_data(tmp_path / "big.npz", (3, 32, 32), 10, mode="stream")
    labelled = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    loader = MixedBatchLoader(labelled, torch.zeros(64, dtype=torch.long), extra, 64, extra_fraction=0.5,
                              num_classes=10, augment=True, flip=True, pad=4)
    seen = sum(int(xb.shape[0]) for xb, _ in loader)
    grown = _anonymous_rss_bytes() - before
    assert extra.mode == "stream" and seen == 128
    assert grown < 30 * 2**20, f"anonymous resident memory grew by {grown / 2**20:.0f} MiB for a 184 MB extra set"


def test_bad_extra_data_values_are_refused_on_the_command_line(tmp_path, fmnist):
    base = ["train", "--dataset", "fashion-mnist", "--width", "4", "--epochs", "1", "--limit", "64", "--quiet",
            "--out", "run"]
    extra = extra_file(tmp_path / "extra.npz", fmnist)
    np.savez(tmp_path / "rgb.npz", x=np.zeros((4, 3, 28, 28), np.uint8), y=np.zeros(4, np.int64))
    assert_refused(tmp_path, [*base, "--extra-data", "extra.npz", "--extra-fraction", "1.5"], "extra-fraction", "1.5")
    assert_refused(tmp_path, [*base, "--extra-data", "extra.npz", "--extra-fraction", "-0.1"], "extra-fraction")
    assert_refused(tmp_path, [*base, "--extra-fraction", "0.5"], "--extra-fraction applies to --extra-data")
    assert_refused(tmp_path, [*base, "--epoch-size", "100"], "--epoch-size applies to --extra-data")
    assert_refused(tmp_path, [*base, "--extra-data", "rgb.npz"], "3x28x28", "1x28x28")
    assert_refused(tmp_path, [*base, "--extra-data", "missing.npz"], "missing.npz does not exist")
    assert extra.exists()
