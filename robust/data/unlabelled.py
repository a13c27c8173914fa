"""Unlabelled image sets, for ``robust pseudo-label``: a slice of a built-in training set, a tensor file
or a folder of image files, read on demand.

``NAME[START:END]`` takes training images START..END-1 of a built-in set (``fashion-mnist[10000:]``:
every image after the first 10,000); their true labels come along, so the pseudo-labels' accuracy can
be reported. A tensor file (``.npz`` / ``.pt``) gives its ``x`` (memory-mapped where it can be) and,
when it has integer ``y``, those as the true labels. A folder gives every image file under it, in
sorted order, decoded to the labelled set's channels and, for square sets, its size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robust.data.folders import image_files
from robust.data.lazy import ArrayReader, FileReader, LazyImages
from robust.data.load import load_dataset
from robust.data.tensors import image_layout, read_tensor_file
from robust.data.types import DATASET_INFO
from robust.errors import DataError

SLICE = re.compile(r"^(?P<name>[a-z0-9-]+)\[(?P<start>\d*):(?P<end>\d*)\]$")


@dataclass
class UnlabelledImages:
    """Images to label (a uint8 tensor or :class:`LazyImages`), their true labels when known, and what they are."""

    x: torch.Tensor | LazyImages
    true_y: torch.Tensor | None
    description: str

    def __len__(self) -> int:
        return len(self.x)


def load_unlabelled(spec: str, image_shape: tuple[int, int, int], data_dir: str | None = None) -> UnlabelledImages:
    """The images ``spec`` names (see the module docstring), checked to have ``image_shape`` (C, H, W)."""
    match = SLICE.match(spec.strip())
    if match:
        images = _builtin_slice(match["name"], match["start"], match["end"], data_dir)
    else:
        path = Path(spec)
        if path.is_dir():
            images = _folder(path, image_shape)
        elif path.suffix in (".npz", ".pt") and path.is_file():
            images = _tensor_file(path)
        else:
            raise DataError(f"--unlabelled {spec}: not a folder, an .npz/.pt file or NAME[START:END] of a built-in set "
                            f"({', '.join(DATASET_INFO)}); e.g. --unlabelled 'fashion-mnist[10000:]'")
    shape = tuple(images.x.shape[1:])
    if shape != tuple(image_shape):
        raise DataError(f"--unlabelled {spec}: images are {'x'.join(map(str, shape))} (C x H x W) but the labelled set's "
                        f"are {'x'.join(map(str, image_shape))}; pass images of the labelled set's size and channels")
    if len(images) == 0:
        raise DataError(f"--unlabelled {spec} holds no images; pass a set with at least one")
    return images


def _builtin_slice(name: str, start: str, end: str, data_dir: str | None) -> UnlabelledImages:
    if name not in DATASET_INFO:
        raise DataError(f"--unlabelled {name}[...]: unknown built-in dataset; valid: {', '.join(DATASET_INFO)}")
    data = load_dataset(name, data_dir)
    n = len(data.train_y)
    lo, hi = int(start or 0), int(end) if end else n
    if not 0 <= lo < hi <= n:
        raise DataError(f"--unlabelled {name}[{start}:{end}]: the training set has {n} images; pass START < END <= {n}")
    return UnlabelledImages(data.train_x[lo:hi], data.train_y[lo:hi], f"{name} training images {lo}..{hi - 1}")


def _tensor_file(path: Path) -> UnlabelledImages:
    arrays, _ = read_tensor_file(path, lambda nbytes, streamable: "stream" if streamable else "memory")
    if "x" not in arrays:
        raise DataError(f"--unlabelled {path} has {', '.join(sorted(arrays)) or 'no arrays'}; it needs x (images)")
    last, shape = image_layout(arrays["x"], path, "x")
    x = LazyImages(ArrayReader(arrays["x"], last), np.arange(len(arrays["x"])), shape)
    y = arrays.get("y")
    true_y = None
    if y is not None and np.ndim(y) == 1 and np.issubdtype(np.asarray(y).dtype, np.integer) and len(y) == len(x):
        true_y = torch.from_numpy(np.asarray(y).astype(np.int64))
    return UnlabelledImages(x, true_y, f"{path} ({len(x)} images)")


def _folder(path: Path, image_shape: tuple[int, int, int]) -> UnlabelledImages:
    files = sorted(str(p) for p in image_files(path))
    if not files:
        raise DataError(f"--unlabelled {path} holds no image files; pass a folder of images")
    channels, height, width = image_shape
    size = height if height == width else None
    x = LazyImages(FileReader(files, channels, size), np.arange(len(files)), image_shape)
    return UnlabelledImages(x, None, f"{path} ({len(files)} image files)")
