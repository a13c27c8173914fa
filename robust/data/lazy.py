"""Images read lazily: :class:`LazyImages`, the picklable readers DataLoader workers run, normalization statistics.

- ``imagefolder``: torchvision's ImageFolder layout, ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``
  (or ``val/``); without a test folder a seeded 20% of the training images (the same split for
  every run) is the test set. Class folders are sorted by name (label 0 is the first); the images
  come in a fixed shuffled order, so ``--limit N`` takes a mix of every class.
- ``tensors``: an ``.npz`` or ``.pt`` file with ``x`` (uint8, NHWC or NCHW), ``y`` (integer labels)
  and optionally ``x_test``/``y_test`` and ``classes``.

Images are read through :class:`LazyImages`: indexing it gives a lazy subset, ``load()`` reads its
images into one uint8 (N, C, H, W) tensor. The in-memory mode loads the whole set once; the stream
mode keeps it lazy and :class:`robust.data.BatchLoader` reads each batch through DataLoader
workers. Both read the same pixels with the same function, so they give the same batches.

Normalization statistics come from the training images (all of them, or a fixed-seed sample of
:data:`STATS_SAMPLE` when there are more), computed exactly (float64 sums of integers), so both
modes get the same numbers.
"""

from __future__ import annotations

import atexit
import signal
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from robust.runtime import available_cpus
from robust.data.types import DatasetInfo, ImageData
from robust.errors import DataError
from PIL import Image

TEST_FRACTION = 0.2  # of the training images, when a dataset comes without a test set


SPLIT_SEED = 20_260_113  # fixed: the test split is a property of the data, not of a run's seed


STATS_SAMPLE = 10_000


READ_CHUNK = 256


GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}  # 16-bit gray (PNG, TIFF): scaled to 8 bits by the high byte


MAX_IMAGE_SIDE = 4096  # the largest side a decoded training image may have (a 4096 x 4096 RGB image is 48 MiB)


def to_8bit(im: "Image.Image", path: str) -> "Image.Image":
    """``im`` as an 8-bit mode PIL converts without clipping: 16-bit gray scaled by its high byte (x >> 8, so
    65535 -> 255, not clipped at 255); 32-bit integer and float images only when every pixel is a whole
    number in [0, 255] (then nothing changes), else DataError naming the file and its range."""
    if im.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8), "L")
    if im.mode in ("I", "F"):
        arr = np.asarray(im)
        low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if low < 0 or high > 255 or not np.array_equal(arr, np.round(arr)):
            kind = "32-bit integer" if im.mode == "I" else "floating-point"
            raise DataError(f"image {path} is a {kind} image (PIL mode {im.mode}) with pixel values in "
                            f"[{low:g}, {high:g}]; its scale is unknown, so it is not read: save it as an 8-bit "
                            "or 16-bit PNG")
        return Image.fromarray(arr.astype(np.uint8), "L")
    return im


class ReadFailure:
    """What a DataLoader worker returns instead of raising, so the error stays one line."""

    def __init__(self, message: str) -> None:
        self.message = message


def decode_image(path: str, channels: int, size: int | None) -> np.ndarray:
    """One image file as uint8 (C, H, W); with ``size``, shorter side resized to ``size`` then center-cropped."""

    try:
        with Image.open(path) as im:
            im = to_8bit(im, path).convert({1: "L", 3: "RGB", 4: "RGBA"}[channels])
            if size is not None and im.size != (size, size):
                w, h = im.size
                scale = size / min(w, h)
                w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
                im = im.resize((w2, h2), Image.BILINEAR)
                left, top = (w2 - size) // 2, (h2 - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read image {path} ({reason}); remove or replace the file") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class FileReader:
    """Decodes image files (PIL), all to ``channels`` and, with ``size``, to size x size."""

    def __init__(self, paths: Sequence[str], channels: int, size: int | None) -> None:
        self.paths, self.channels, self.size = list(paths), channels, size

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([decode_image(self.paths[i], self.channels, self.size) for i in indices])


