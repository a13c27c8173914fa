"""``--dataset tensors``: an ``.npz`` or ``.pt`` file with ``x`` (uint8, NHWC or NCHW), ``y`` (integer labels)
and optionally ``x_test``/``y_test`` and ``classes``; members are checked before anything is read.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from robust.data.lazy import (TEST_FRACTION, ArrayReader, CustomSplit, LazyImages, choose_mode, finish_custom_data,
                              seeded_test_split)
from robust.data.types import ImageData
from robust.errors import DataError, unreadable_file


def _size(nbytes: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


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
            try:
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            except TypeError:
                declared = None
            if dtype.hasobject:
                raise DataError(f"{path}: member {info.filename} holds Python objects ({dtype}), not numbers; "
                                "save numeric arrays (x uint8, y integers) and classes as strings")
            held = info.file_size - header_len
            if declared is not None and declared != held:
                raise DataError(f"{path}: member {info.filename} declares shape {tuple(shape)} of {dtype} "
                                f"({_size(declared)}) but holds {_size(max(held, 0))}; the file is truncated or was not "
                                "written by np.savez: save it again with np.savez(FILE, x=..., y=...)")
            offset = None
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset + 26)
                name_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
                offset = info.header_offset + 30 + int(name_len) + int(extra_len) + header_len
                if declared is not None and offset + declared > path.stat().st_size:
                    raise DataError(f"{path}: member {info.filename} declares {_size(declared)} past the end of the "
                                    "file; the file is truncated: save it again with np.savez(FILE, x=..., y=...)")
            out[info.filename[:-4]] = (shape, dtype, fortran, offset)
    return out


def read_tensor_file(path: Path, decide: Callable[[int, bool], str]) -> tuple[dict[str, Any], str]:
    """The arrays of an .npz or .pt file and the mode ``decide(bytes of the images, can stream)`` chose.

    In stream mode the images (``x``, ``x_test``) stay memory-mapped; everything else is read.
    """
    images = ("x", "x_test")
    if path.suffix == ".npz":
        try:
            members = _npz_members(path)
            mode = decide(sum(int(np.prod(m[0], dtype=object)) * m[1].itemsize for k, m in members.items() if k in images),
                          all(m[3] is not None for k, m in members.items() if k in images))
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
        except MemoryError:
            raise DataError(f"{path} holds more data than fits in memory; save it uncompressed (np.savez) and pass "
                            "--data-mode stream") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, TypeError, zipfile.LargeZipFile,
                NotImplementedError, OverflowError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise DataError(f"{path} is not a readable .npz file ({reason}); save it with np.savez(FILE, x=..., y=...)") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt zip, pickled code refused, ...
        raise DataError(unreadable_file(path, exc, "a tensor file", "save a dict of tensors with "
                                        "torch.save({'x': x, 'y': y}, FILE)")) from None
    if not isinstance(loaded, dict):
        raise DataError(f"{path} holds a {type(loaded).__name__}, not a dict; save torch.save({{'x': x, 'y': y}}, FILE)")
    mode = decide(sum(v.nbytes for k, v in loaded.items() if k in images and isinstance(v, torch.Tensor)), True)
    arrays = {}
    for key, value in loaded.items():
        if isinstance(value, torch.Tensor):
            try:
                value = value.numpy() if key in images and mode == "stream" else value.clone().numpy()
            except MemoryError:
                raise DataError(f"{path}: {key} ({_size(value.nbytes)}) does not fit in memory; pass --data-mode stream") from None
            except (TypeError, RuntimeError) as exc:  # a dtype numpy has no match for (bfloat16, complex32...)
                reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                raise DataError(f"{path}: {key} cannot be read as an array ({reason}); save x as uint8 and y as int64") from None
        arrays[key] = value
    return arrays, mode


def image_layout(x, path: Path, key: str) -> tuple[bool, tuple[int, int, int]]:
    """(channels last?, (C, H, W)) of an image array; DataError when it is not uint8 images."""
    if getattr(x, "dtype", None) != np.uint8:
        raise DataError(f"{path}: {key} must be uint8 images (0-255), got {getattr(x, 'dtype', type(x).__name__)}; "
                        f"convert with (x * 255).round().astype(np.uint8)")
    if x.ndim == 3:
        raise DataError(f"{path}: {key} has shape {tuple(x.shape)}; add the channel axis, e.g. x[:, None] for (N, 1, H, W)")
    if x.ndim != 4:
        raise DataError(f"{path}: {key} must be 4-D images (N, C, H, W) or (N, H, W, C), got shape {tuple(x.shape)}")
    n, a, b, c = x.shape
    if min(a, b, c) < 1:
        raise DataError(f"{path}: {key} has shape {tuple(x.shape)}, an empty image axis; save images with C, H, W >= 1")
    if a == c:
        raise DataError(f"{path}: cannot tell the channel axis of {key} with shape {tuple(x.shape)}; "
                        "save it as (N, C, H, W) with C < H, W")
    return (True, (c, a, b)) if c < a else (False, (a, b, c))


def _labels(y, path: Path, key: str, n: int) -> torch.Tensor:
    if y is None:
        raise DataError(f"{path} has {key.replace('y', 'x')} but no {key}; save the labels too")
    try:
        y = np.asarray(y)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {key} must be a 1-D array of integer labels, got a {type(y).__name__} that is not "
                        "one array") from None
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} must be a 1-D array of integer labels, got {y.dtype} of shape {y.shape}")
    if y.dtype == np.uint64 and len(y) and int(y.max()) > np.iinfo(np.int64).max:
        i = int(np.argmax(y))
        raise DataError(f"{path}: label {int(y[i])} at {key}[{i}] is out of range; fix {key}")
    if len(y) != n:
        raise DataError(f"{path}: {key} has {len(y)} labels but {key.replace('y', 'x')} has {n} images; they must match")
    return torch.from_numpy(y.astype(np.int64))


MAX_CLASSES = 100_000  # without a classes array, more than this many is a stray label, not a dataset


def _classes(value, path: Path) -> list[str] | None:
    """The ``classes`` member as a list of distinct names, or None; DataError when it is not one."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    try:
        names = np.asarray(value)
    except (TypeError, ValueError):
        names = None
    if names is None or names.ndim != 1 or names.dtype.kind not in "USiu" or len(names) < 2:
        shape = getattr(names, "shape", None)
        raise DataError(f"{path}: classes must be a 1-D array of at least 2 class names (strings), got "
                        f"{type(value).__name__}{f' of shape {shape}' if shape is not None else ''}; "
                        "save e.g. classes=np.array(['cat', 'dog'])")
    names = [str(c) for c in names.tolist()]
    if any(not n.strip() for n in names):
        raise DataError(f"{path}: classes has an empty name at index {next(i for i, n in enumerate(names) if not n.strip())}; "
                        "name every class")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{path}: classes names {', '.join(repeated[:3])} more than once; each class needs its own name")
    return names


