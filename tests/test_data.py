"""Dataset loading (real Fashion-MNIST, offline), the seeded split, and batched augmentation."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from robust.data.load import load_dataset
from robust.data.loader import Augmentation, BatchLoader, random_crop, random_flip, split_train_val
from robust.errors import DataError


def test_fashion_mnist_loads_from_the_system_folder(fmnist):
    assert fmnist.train_x.shape == (60000, 1, 28, 28) and fmnist.train_x.dtype == torch.uint8
    assert fmnist.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(fmnist.train_y).tolist() == [6000] * 10
    assert fmnist.num_classes == 10 and fmnist.channels == 1 and fmnist.flip


def test_split_is_seeded_disjoint_and_complete(fmnist_small):
    (tx, ty), (vx, vy) = split_train_val(fmnist_small, 0.1, seed=3)
    (tx2, _), (vx2, _) = split_train_val(fmnist_small, 0.1, seed=3)
    assert len(vy) == 400 and len(ty) == 3600
    assert torch.equal(vx, vx2) and torch.equal(tx, tx2)
    (_, _), (vx3, _) = split_train_val(fmnist_small, 0.1, seed=4)
    assert not torch.equal(vx, vx3)
    rows = {bytes(r.numpy()) for r in fmnist_small.train_x.flatten(1)}
    assert {bytes(r.numpy()) for r in torch.cat([tx, vx]).flatten(1)} == rows
    assert split_train_val(fmnist_small, 0, seed=0)[1] is None


def test_random_crop_equals_slicing_at_the_drawn_offsets():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    g = torch.Generator().manual_seed(0)
    out = random_crop(padded, (6, 6), g)
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 6])


def test_random_flip_flips_about_half():
    x = torch.arange(1000 * 4, dtype=torch.float32).view(1000, 1, 1, 4)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == x[:, 0, 0, 3])
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    assert 430 < int(flipped.sum()) < 570


def test_loader_is_a_function_of_seed_and_epoch(fmnist_small):
    x, y = fmnist_small.train_x[:300], fmnist_small.train_y[:300]
    loader = BatchLoader(x, y, 128, augment=True, flip=True, seed=1)
    batches = [(bx.clone(), by.clone()) for bx, by in loader]
    assert [len(by) for _, by in batches] == [128, 128, 44]
    assert batches[0][0].dtype == torch.float32 and 0 <= batches[0][0].min() and batches[0][0].max() <= 1
    again = list(BatchLoader(x, y, 128, augment=True, flip=True, seed=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], batches[0][0])
    assert sorted(torch.cat([by for _, by in batches]).tolist()) == sorted(y.tolist())


def test_loader_keywords_make_one_augmentation_and_an_unknown_one_is_refused(fmnist_small):
    x, y = fmnist_small.train_x[:8], fmnist_small.train_y[:8]
    assert BatchLoader(x, y, 4, augment=True, flip=True).augmentation == Augmentation(flip=True, pad=4, resized_crop=False)
    assert BatchLoader(x, y, 4, augment=True, flip=False, pad=0).augmentation == Augmentation(False, 0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'padding'.*flip, pad, resized_crop"):
        BatchLoader(x, y, 4, augment=True, flip=True, padding=2)
    with pytest.raises(TypeError, match="missing required keyword argument: 'flip'"):
        BatchLoader(x, y, 4, augment=True)


def test_missing_and_corrupt_files_give_a_data_error(tmp_path):
    with pytest.raises(DataError, match="looked in: .*nowhere.*--data-dir"):
        load_dataset("cifar10", tmp_path / "nowhere", download=False)  # not on this machine
    folder = tmp_path / "fm"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.copy(f"/usr/share/datasets/fashion-mnist/{name}", folder / name)
    with pytest.raises(DataError, match="missing t10k-labels"):
        load_dataset("fashion-mnist", folder, download=False)
    with gzip.open("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") as fh:
        labels = fh.read()
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(labels[:5000])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion-mnist", folder, download=False)

