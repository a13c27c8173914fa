"""``--dataset imagefolder``: torchvision's ImageFolder layout, ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``
(or ``val/``); without a test folder a seeded 20% of the training images (the same split for
every run) is the test set. Class folders are sorted by name (label 0 is the first); the images
come in a fixed shuffled order, so ``--limit N`` takes a mix of every class.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from robust.data.lazy import (
    GRAY_MODES,
    MAX_IMAGE_SIDE,
    SPLIT_SEED,
    TEST_FRACTION,
    CustomSplit,
    FileReader,
    LazyImages,
    choose_mode,
    finish_custom_data,
    seeded_test_split,
)
from robust.data.types import ImageData
from robust.errors import DataError
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif")


TEST_FOLDERS = ("test", "val")


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _scan(files: Sequence[Path]) -> tuple[Counter, Counter]:
    """Sizes and modes of the images (headers only)."""

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
        files = image_files(split_dir / name)
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
    if image_size is not None and image_size > MAX_IMAGE_SIDE:
        raise DataError(f"--image-size {image_size} is too large: one decoded image would be {image_size} x {image_size} "
                        f"({3 * image_size * image_size / 2**30:.3g} GiB in RGB); the largest is {MAX_IMAGE_SIDE}, "
                        "pass e.g. --image-size 224")
    if image_size is None:
        (w, h), count = max(sizes.items(), key=lambda item: item[0][0] * item[0][1])
        if max(w, h) > MAX_IMAGE_SIDE:
            raise DataError(f"{count} image(s) in {root} are {w}x{h}, larger than {MAX_IMAGE_SIDE} on a side; "
                            "pass --image-size N (e.g. 224) to resize them")
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
    split = CustomSplit(train_x, y[train_idx], test_x, y[test_idx])
    return finish_custom_data("imagefolder", root, split, classes, len(classes), mode, workers,
                              shape[-1] if image_size else None,
                              {"test": test_dir.name if test_dir is not None else f"seeded {TEST_FRACTION:.0%} of train/"})
