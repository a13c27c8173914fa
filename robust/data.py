"""Datasets as whole uint8 tensors, and a batch loader that augments on the device.

Offline first: a dataset is looked for in ``data_dir``, then in known system folders (Debian's
``dataset-fashion-mnist`` under /usr/share/datasets/fashion-mnist), and only then downloaded
through torchvision. The training set lives on the training device as one uint8 tensor; random
crop and flip run on whole batches (no DataLoader, no per-image PIL work).

Your own data (``imagefolder``, ``tensors``: :mod:`robust.sources`) may instead stream from disk:
the loader then reads each batch of indices through DataLoader workers and augments it exactly as
the in-memory path does, with the same random draws, so both give the same batches.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .config import DATASETS, DATA_MODES

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


CUSTOM_DATASETS = ("imagefolder", "tensors")


class DataError(RuntimeError):
    """The dataset could not be found or read; the message says where we looked and what to pass."""


class DatasetInfo(NamedTuple):
    """What a model needs to know about a dataset."""

    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # horizontal flip is a valid augmentation
    classes: tuple[str, ...] | None = None


@dataclass
class ImageData:
    """A dataset: images uint8 (N, C, H, W) as tensors (or :class:`robust.sources.LazyImages` when
    streamed), labels int64 (N,).

    ``info`` defaults to the built-in dataset's; ``source`` says where custom data came from (it
    is recorded in checkpoints, so evaluation finds the same data).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: DatasetInfo | None = None
    source: dict | None = None

    def __post_init__(self) -> None:
        if self.info is None:
            if self.name not in DATASET_INFO:
                raise DataError(f"ImageData {self.name!r} needs info=DatasetInfo(...): it is not a built-in dataset")
            self.info = DatasetInfo(*DATASET_INFO[self.name])

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def channels(self) -> int:
        return self.info.channels

    @property
    def mean(self) -> tuple[float, ...]:
        return self.info.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.info.std

    @property
    def flip(self) -> bool:
        return self.info.flip

    @property
    def streamed(self) -> bool:
        """True when the training images are read from disk batch by batch."""
        return not isinstance(self.train_x, torch.Tensor)

    def record(self) -> dict:
        """What a checkpoint keeps about the data: enough to find it again, and the input size."""
        return {"dataset": self.name, "input_size": list(self.train_x.shape[1:]), **(self.source or {})}


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


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True, *,
                 image_size: int | None = None, mode: str = "memory", budget: int | None = None,
                 workers: int | None = None) -> ImageData:
    """Load ``name`` from ``data_dir``, then system folders, then torchvision's download.

    ``imagefolder`` and ``tensors`` read ``data_dir`` (see :mod:`robust.sources`); for them ``mode``
    is ``memory`` (read once into tensors), ``stream`` (read batch by batch) or ``auto`` (memory when
    the decoded images fit ``budget`` bytes), ``image_size`` resizes folder images and ``workers``
    is the number of decoding processes (default: the CPUs, at most 8). Built-in datasets are
    always held in memory.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if mode not in DATA_MODES:
        raise DataError(f"unknown data mode {mode!r}; valid: {', '.join(DATA_MODES)}")
    if name in CUSTOM_DATASETS:
        from . import sources

        workers = sources.default_workers() if workers is None else int(workers)
        if workers < 0:
            raise DataError(f"workers must be >= 0 (0 reads in the training process), got {workers}")
        if name == "imagefolder":
            return sources.load_imagefolder(data_dir, image_size, mode, budget, workers)
        if image_size is not None:
            raise DataError("--image-size resizes image folders only; save the arrays at the size to train on")
        return sources.load_tensor_file(data_dir, mode, budget, workers)
    if image_size is not None:
        raise DataError(f"--image-size applies to --dataset imagefolder, not to {name}; drop it")
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


def memory_budget(device: torch.device | str | None = None) -> int:
    """Bytes of decoded images ``auto`` keeps in memory: half the available RAM (and, for a CUDA
    device, half its free memory, since the in-memory path holds the images there)."""
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    budget = available // 2
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = min(budget, free // 2)
    return budget


def split_train_val(data: ImageData, val_fraction: float, seed: int, limit: int | None = None,
                    val_limit: int | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """A run's (train, validation) tensors: a seeded ``val_fraction`` of the first ``limit`` training examples.

    Validation is drawn from the limited set, so a quick ``--limit`` run validates in proportion
    to what it trains on; ``val_limit`` caps the validation part further. Lazy (streamed) image
    sets index the same way and stay lazy.
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

