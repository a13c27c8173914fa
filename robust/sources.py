"""Your own data: image folders and tensor files, in memory or streamed from disk.

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
import os
import signal
import weakref
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .data import DataError, DatasetInfo, ImageData

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif")
TEST_FOLDERS = ("test", "val")
TEST_FRACTION = 0.2  # of the training images, when a dataset comes without a test set
SPLIT_SEED = 20_260_113  # fixed: the test split is a property of the data, not of a run's seed
STATS_SAMPLE = 10_000
READ_CHUNK = 256
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


# ---------------------------------------------------------------------------------------------
# Readers: picklable objects that turn indices into uint8 (B, C, H, W) arrays (run in workers)


class ReadFailure:
    """What a DataLoader worker returns instead of raising, so the error stays one line."""

    def __init__(self, message: str) -> None:
        self.message = message


def decode_image(path: str, channels: int, size: int | None) -> np.ndarray:
    """One image file as uint8 (C, H, W); with ``size``, shorter side resized to ``size`` then center-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert({1: "L", 3: "RGB", 4: "RGBA"}[channels])
            if size is not None and im.size != (size, size):
                w, h = im.size
                scale = size / min(w, h)
                w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
                im = im.resize((w2, h2), Image.BILINEAR)
                left, top = (w2 - size) // 2, (h2 - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
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


# ---------------------------------------------------------------------------------------------
# Statistics and splits


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


def _finish(name: str, data_dir: Path, train_x, train_y, test_x, test_y, classes: Sequence[str] | None,
            num_classes: int, mode: str, workers: int, image_size: int | None, source: dict[str, Any]) -> ImageData:
    """Statistics from the training images, then (memory mode) every image read once into a tensor."""
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
    return ImageData(name, train_x, train_y, test_x, test_y, info=info, source=meta)


# ---------------------------------------------------------------------------------------------
# Image folders


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _scan(files: Sequence[Path]) -> tuple[Counter, Counter]:
    """Sizes and modes of the images (headers only)."""
    from PIL import Image

    sizes, modes = Counter(), Counter()
    for path in files:
        try:
            with Image.open(path) as im:
                sizes[im.size] += 1
                modes[im.mode] += 1
        except Exception as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DataError(f"cannot read image {path} ({reason}); remove or replace the file") from None
    return sizes, modes


