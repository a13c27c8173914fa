"""Extra training data (``--extra-data FILE``): unlabelled images with a teacher's labels, or generated images.

The file has the format ``--dataset tensors`` reads (an ``.npz`` or ``.pt`` file): ``x``, uint8 images
(N, C, H, W) or (N, H, W, C) of the labelled set's shape, and ``y``, either integer labels (N,) or
per-class probabilities (N, classes) (soft labels: rows of non-negative numbers summing to 1). Other
members (``confidence``, ``classes``, ...) are ignored. The labels are read whole; the images are
memory-mapped (an uncompressed ``.npz`` or a ``.pt`` file) and read batch by batch unless they fit
in memory under ``auto`` or ``memory`` is asked for, so a set larger than memory is never read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robust.data.lazy import ArrayReader, LazyImages, choose_mode
from robust.data.tensors import image_layout, read_tensor_file
from robust.errors import DataError

SOFT_LABEL_TOLERANCE = 1e-3  # a row of probabilities may sum to 1 within this (float32 softmax outputs do)


@dataclass
class ExtraData:
    """The extra pool: images (a uint8 tensor, or :class:`LazyImages` read on demand) and labels,
    int64 (N,) hard labels or float32 (N, classes) probabilities."""

    x: torch.Tensor | LazyImages
    y: torch.Tensor
    path: Path
    mode: str

    @property
    def soft(self) -> bool:
        return self.y.dim() == 2

    def __len__(self) -> int:
        return len(self.y)


def load_extra_data(path: str | Path, image_shape: tuple[int, int, int], num_classes: int, mode: str = "auto",
                    budget: int | None = None) -> ExtraData:
    """The extra pool in ``path``, checked against the labelled set's ``image_shape`` (C, H, W) and classes.

    ``mode`` memory (read whole), stream (memory-mapped, read per batch) or auto (memory when the
    images fit ``budget`` bytes). DataError names any mismatch and the fix, before training starts.
    """
    path = Path(path)
    if path.suffix not in (".npz", ".pt") or not path.is_file():
        what = "does not exist" if not path.exists() else "is not an .npz or .pt file"
        raise DataError(f"--extra-data {path} {what}; pass a file saved with np.savez(FILE.npz, x=..., y=...) "
                        "(robust pseudo-label writes one)")

    def decide(nbytes: int, streamable: bool) -> str:
        chosen = choose_mode(mode, nbytes, budget)
        if chosen == "stream" and not streamable:
            if mode == "stream":
                raise DataError(f"--extra-data {path} is compressed, so it cannot be memory-mapped; save it with "
                                "np.savez (not savez_compressed)")
            return choose_mode("memory", nbytes, budget)
        return chosen

    arrays, chosen = read_tensor_file(path, decide)
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"--extra-data {path} has {', '.join(sorted(arrays)) or 'no arrays'}; it needs x (images) and y (labels)")
    last, shape = image_layout(arrays["x"], path, "x")
    if tuple(shape) != tuple(image_shape):
        raise DataError(f"--extra-data {path}: images are {_shape(shape)} (C x H x W) but the dataset's are "
                        f"{_shape(image_shape)}; save the extra images at the dataset's size and channels")
    y = _extra_labels(arrays["y"], path, len(arrays["x"]), num_classes)
    images = LazyImages(ArrayReader(arrays["x"], last), np.arange(len(y)), shape)
    x = images.load() if chosen == "memory" else images
    return ExtraData(x, y, path, chosen)


def _shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _extra_labels(y, path: Path, n: int, num_classes: int) -> torch.Tensor:
    """Hard labels (N,) as int64 or soft labels (N, classes) as float32, checked."""
    try:
        y = np.asarray(y)
    except (TypeError, ValueError):
        raise DataError(f"--extra-data {path}: y is not one array; save integer labels (N,) or probabilities (N, classes)") from None
    if len(y) != n:
        raise DataError(f"--extra-data {path}: y has {len(y)} rows but x has {n} images; they must match")
    if n == 0:
        raise DataError(f"--extra-data {path} holds no images; pass a file with at least one")
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        bad = np.flatnonzero((y < 0) | (y >= num_classes))
        if len(bad):
            raise DataError(f"--extra-data {path}: label {int(y[bad[0]])} at y[{int(bad[0])}] is outside 0..{num_classes - 1} "
                            f"(the dataset has {num_classes} classes); fix the labels or use the matching dataset")
        return torch.from_numpy(y.astype(np.int64))
    if y.ndim == 2 and np.issubdtype(y.dtype, np.floating):
        if y.shape[1] != num_classes:
            raise DataError(f"--extra-data {path}: y holds probabilities over {y.shape[1]} classes but the dataset has "
                            f"{num_classes}; save (N, {num_classes}) probabilities")
        probs = y.astype(np.float32)
        sums = probs.sum(1)
        bad = np.flatnonzero(~np.isfinite(sums) | (probs.min(1) < 0) | (np.abs(sums - 1) > SOFT_LABEL_TOLERANCE))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"--extra-data {path}: y[{i}] is not a probability row (non-negative, sum 1; its sum is "
                            f"{float(sums[i]):.4g}); save softmax outputs or integer labels")
        return torch.from_numpy(probs / sums[:, None])
    raise DataError(f"--extra-data {path}: y must be integer labels (N,) or float probabilities (N, {num_classes}), "
                    f"got {y.dtype} of shape {tuple(y.shape)}")
