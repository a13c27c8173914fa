"""Datasets as whole uint8 tensors, and a batch loader that augments on the device.

Offline first: a dataset is looked for in ``data_dir``, then in known system folders (Debian's
``dataset-fashion-mnist`` under /usr/share/datasets/fashion-mnist), and only then downloaded
through torchvision. The training set lives on the training device as one uint8 tensor; random
crop and flip run on whole batches (no DataLoader, no per-image PIL work).
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import DATASETS

SYSTEM_DIRS = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
}
DEFAULT_CACHE = Path(os.environ.get("ROBUST_DATA", Path.home() / ".cache" / "robust" / "data"))

# name: (classes, channels, mean, std, horizontal flip is a valid augmentation)
DATASET_INFO = {
    "cifar10": (10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": (100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "svhn": (10, 3, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False),
    "mnist": (10, 1, (0.1307,), (0.3081,), False),
    "fashion-mnist": (10, 1, (0.2860,), (0.3530,), True),
}


class DataError(RuntimeError):
    """The dataset could not be found or read; the message says where we looked and what to pass."""


@dataclass
class ImageData:
    """A dataset held as tensors: images uint8 (N, C, H, W), labels int64 (N,)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_classes(self) -> int:
        return DATASET_INFO[self.name][0]

    @property
    def channels(self) -> int:
        return DATASET_INFO[self.name][1]

    @property
    def mean(self) -> tuple[float, ...]:
        return DATASET_INFO[self.name][2]

    @property
    def std(self) -> tuple[float, ...]:
        return DATASET_INFO[self.name][3]

    @property
    def flip(self) -> bool:
        return DATASET_INFO[self.name][4]


# ---------------------------------------------------------------------------------------------
# Loading


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


def _load_idx_folder(name: str, folder: Path) -> ImageData | None:
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
    import torchvision.datasets as tvd

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


def _load_torchvision(name: str, root: Path, download: bool) -> ImageData | None:
    try:
        train = _torchvision_split(name, root, True, download)
        test = _torchvision_split(name, root, False, download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        return None
    return ImageData(name, *_as_tensors(train), *_as_tensors(test))


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> ImageData:
    """Load ``name`` from ``data_dir``, then system folders, then torchvision's download."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    folders = ([Path(data_dir)] if data_dir else []) + [Path(p) for p in SYSTEM_DIRS.get(name, [])]
    looked = []
    for folder in folders:
        looked.append(str(folder))
        if not folder.is_dir():
            continue
        if name in ("mnist", "fashion-mnist"):
            data = _load_idx_folder(name, folder)
        else:
            data = _load_torchvision(name, folder, download=False)
        if data is not None:
            return data
    root = Path(data_dir) if data_dir else DEFAULT_CACHE
    if download:
        created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
            data = _load_torchvision(name, root, download=True)
            if data is not None:
                return data
        except Exception as exc:  # network errors come in many types (URLError, OSError, ...)
            looked.append(f"download to {root} failed: {type(exc).__name__}")
        if created:
            shutil.rmtree(root, ignore_errors=True)  # leave no empty or partial folder behind
    else:
        looked.append("download disabled")
    hint = " (Debian: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise DataError(f"{name} not found; looked in: {'; '.join(looked)}. Pass --data-dir FOLDER with the dataset files{hint}")


def split_train_val(data: ImageData, val_fraction: float, seed: int, limit: int | None = None,
                    val_limit: int | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """A run's (train, validation) tensors: a seeded ``val_fraction`` of the first ``limit`` training examples.

    Validation is drawn from the limited set, so a quick ``--limit`` run validates in proportion
    to what it trains on; ``val_limit`` caps the validation part further.
    """
    x, y = (data.train_x, data.train_y) if not limit else (data.train_x[:limit], data.train_y[:limit])
    if val_fraction <= 0:
        return (x, y), None
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(y) * val_fraction)))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    if val_limit:
        val_idx = val_idx[:val_limit]
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


# ---------------------------------------------------------------------------------------------
# Batches


def to_float(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> float in [0, 1]."""
    out = x.float().div_(255)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def random_crop(padded: torch.Tensor, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` crop per image of an already padded batch, done as one gather."""
    b, c, hp, wp = padded.shape
    h, w = size
    dy = torch.randint(0, hp - h + 1, (b,), generator=generator).to(padded.device)
    dx = torch.randint(0, wp - w + 1, (b,), generator=generator).to(padded.device)
    rows = (dy[:, None] + torch.arange(h, device=padded.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=padded.device))[:, None, None, :]
    batch = torch.arange(b, device=padded.device)[:, None, None, None]
    chans = torch.arange(c, device=padded.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2."""
    mask = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


class BatchLoader:
    """Shuffled, augmented batches from tensors that already live on the device.

    Each epoch's order and augmentation come from ``seed`` and the epoch number alone, so a
    resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, augment: bool, flip: bool,
                 pad: int = 4, seed: int = 0, channels_last: bool = False, drop_last: bool = False,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.x, self.y = x, y
        self.batch_size, self.augment, self.flip, self.pad = batch_size, augment, flip, pad
        self.seed, self.channels_last, self.drop_last = seed, channels_last, drop_last
        self.rank, self.world = shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self, generator: torch.Generator) -> torch.Tensor:
        n = len(self.y)
        order = torch.randperm(n, generator=generator) if self.augment else torch.arange(n)
        if self.world > 1:  # every rank gets an equal share of the same permutation
            per_rank = n // self.world
            order = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        return order

    def __len__(self) -> int:
        n = len(self.y) // self.world
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = self._indices(generator)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size].to(self.x.device)
            if self.augment:
                xb = self.x[idx]
                if self.pad:  # pad the batch, not the dataset: no second, larger copy of the data
                    xb = random_crop(torch.nn.functional.pad(xb, (self.pad,) * 4), self.x.shape[-2:], generator)
                if self.flip:
                    xb = random_flip(xb, generator)
            else:
                xb = self.x[idx]
            yield to_float(xb, self.channels_last), self.y[idx]