def _collect(split_dir: Path, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(split_dir / name)
        if not files:
            raise DataError(f"class folder {split_dir / name} has no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...); "
                            "add images or remove the folder")
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    return paths, labels


def load_imagefolder(data_dir: str | Path | None, image_size: int | None = None, mode: str = "memory",
                     budget: int | None = None, workers: int = 0) -> ImageData:
    """An ImageFolder dataset (see the module docstring); ``mode`` memory, stream or auto (with ``budget`` bytes)."""
    if not data_dir:
        raise DataError("--dataset imagefolder needs --data-dir DIR, a folder with train/<class>/ images")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a folder; pass the folder that holds train/<class>/ images")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root} has no train/ folder; lay the images out as {root}/train/<class>/*.png "
                        f"(and {root}/test/<class>/*.png)")
    classes = _class_folders(train_dir)
    if not classes:
        raise DataError(f"{train_dir} is empty; put one folder of images per class in it")
    if len(classes) < 2:
        raise DataError(f"{train_dir} has one class folder ({classes[0]}); a classifier needs at least 2")
    test_dir = next((root / t for t in TEST_FOLDERS if (root / t).is_dir()), None)
    if test_dir is not None:
        test_classes = _class_folders(test_dir)
        if test_classes != classes:
            only_train = sorted(set(classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(classes))
            diff = "; ".join(part for part in (
                f"only in train/: {', '.join(only_train)}" if only_train else "",
                f"only in {test_dir.name}/: {', '.join(only_test)}" if only_test else "") if part)
            raise DataError(f"class folders differ between train/ and {test_dir.name}/ ({diff}); give both the same classes")
    paths, labels = _collect(train_dir, classes)
    test_paths, test_labels = _collect(test_dir, classes) if test_dir is not None else ([], [])
    sizes, modes = _scan([Path(p) for p in paths + test_paths])
    if image_size is None and len(sizes) > 1:
        common = ", ".join(f"{w}x{h} ({n} files)" for (w, h), n in sizes.most_common(3))
        raise DataError(f"the images in {root} differ in size ({common}{', ...' if len(sizes) > 3 else ''}); "
                        "pass --image-size N to resize them to N x N")
    if image_size is not None and image_size < 1:
        raise DataError(f"--image-size must be >= 1, got {image_size}")
    channels = 1 if set(modes) <= GRAY_MODES else 4 if set(modes) == {"RGBA"} else 3
    if image_size is not None and set(sizes) == {(image_size, image_size)}:
        image_size = None  # already that size: nothing to resize (the record keeps the request)
    (w, h) = sizes.most_common(1)[0][0]
    shape = (channels, image_size, image_size) if image_size else (channels, h, w)
    reader = FileReader(paths + test_paths, channels, image_size)
    n = len(paths)
    y = torch.tensor(labels + test_labels, dtype=torch.int64)
    if test_dir is not None:
        train_idx, test_idx = np.arange(n), np.arange(n, n + len(test_paths))
    else:
        train_idx, test_idx = seeded_test_split(n)
    # A fixed shuffled order, not class by class, so --limit (and eval --limit) take every class.
    rng = np.random.default_rng(SPLIT_SEED + 1)
    train_idx, test_idx = rng.permutation(train_idx), rng.permutation(test_idx)
    train_x, test_x = LazyImages(reader, train_idx, shape, workers), LazyImages(reader, test_idx, shape, workers)
    nbytes = train_x.nbytes + test_x.nbytes
    mode = choose_mode(mode, nbytes, budget)
    return _finish("imagefolder", root, train_x, y[train_idx], test_x, y[test_idx], classes, len(classes), mode,
                   workers, shape[-1] if image_size else None,
                   {"test": test_dir.name if test_dir is not None else f"seeded {TEST_FRACTION:.0%} of train/"})


def choose_mode(mode: str, nbytes: int, budget: int | None) -> str:
    """memory or stream: ``auto`` keeps data of ``nbytes`` in memory when it fits ``budget``."""
    if mode not in ("auto", "memory", "stream"):
        raise DataError(f"unknown data mode {mode!r}; valid: auto, memory, stream")
    if mode != "auto":
        return mode
    return "memory" if budget is None or nbytes <= budget else "stream"


# ---------------------------------------------------------------------------------------------
# Tensor files


def _npz_members(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype, bool, int | None]]:
    """name -> (shape, dtype, fortran order, data offset or None when compressed), from the headers only."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(fh)
                header_len = fh.tell()
            offset = None
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset + 26)
                name_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
                offset = info.header_offset + 30 + int(name_len) + int(extra_len) + header_len
            out[info.filename[:-4]] = (shape, dtype, fortran, offset)
    return out


def _read_tensor_file(path: Path, decide: Callable[[int], str]) -> tuple[dict[str, Any], str]:
    """The arrays of an .npz or .pt file and the mode ``decide(bytes of the images)`` chose.

    In stream mode the images (``x``, ``x_test``) stay memory-mapped; everything else is read.
    """
    images = ("x", "x_test")
    if path.suffix == ".npz":
        try:
            members = _npz_members(path)
            mode = decide(sum(int(np.prod(m[0])) * m[1].itemsize for k, m in members.items() if k in images))
            arrays: dict[str, Any] = {}
            with np.load(path, allow_pickle=False) as npz:
                for key, (shape, dtype, fortran, offset) in members.items():
                    if key in images and mode == "stream":
                        if offset is None:
                            raise DataError(f"{path} is compressed, so {key} cannot stream from disk; save it with "
                                            "np.savez (not savez_compressed) or torch.save, or pass --data-mode memory")
                        arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                                order="F" if fortran else "C")
                    else:
                        arrays[key] = npz[key]
            return arrays, mode
        except DataError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise DataError(f"{path} is not a readable .npz file ({reason}); save it with np.savez(FILE, x=..., y=...)") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt zip, pickled code refused, ...
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{path} is not a readable tensor file ({reason}); save a dict of tensors with "
                        "torch.save({'x': x, 'y': y}, FILE)") from None
    if not isinstance(loaded, dict):
        raise DataError(f"{path} holds a {type(loaded).__name__}, not a dict; save torch.save({{'x': x, 'y': y}}, FILE)")
    mode = decide(sum(v.nbytes for k, v in loaded.items() if k in images and isinstance(v, torch.Tensor)))
    arrays = {}
    for key, value in loaded.items():
        if isinstance(value, torch.Tensor):
            value = value.numpy() if key in images and mode == "stream" else value.clone().numpy()
        arrays[key] = value
    return arrays, mode


def _layout(x, path: Path, key: str) -> tuple[bool, tuple[int, int, int]]:
    """(channels last?, (C, H, W)) of an image array; DataError when it is not uint8 images."""
    if getattr(x, "dtype", None) != np.uint8:
        raise DataError(f"{path}: {key} must be uint8 images (0-255), got {getattr(x, 'dtype', type(x).__name__)}; "
                        f"convert with (x * 255).round().astype(np.uint8)")
    if x.ndim == 3:
        raise DataError(f"{path}: {key} has shape {tuple(x.shape)}; add the channel axis, e.g. x[:, None] for (N, 1, H, W)")
    if x.ndim != 4:
        raise DataError(f"{path}: {key} must be 4-D images (N, C, H, W) or (N, H, W, C), got shape {tuple(x.shape)}")
    n, a, b, c = x.shape
    if a == c:
        raise DataError(f"{path}: cannot tell the channel axis of {key} with shape {tuple(x.shape)}; "
                        "save it as (N, C, H, W) with C < H, W")
    return (True, (c, a, b)) if c < a else (False, (a, b, c))


def _labels(y, path: Path, key: str, n: int) -> torch.Tensor:
    if y is None:
        raise DataError(f"{path} has {key.replace('y', 'x')} but no {key}; save the labels too")
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} must be a 1-D array of integer labels, got {y.dtype} of shape {y.shape}")
    if len(y) != n:
        raise DataError(f"{path}: {key} has {len(y)} labels but {key.replace('y', 'x')} has {n} images; they must match")
    return torch.from_numpy(y.astype(np.int64))


def load_tensor_file(path: str | Path | None, mode: str = "memory", budget: int | None = None,
                     workers: int = 0) -> ImageData:
    """The ``tensors`` dataset (see the module docstring); ``mode`` memory, stream or auto."""
    if not path:
        raise DataError("--dataset tensors needs --data-dir FILE.npz (or .pt) with arrays x and y")
    path = Path(path)
    if path.suffix not in (".npz", ".pt") or not path.is_file():
        what = "does not exist" if not path.exists() else "is not an .npz or .pt file"
        raise DataError(f"--data-dir {path} {what}; pass a file saved with np.savez(FILE.npz, x=..., y=...) or torch.save")
    arrays, mode = _read_tensor_file(path, lambda nbytes: choose_mode(mode, nbytes, budget))
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path} has {', '.join(sorted(arrays)) or 'no arrays'}; it needs x (images) and y (labels)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path} has {'x_test' if 'x_test' in arrays else 'y_test'} without "
                        f"{'y_test' if 'x_test' in arrays else 'x_test'}; save both or neither")
    last, shape = _layout(arrays["x"], path, "x")
    y = _labels(arrays["y"], path, "y", len(arrays["x"]))
    if len(y) < 2:
        raise DataError(f"{path} holds {len(y)} image(s); a dataset needs at least 2")
    if "x_test" in arrays:
        last_test, test_shape = _layout(arrays["x_test"], path, "x_test")
        if test_shape != shape:
            raise DataError(f"{path}: x_test images are {test_shape} (C, H, W) but x images are {shape}; they must match")
        y_test = _labels(arrays["y_test"], path, "y_test", len(arrays["x_test"]))
        train_x = LazyImages(ArrayReader(arrays["x"], last), np.arange(len(y)), shape, workers)
        test_x = LazyImages(ArrayReader(arrays["x_test"], last_test), np.arange(len(y_test)), shape, workers)
        train_y, test_y, test_note = y, y_test, "x_test"
    else:
        train_idx, test_idx = seeded_test_split(len(y))
        images = ArrayReader(arrays["x"], last)
        train_x, test_x = LazyImages(images, train_idx, shape, workers), LazyImages(images, test_idx, shape, workers)
        train_y, test_y, test_note = y[train_idx], y[test_idx], f"seeded {TEST_FRACTION:.0%} of x"
    classes = arrays.get("classes")
    classes = [str(c) for c in np.asarray(classes).tolist()] if classes is not None else None
    labels = torch.cat([train_y, test_y])
    num_classes = len(classes) if classes else int(labels.max()) + 1
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        valid = f"0..{num_classes - 1} (classes has {num_classes} names)" if classes else "0 or more"
        raise DataError(f"{path}: label {int(bad[0])} is out of range (labels must be {valid}); fix y/y_test")
    if num_classes < 2:
        raise DataError(f"{path}: every label is {int(labels[0])}; a classifier needs at least 2 classes")
    return _finish("tensors", path, train_x, train_y, test_x, test_y, classes, num_classes, mode, workers, None,
                   {"test": test_note})


def default_workers() -> int:
    """Decoding processes when none are asked for: the CPUs, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