class ArrayReader:
    """Rows of an array (in memory or memory-mapped), NCHW or NHWC, as NCHW."""

    def __init__(self, array, channels_last: bool) -> None:
        self.array, self.channels_last = array, channels_last

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        order = np.argsort(indices, kind="stable")  # sorted reads are sequential on a memory map
        rows = np.empty((len(indices), *self.array.shape[1:]), dtype=np.uint8)
        rows[order] = np.asarray(self.array[np.sort(indices)])
        return np.ascontiguousarray(rows.transpose(0, 3, 1, 2)) if self.channels_last else rows


class _Reads(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole batches: ``dataset[positions]`` -> uint8 tensor."""

    def __init__(self, images: "LazyImages") -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, positions):
        try:
            return torch.from_numpy(self.images.reader(self.images.index[np.asarray(positions)]))
        except DataError as exc:
            return ReadFailure(str(exc))


def read_batches(images: "LazyImages", batches: Sequence[np.ndarray], workers: int, pin_memory: bool = False,
                 prefetch: int = 4):
    """uint8 tensors for each batch of positions, in order; decoded by ``workers`` processes (0: here)."""
    if workers <= 0:
        for positions in batches:
            yield images.read(positions)
        return
    loader = torch.utils.data.DataLoader(
        _Reads(images), batch_size=None, sampler=list(batches), num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=prefetch, worker_init_fn=_worker_init)
    # Workers start with SIGINT/SIGTERM blocked (inherited), so a signal to the process group that
    # lands between their fork and _worker_init cannot kill them; ours stays pending until unblocked.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        iterator = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    _LIVE_READERS.add(iterator)
    try:
        for batch in iterator:
            if isinstance(batch, ReadFailure):
                raise DataError(batch.message)
            yield batch
    finally:
        iterator._shutdown_workers()


# Readers whose workers are still up. The workers ignore SIGTERM (see _worker_init), so they must be
# told to stop: a generator left suspended by an exception (Ctrl-C, SIGTERM) may outlive the
# program's last line, and multiprocessing's own exit handler would SIGTERM and then wait on them
# forever. This handler, registered after multiprocessing's, runs before it and stops them cleanly.
_LIVE_READERS: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _stop_live_readers() -> None:
    for iterator in list(_LIVE_READERS):
        iterator._shutdown_workers()


def _worker_init(_: int) -> None:
    """One thread per worker; SIGINT/SIGTERM are the training process's to handle.

    A terminal's Ctrl-C or a ``kill`` of the process group reaches the workers too; dying there
    would make the DataLoader raise in the middle of the step the trainer is finishing before it
    writes last.pt. The workers end when the training process closes the loader or exits.
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # blocked at fork; now ignored


class LazyImages:
    """Images read on demand: a reader and the indices of this set's images in it.

    Indexing (a slice or an index tensor) gives a lazy subset; ``load()`` reads the images into
    one uint8 (N, C, H, W) tensor; ``to(device)`` is ``load().to(device)``, so code written for
    tensors (validation batches ``x[i:j].to(device)``) reads just the rows it asks for.
    """

    dtype = torch.uint8

    def __init__(self, reader: Callable[[np.ndarray], np.ndarray], index: np.ndarray, image_shape: Sequence[int],
                 workers: int = 0) -> None:
        self.reader, self.index = reader, np.asarray(index, dtype=np.int64)
        self.image_shape, self.workers = tuple(int(s) for s in image_shape), workers

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.image_shape))

    def dim(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, key) -> "LazyImages":
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, (int, np.integer)):
            raise TypeError("index LazyImages with a slice or an index array; read one image with read([i])")
        return LazyImages(self.reader, self.index[key], self.image_shape, self.workers)

    def read(self, positions) -> torch.Tensor:
        """The images at ``positions`` (of this set) as a uint8 tensor, read here."""
        return torch.from_numpy(self.reader(self.index[np.asarray(positions, dtype=np.int64)]))

    def load(self, workers: int | None = None) -> torch.Tensor:
        """All images of this set as one uint8 (N, C, H, W) tensor."""
        out = torch.empty(self.shape, dtype=torch.uint8)
        positions = np.arange(len(self))
        chunks = [positions[i:i + READ_CHUNK] for i in range(0, len(self), READ_CHUNK)]
        workers = self.workers if workers is None else workers
        workers = min(workers, len(chunks)) if len(chunks) > 1 else 0  # one chunk: no process to start
        for chunk, batch in zip(chunks, read_batches(self, chunks, workers)):
            out[chunk[0]:chunk[-1] + 1] = batch
        return out

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.load().to(*args, **kwargs)