def load_tensor_file(path: str | Path | None, mode: str = "memory", budget: int | None = None,
                     workers: int = 0) -> ImageData:
    """The ``tensors`` dataset (see the module docstring); ``mode`` memory, stream or auto."""
    if not path:
        raise DataError("--dataset tensors needs --data-dir FILE.npz (or .pt) with arrays x and y")
    path = Path(path)
    if path.suffix not in (".npz", ".pt") or not path.is_file():
        what = "does not exist" if not path.exists() else "is not an .npz or .pt file"
        raise DataError(f"--data-dir {path} {what}; pass a file saved with np.savez(FILE.npz, x=..., y=...) or torch.save")
    def decide(nbytes: int, streamable: bool) -> str:
        chosen = choose_mode(mode, nbytes, budget)
        if chosen == "stream" and not streamable and mode == "auto":  # compressed: auto holds it in memory
            return choose_mode("memory", nbytes, budget or None)
        return chosen

    arrays, mode = read_tensor_file(path, decide)
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path} has {', '.join(sorted(arrays)) or 'no arrays'}; it needs x (images) and y (labels)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path} has {'x_test' if 'x_test' in arrays else 'y_test'} without "
                        f"{'y_test' if 'x_test' in arrays else 'x_test'}; save both or neither")
    last, shape = image_layout(arrays["x"], path, "x")
    y = _labels(arrays["y"], path, "y", len(arrays["x"]))
    if len(y) < 2:
        raise DataError(f"{path} holds {len(y)} image(s); a dataset needs at least 2")
    if "x_test" in arrays:
        last_test, test_shape = image_layout(arrays["x_test"], path, "x_test")
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
    classes = _classes(arrays.get("classes"), path)
    given = [("y", y)] + ([("y_test", y_test)] if "x_test" in arrays else [])
    labels = torch.cat([train_y, test_y])
    if classes:
        num_classes = len(classes)
        valid = f"0..{num_classes - 1} (classes has {num_classes} names)"
    else:
        num_classes = int(labels.max()) + 1
        bound = min(MAX_CLASSES, max(2, len(labels)))  # more classes than examples: a stray label
        valid = f"0..{bound - 1} without a classes array (at most one class per example, and at most {MAX_CLASSES})"
        if num_classes > bound:
            num_classes = -1  # every label >= bound is reported below
    for key, values in given:
        limit = num_classes if num_classes > 0 else bound
        bad = ((values < 0) | (values >= limit)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{path}: label {int(values[i])} is out of range (labels must be {valid}) at {key}[{i}]; "
                            f"fix {key}{'' if classes else ', or save a classes array naming every class'}")
    if num_classes < 2:
        raise DataError(f"{path}: every label is {int(labels[0])}; a classifier needs at least 2 classes")
    return finish_custom_data("tensors", path, CustomSplit(train_x, train_y, test_x, test_y), classes, num_classes, mode,
                              workers, None, {"test": test_note})
