"""The built-in datasets (CIFAR-10/100, SVHN, MNIST, Fashion-MNIST), offline first.

A dataset is looked for in ``data_dir``, then in known system folders (Debian's
``dataset-fashion-mnist`` under /usr/share/datasets/fashion-mnist), and only then downloaded
through torchvision.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd

from robust.data.types import ImageData
from robust.errors import DataError

SYSTEM_DIRS = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
}


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

    if name == "svhn":
        return tvd.SVHN(str(root), split="train" if train else "test", download=download)
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
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


# What a --data-dir folder needs for each built-in set (torchvision's layouts; the IDX files of the MNISTs).
EXPECTED_FILES = {
    "cifar10": "cifar-10-batches-py/ with data_batch_1 .. data_batch_5, test_batch and batches.meta (cifar-10-python.tar.gz "
               "from https://www.cs.toronto.edu/~kriz/cifar.html, unpacked)",
    "cifar100": "cifar-100-python/ with train, test and meta (cifar-100-python.tar.gz, unpacked)",
    "svhn": "train_32x32.mat and test_32x32.mat (http://ufldl.stanford.edu/housenumbers/)",
    "mnist": "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or not)",
    "fashion-mnist": "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
                     "(.gz or not)",
}

# The classes' names, in label order, where a built-in set has them.
CLASS_NAMES = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "mnist": tuple(str(d) for d in range(10)),
    "svhn": tuple(str(d) for d in range(10)),
}


def load_torchvision(name: str, root: Path, download: bool) -> ImageData | None:
    try:
        train = _torchvision_split(name, root, True, download)
        test = _torchvision_split(name, root, False, download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        return None
    return ImageData(name, *_as_tensors(train), *_as_tensors(test))