RESIZED_CROP_FROM = 128  # images at least this large (shorter side) get random-resized crops
RESIZED_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults: area fraction, aspect ratio
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


def augmentation_for(height: int, width: int) -> dict:
    """The augmentation for an image size: padded random crops with padding 1/8 of the shorter side
    (4 pixels at 28-32, 8 at 64), random-resized crops from :data:`RESIZED_CROP_FROM` pixels on."""
    side = min(int(height), int(width))
    if side >= RESIZED_CROP_FROM:
        return {"pad": 0, "resized_crop": True}
    return {"pad": max(1, int(side / 8 + 0.5)), "resized_crop": False}


def to_float(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (float images pass through)."""
    out = x.float().div_(255) if x.dtype == torch.uint8 else x
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def crop_at(padded: torch.Tensor, size: tuple[int, int], dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """The ``size`` crop at offsets (dy[i], dx[i]) of each image of a padded batch, as one gather."""
    b, c, hp, wp = padded.shape
    h, w = size
    dy, dx = dy.to(padded.device), dx.to(padded.device)
    rows = (dy[:, None] + torch.arange(h, device=padded.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=padded.device))[:, None, None, :]
    batch = torch.arange(b, device=padded.device)[:, None, None, None]
    chans = torch.arange(c, device=padded.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_crop(padded: torch.Tensor, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` crop per image of an already padded batch, done as one gather."""
    b, _, hp, wp = padded.shape
    dy = torch.randint(0, hp - size[0] + 1, (b,), generator=generator)
    dx = torch.randint(0, wp - size[1] + 1, (b,), generator=generator)
    return crop_at(padded, size, dy, dx)


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Images with ``mask`` set flipped horizontally."""
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(-1), x)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2."""
    return flip_where(x, torch.rand(x.shape[0], generator=generator) < 0.5)


def draw_resized_crops(b: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(b, 4) boxes (top, left, h, w) in pixels: area fraction and log aspect ratio uniform as in
    torchvision's RandomResizedCrop, sides clamped to the image (instead of its ten retries)."""
    area = torch.empty(b).uniform_(*RESIZED_CROP_SCALE, generator=generator) * height * width
    log_lo, log_hi = (torch.tensor(r).log().item() for r in RESIZED_CROP_RATIO)
    ratio = torch.empty(b).uniform_(log_lo, log_hi, generator=generator).exp()
    w = (area * ratio).sqrt().clamp(max=width)
    h = (area / ratio).sqrt().clamp(max=height)
    top = torch.rand(b, generator=generator) * (height - h)
    left = torch.rand(b, generator=generator) * (width - w)
    return torch.stack([top, left, h, w], 1)


def resized_crop_at(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box resized (bilinear) back to the image size: one batched grid_sample."""
    import torch.nn.functional as F

    b, _, height, width = x.shape
    top, left, h, w = boxes.to(device=x.device, dtype=torch.float32).unbind(1)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = w / width, h / height
    theta[:, 0, 2] = (left + w / 2) / width * 2 - 1  # box centre in [-1, 1] (align_corners=False)
    theta[:, 1, 2] = (top + h / 2) / height * 2 - 1
    grid = F.affine_grid(theta, [b, 1, height, width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class BatchLoader:
    """Shuffled, augmented batches from images on the device or read from disk.

    ``x`` is a uint8 tensor (already on the device) or :class:`robust.sources.LazyImages`, whose
    batches ``workers`` DataLoader processes read (pinned for CUDA, prefetched) while the device
    trains. Either way the permutation and every augmentation draw come from one generator seeded
    by ``seed`` and the epoch, in the same order, and the augmentation runs on whole batches on
    the device: the two give the same batches, and a resumed run sees exactly the batches an
    uninterrupted one would. ``set_epoch(epoch, skip=k)`` yields ``(None, None)`` for the first
    ``k`` batches without reading them (their draws are still made).
    """

    def __init__(self, x, y: torch.Tensor, batch_size: int, *, augment: bool, flip: bool,
                 pad: int = 4, seed: int = 0, channels_last: bool = False, drop_last: bool = False,
                 shard: tuple[int, int] = (0, 1), resized_crop: bool = False, device: torch.device | str | None = None,
                 workers: int = 0) -> None:
        self.x, self.y = x, y
        self.batch_size, self.augment, self.flip, self.pad = batch_size, augment, flip, pad
        self.resized_crop = resized_crop
        self.seed, self.channels_last, self.drop_last = seed, channels_last, drop_last
        self.rank, self.world = shard
        self.streamed = not isinstance(x, torch.Tensor)
        self.device = torch.device(device) if device is not None else (y.device if self.streamed else x.device)
        self.workers = workers
        self.epoch, self.skip = 0, 0
        self._epoch_batches = None  # the latest pass (a generator), for close()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

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

    def _draw(self, b: int, generator: torch.Generator) -> dict:
        """One batch's augmentation parameters (drawn whether or not the batch is read)."""
        params = {}
        height, width = self.x.shape[-2:]
        if self.resized_crop:
            params["boxes"] = draw_resized_crops(b, height, width, generator)
        elif self.pad:
            params["dy"] = torch.randint(0, 2 * self.pad + 1, (b,), generator=generator)
            params["dx"] = torch.randint(0, 2 * self.pad + 1, (b,), generator=generator)
        if self.flip:
            params["flip"] = torch.rand(b, generator=generator) < 0.5
        return params

    def _apply(self, xb: torch.Tensor, params: dict) -> torch.Tensor:
        if "boxes" in params:
            xb = resized_crop_at(to_float(xb), params["boxes"])
        elif "dy" in params:  # pad the batch, not the dataset: no second, larger copy of the data
            xb = crop_at(torch.nn.functional.pad(xb, (self.pad,) * 4), xb.shape[-2:], params["dy"], params["dx"])
        if "flip" in params:
            xb = flip_where(xb, params["flip"])
        return xb

    def _pixels(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The uint8 images of each batch, on the device."""
        if not self.streamed:
            for idx in batches:
                yield self.x[idx.to(self.x.device)]
            return
        from .sources import read_batches

        pin = self.device.type == "cuda"
        reading = read_batches(self.x, [idx.numpy() for idx in batches], self.workers, pin_memory=pin)
        try:
            for xb in reading:
                yield xb.to(self.device, non_blocking=pin)
        finally:
            reading.close()  # stops the workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._epoch_batches = self._batches()
        return self._epoch_batches

    def close(self) -> None:
        """Stop the latest pass: a streamed one's reading workers end now (the trainer does it on any exit)."""
        running, self._epoch_batches = self._epoch_batches, None
        if running is not None:
            running.close()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = self._indices(generator)
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]
        skip = min(self.skip, len(batches))
        pixels = self._pixels(batches[skip:])
        try:
            for i, idx in enumerate(batches):
                params = self._draw(len(idx), generator) if self.augment else {}
                if i < skip:
                    yield None, None
                    continue
                xb = self._apply(next(pixels), params)
                yield to_float(xb, self.channels_last), self.y[idx.to(self.y.device)]
        finally:
            pixels.close()
