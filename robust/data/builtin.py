"""The built-in datasets (CIFAR-10/100, SVHN, MNIST, Fashion-MNIST), offline first.

A dataset is looked for in ``data_dir``, then in known system folders (Debian's
``dataset-fashion-mnist`` under /usr/share/datasets/fashion-mnist), and only then downloaded
through torchvision. Each set is one :class:`~robust.data.types.DatasetSpec` registered at the end of this
module: its shape facts, class names, the files a --data-dir needs, its system folders and its reader.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd

from robust.data.types import DATASET_SPECS, ImageData
from robust.errors import DataError

DEFAULT_CACHE = Path(os.environ.get("ROBUST_DATA", Path.home() / ".cache" / "robust" / "data"))


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}; delete it or pass --data-dir with good files") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; replace it with the original file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path} is truncated ({len(body)} of {int(np.prod(dims))} bytes); replace it")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


IDX_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def _find_idx(folder: Path, stem: str) -> Path | None:
    for sub in ("", "raw", "FashionMNIST/raw", "MNIST/raw"):
        for suffix in (".gz", ""):
            candidate = folder / sub / (stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def load_idx_folder(name: str, folder: Path) -> ImageData | None:
    """The MNIST-format set ``name`` from the IDX files in ``folder``; None when it holds none of them."""
    paths = {key: _find_idx(folder, stem) for key, stem in IDX_FILES.items()}
    if not any(paths.values()):
        return None
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"{folder} has only some {name} files (missing {', '.join(missing)}); add them or pass another --data-dir")
    arrays = {k: _read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise DataError(f"{folder}: {split} images and labels differ in count; the files are corrupt")
    return ImageData(
        name,
        torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_y"].astype(np.int64)),
        torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_y"].astype(np.int64)),
    )


def _torchvision_split(name: str, root: Path, train: bool, download: bool):
    cls = getattr(tvd, DATASET_SPECS.get(name).torchvision)
    if cls is tvd.SVHN:
        return cls(str(root), split="train" if train else "test", download=download)
    return cls(str(root), train=train, download=download)


def _as_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    x = torch.from_numpy(np.ascontiguousarray(data))
    if x.dim() == 3:  # (N, H, W) grayscale
        x = x.unsqueeze(1)
    elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # (N, H, W, C) -> (N, C, H, W)
        x = x.permute(0, 3, 1, 2).contiguous()
    return x, torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def load_torchvision(name: str, root: Path, download: bool) -> ImageData | None:
    """``name`` in torchvision's layout under ``root`` (downloaded there with ``download``); None when absent."""
    try:
        train = _torchvision_split(name, root, True, download)
        test = _torchvision_split(name, root, False, download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        return None
    return ImageData(name, *_as_tensors(train), *_as_tensors(test))


def read_torchvision_folder(name: str, folder: Path) -> ImageData | None:
    """``name`` in torchvision's layout in ``folder``, never downloaded; None when the folder does not hold it."""
    return load_torchvision(name, folder, download=False)


IDX = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
       "(.gz or not)")
DIGITS = tuple(str(d) for d in range(10))

# The built-in sets, in the order --dataset lists them; two readers serve them all (the decorator applied as a call).
DATASET_SPECS.register(
    "cifar10", summary="CIFAR-10: 10 classes, 3x32x32", num_classes=10, channels=3, mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616), flip=True, torchvision="CIFAR10",
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    expected_files="cifar-10-batches-py/ with data_batch_1 .. data_batch_5, test_batch and batches.meta "
                   "(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, unpacked)",
)(read_torchvision_folder)
DATASET_SPECS.register(
    "cifar100", summary="CIFAR-100: 100 classes, 3x32x32", num_classes=100, channels=3, mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762), flip=True, torchvision="CIFAR100",
    expected_files="cifar-100-python/ with train, test and meta (cifar-100-python.tar.gz, unpacked)",
)(read_torchvision_folder)
DATASET_SPECS.register(
    "svhn", summary="SVHN digits: 10 classes, 3x32x32", num_classes=10, channels=3, mean=(0.4377, 0.4438, 0.4728),
    std=(0.1980, 0.2010, 0.1970), flip=False, torchvision="SVHN", class_names=DIGITS,
    expected_files="train_32x32.mat and test_32x32.mat (http://ufldl.stanford.edu/housenumbers/)",
)(read_torchvision_folder)
DATASET_SPECS.register(
    "mnist", summary="MNIST digits: 10 classes, 1x28x28", num_classes=10, channels=1, mean=(0.1307,), std=(0.3081,),
    flip=False, torchvision="MNIST", class_names=DIGITS, expected_files=IDX, system_dirs=("/usr/share/datasets/mnist",),
)(load_idx_folder)
DATASET_SPECS.register(
    "fashion-mnist", summary="Fashion-MNIST: 10 classes, 1x28x28", num_classes=10, channels=1, mean=(0.2860,),
    std=(0.3530,), flip=True, torchvision="FashionMNIST", expected_files=IDX,
    system_dirs=("/usr/share/datasets/fashion-mnist",), hint=" (Debian: apt-get install dataset-fashion-mnist)",
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
)(load_idx_folder)