def channel_stats(read: Callable[[np.ndarray], torch.Tensor], n: int, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units over ``n`` images (or a fixed sample of STATS_SAMPLE)."""
    positions = np.arange(n)
    if n > STATS_SAMPLE:
        rng = np.random.default_rng(SPLIT_SEED)
        positions = np.sort(rng.choice(n, STATS_SAMPLE, replace=False))
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for i in range(0, len(positions), READ_CHUNK):
        x = read(positions[i:i + READ_CHUNK]).double()  # integers: the sums are exact in any order
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).clamp_min(1 / 255).tolist())


def seeded_test_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: a fixed-seed TEST_FRACTION of ``n`` examples is the test set."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = max(1, int(round(n * TEST_FRACTION)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


@dataclass(frozen=True)
class CustomSplit:
    """A custom dataset's training and test images (lazy, not yet read) with their int64 labels."""

    train_x: LazyImages
    train_y: torch.Tensor
    test_x: LazyImages
    test_y: torch.Tensor


def finish_custom_data(name: str, data_dir: Path, split: CustomSplit, classes: Sequence[str] | None,
                       num_classes: int, mode: str, workers: int, image_size: int | None,
                       source: dict[str, Any]) -> ImageData:
    """Statistics from the training images, then (memory mode) every image read once into a tensor."""
    train_x, test_x = split.train_x, split.test_x
    channels = train_x.shape[1]
    if mode == "memory":  # worker processes pay off for decoding files, not for copying arrays
        workers = workers if isinstance(train_x.reader, FileReader) else 0
        train_x, test_x = train_x.load(workers), test_x.load(workers)
        read = lambda pos: train_x[torch.from_numpy(pos)]  # noqa: E731
    else:
        read = train_x.read
    mean, std = channel_stats(read, len(train_x), channels)
    info = DatasetInfo(num_classes, channels, mean, std, True, tuple(classes) if classes else None)
    meta = {"dataset": name, "data_dir": str(data_dir.resolve()), "image_size": image_size,
            "classes": list(classes) if classes else None, "input_size": list(train_x.shape[1:]), **source}
    return ImageData(name, train_x, split.train_y, test_x, split.test_y, info=info, source=meta)


def choose_mode(mode: str, nbytes: int, budget: int | None) -> str:
    """memory or stream: ``auto`` keeps data of ``nbytes`` in memory when it fits ``budget``."""
    if mode not in ("auto", "memory", "stream"):
        raise DataError(f"unknown data mode {mode!r}; valid: auto, memory, stream")
    if mode == "memory" and budget is not None and nbytes > 2 * budget:  # budget is half the memory available
        raise DataError(f"the decoded images need {nbytes / 2**30:.1f} GiB but about {2 * budget / 2**30:.1f} GiB of memory "
                        "is available; pass --data-mode stream (or auto), or a smaller --image-size")
    if mode != "auto":
        return mode
    return "memory" if budget is None or nbytes <= budget else "stream"


def default_workers() -> int:
    """Decoding processes when none are asked for: the CPUs, at most 8."""
    return max(1, min(8, available_cpus()))
