"""``load_dataset``: every dataset by name (built-in, ``imagefolder``, ``tensors``), and the memory budget ``auto`` keeps."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from robust.data.builtin import DEFAULT_CACHE, load_torchvision
from robust.data.folders import load_imagefolder
from robust.data.lazy import default_workers
from robust.data.tensors import load_tensor_file
from robust.data.types import DATASET_SPECS, DatasetSpec, ImageData
from robust.errors import DataError
from robust.runtime import available_cpus

DATA_MODES = ("auto", "memory", "stream")


@DATASET_SPECS.register("imagefolder", custom=True, summary="your images in DIR/train/<class>/, and test/ or val/",
                        expected_files="DIR with train/<class>/ images")
def read_imagefolder(data_dir: str | Path | None, image_size: int | None, mode: str, budget: int | None,
                     workers: int) -> ImageData:
    """A folder of class folders (see :mod:`robust.data.folders`)."""
    return load_imagefolder(data_dir, image_size, mode, budget, workers)


@DATASET_SPECS.register("tensors", custom=True, summary="your arrays x and y in FILE.npz or .pt",
                        expected_files="FILE.npz (or .pt) with arrays x and y")
def read_tensors(data_dir: str | Path | None, image_size: int | None, mode: str, budget: int | None,
                 workers: int) -> ImageData:
    """Arrays in one file (see :mod:`robust.data.tensors`); they are used at their own size."""
    if image_size is not None:
        raise DataError("--image-size resizes image folders only; save the arrays at the size to train on")
    return load_tensor_file(data_dir, mode, budget, workers)


DATASETS = DATASET_SPECS.names()  # the names --dataset takes: the built-in sets, then the custom kinds


def datasets_help() -> str:
    """``cifar10 (10 classes, 3x32x32), ...`` for --help, from the specs."""
    return DATASET_SPECS.help()


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True, *,
                 image_size: int | None = None, mode: str = "memory", budget: int | None = None,
                 workers: int | None = None) -> ImageData:
    """Load ``name`` from ``data_dir``, then system folders, then torchvision's download.

    ``imagefolder`` and ``tensors`` read ``data_dir`` (see :mod:`robust.data.lazy`); for them ``mode``
    is ``memory`` (read once into tensors), ``stream`` (read batch by batch) or ``auto`` (memory when
    the decoded images fit ``budget`` bytes), ``image_size`` resizes folder images and ``workers``
    is the number of decoding processes (default: the CPUs, at most 8). Built-in datasets are
    always held in memory.
    """
    spec = DATASET_SPECS.get(name)
    if mode not in DATA_MODES:
        raise DataError(f"unknown data mode {mode!r}; valid: {', '.join(DATA_MODES)}")
    if spec.custom:
        workers = default_workers() if workers is None else int(workers)
        if workers < 0:
            raise DataError(f"workers must be >= 0 (0 reads in the training process), got {workers}")
        if workers > available_cpus():
            raise DataError(f"workers {workers} is more than the {available_cpus()} CPU(s) available here; pass "
                            f"--workers {available_cpus()} or fewer (0 reads in the training process)")
        return spec.build(data_dir, image_size, mode, budget, workers)
    if image_size is not None:
        raise DataError(f"--image-size applies to --dataset imagefolder, not to {name}; drop it")
    return load_builtin(spec, data_dir, download)


def load_builtin(spec: DatasetSpec, data_dir: str | Path | None, download: bool) -> ImageData:
    """A built-in set from ``data_dir``, then its system folders, then torchvision's download; DataError naming
    where it looked and the files a --data-dir needs otherwise."""
    name = spec.name
    folders = ([Path(data_dir)] if data_dir else []) + [Path(p) for p in spec.system_dirs]
    looked = []
    for folder in folders:
        looked.append(str(folder))
        if not folder.is_dir():
            continue
        data = spec.build(name, folder)
        if data is not None:
            return data
    root = Path(data_dir) if data_dir else DEFAULT_CACHE
    if download:
        created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
            data = load_torchvision(name, root, download=True)
            if data is not None:
                return data
        except Exception as exc:  # network errors come in many types (URLError, OSError, ...)
            looked.append(f"download to {root} failed: {type(exc).__name__}")
        if created:
            shutil.rmtree(root, ignore_errors=True)  # leave no empty or partial folder behind
    else:
        looked.append("download disabled")
    raise DataError(f"{name} not found; looked in: {'; '.join(looked) or 'nowhere'}. Pass --data-dir FOLDER holding "
                    f"{spec.expected_files}{spec.hint}")


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
