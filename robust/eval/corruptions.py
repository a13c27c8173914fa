"""Accuracy under the common corruptions (RobustBench's third track), per corruption, severity and route.

:func:`evaluate_corruptions` scores each route of a model (in eval mode, fp32 forwards) on corrupted
copies of the test images: generated from :mod:`robust.data.corruptions` (cached on disk, keyed by
corruption, severity, seed and the images) or read from the official CIFAR-10-C / CIFAR-100-C /
ImageNet-C files (``source_dir``). The track's figure, ``corruption_mean``, is the mean accuracy over
exactly the corruptions and severities asked for.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from robust.attacks.pgd import fp32_predictions
from robust.data.corruptions import generated, images_hash, official_layout, read_cifar_c, read_imagenet_c
from robust.errors import ConfigError, DataError
from robust.eval.jobs import to_model_input
from robust.eval.plan import CorruptionPlan
from robust.nn.norms import bn_mode, routes_for, use_route

GENERATED = "generated (not the CIFAR-10-C files)"
IMAGENET_C_IMAGES = 5000  # RobustBench's ImageNet-C protocol: 5,000 images per corruption and severity


def predictions(model: nn.Module, x: torch.Tensor, route: str, batch_size: int, device: torch.device) -> list[int]:
    """The route's fp32 predictions of ``x`` (uint8 or floats in [0, 1]), batch by batch, in eval mode."""
    out: list[int] = []
    with bn_mode(model, False), torch.autocast(device.type, enabled=False), use_route(model, route):
        for start in range(0, len(x), batch_size):
            out += fp32_predictions(model, to_model_input(x[start:start + batch_size], device)).tolist()
    return out


def corrupted_sets(x: torch.Tensor, y: torch.Tensor, names: Sequence[str], severities: Sequence[int], seed: int,
                   source_dir: str | None, classes: list[str] | None):
    """Yield (name, severity, images, labels, seconds it took to make or read them, from the cache or not)."""
    layout = official_layout(source_dir, names) if source_dir is not None else None
    digest = images_hash(x) if layout is None else None
    for name in names:
        for severity in severities:
            start = time.perf_counter()
            cached = False
            if layout is None:
                (xc, cached), yc = generated(x, name, severity, seed, digest), y
            elif layout == "cifar":
                xc, yc = read_cifar_c(source_dir, name, severity, limit=len(y) if len(y) else None)
            else:
                xc, yc = read_imagenet_c(source_dir, name, severity, size=x.shape[-1], classes=classes,
                                         limit=min(len(y), IMAGENET_C_IMAGES))
            yield name, severity, xc, yc, time.perf_counter() - start, cached


def evaluate_corruptions(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         corruptions: CorruptionPlan | Iterable[str] | str = "all",
                         severities: Iterable[int] | str = (1, 2, 3, 4, 5), source_dir: str | None = None,
                         per_example: bool = False, route: str | None = None, batch_size: int = 256,
                         seed: int = 0) -> dict[str, Any]:
    """Accuracy (%) of each route of ``model`` on each corruption at each severity, and the mean over them.

    ``x``, ``y``: the clean test images (uint8 or floats in [0, 1]) and labels; the generated copies corrupt
    them, the official files (``source_dir``) replace them with their own images of the same count (CIFAR-C:
    the first ``len(y)`` of each severity block; ImageNet-C: up to 5,000). ``corruptions`` is the names (or
    'all') with ``severities`` and ``source_dir``, or a :class:`CorruptionPlan` that holds all three (and an
    ImageNet-C model's class names). The model is scored on the device it is on. Returns ``{"corruptions": {name:
    {severity: {route: accuracy}}}, "corruption_mean": {route: mean}, "corruption_source",
    "corruption_severities", "corruption_n", "corruption_seed", "corruption_seconds": {"data", "predict"},
    "corruption_cached"}`` (how many cells' generated images came from the cache);
    with ``per_example``, ``"corruption_per_example": {route: {name: {severity: [prediction, ...]}}}``.
    """
    if not isinstance(corruptions, CorruptionPlan):
        corruptions = CorruptionPlan(corruptions, severities, source_dir)
    names, levels, source_dir = list(corruptions.names), list(corruptions.severities), corruptions.folder
    classes = None if corruptions.classes is None else list(corruptions.classes)
    device = device_of(model)
    routes = list(routes_for(model, route))
    table: dict[str, dict[str, dict[str, float]]] = {}
    examples: dict[str, dict[str, dict[str, list[int]]]] = {r: {} for r in routes}
    seconds = {"data": 0.0, "predict": 0.0}
    counts: set[int] = set()
    cached_cells = 0
    num_classes = int((getattr(model, "build_args", None) or {}).get("num_classes", 10))
    for name, severity, xc, yc, took, cached in corrupted_sets(x, y, names, levels, seed, source_dir, classes):
        seconds["data"] += took
        counts.add(len(yc))
        cached_cells += cached
        if source_dir is not None:
            check_official_files(xc, yc, x.shape[1:], num_classes, source_dir)
        start = time.perf_counter()
        for r in routes:
            pred = predictions(model, xc, r, batch_size, device)
            right = sum(p == t for p, t in zip(pred, yc.tolist()))
            table.setdefault(name, {}).setdefault(str(severity), {})[r] = 100.0 * right / len(yc)
            if per_example:
                examples[r].setdefault(name, {})[str(severity)] = pred
        seconds["predict"] += time.perf_counter() - start
    result: dict[str, Any] = {
        "corruptions": table,
        "corruption_mean": {r: mean_accuracy(table, r) for r in routes},
        "corruption_source": GENERATED if source_dir is None else f"official files in {source_dir}",
        "corruption_severities": levels, "corruption_n": sorted(counts)[0] if len(counts) == 1 else sorted(counts),
        "corruption_seed": seed if source_dir is None else None, "corruption_seconds": seconds,
        "corruption_cached": cached_cells}
    if per_example:
        result["corruption_per_example"] = examples
    return result


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model with neither)."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


def mean_accuracy(table: dict[str, dict[str, dict[str, float]]], route: str) -> float:
    """The mean of one route's accuracies over every (corruption, severity) cell of ``table``."""
    cells = [levels[s][route] for levels in table.values() for s in levels]
    if not cells:
        raise ConfigError("no corruption was evaluated")
    return sum(cells) / len(cells)


def format_corruptions(result: dict[str, Any]) -> str:
    """A table per route: one row per corruption, one column per severity, the row's mean; then the overall mean."""
    table, routes = result["corruptions"], list(result["corruption_mean"])
    levels = [str(s) for s in result["corruption_severities"]]
    lines = [f"corruptions: accuracy (%), {result['corruption_source']}, {result['corruption_n']} images per cell"]
    for r in routes:
        lines.append(f"route {r}: " + f"{'corruption':<18}" + "".join(f"{'s' + s:>8}" for s in levels) + f"{'mean':>8}")
        for name, row in table.items():
            values = [row[s][r] for s in levels]
            lines.append(" " * (8 + len(r)) + f"{name:<18}" + "".join(f"{v:>8.2f}" for v in values)
                         + f"{sum(values) / len(values):>8.2f}")
    lines.append("mean over the corruptions and severities: "
                 + ", ".join(f"{r} {v:.2f}" for r, v in result["corruption_mean"].items()))
    return "\n".join(lines)


def check_official_files(x: torch.Tensor, y: torch.Tensor, shape: torch.Size, num_classes: int, source: str) -> None:
    """DataError when the official images are not of the model's shape (C x H x W) or a label is outside its classes."""
    if x.shape[1:] != shape:
        found, wanted = "x".join(map(str, x.shape[1:])), "x".join(map(str, shape))
        raise DataError(f"the images in {source} are {found} (C x H x W) but the model's test images are {wanted}; "
                        "pass the corruption files of the data the model was trained on")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"{source} has label {int(y.max())} outside the model's {num_classes} classes; pass the "
                        "corruption files of the data the model was trained on")
