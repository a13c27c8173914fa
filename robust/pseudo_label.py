"""Pseudo-labelling (Carmon et al. 2019): a standard model labels unlabelled images, and the labelled
images become an ``--extra-data`` file.

:func:`teacher_probabilities` runs the model over the images in batches (eval mode, no attack);
:func:`select_confident` keeps the confident ones, optionally a class-balanced subset (Carmon et
al. kept the 50,000 most confident images per class); :func:`write_extra_file` writes ``x`` (uint8
NCHW), ``y`` (the argmax, or with ``soft`` the probabilities), ``confidence`` and ``index`` (each
image's position in the unlabelled set) atomically, as an uncompressed ``.npz`` that
``--extra-data`` memory-maps.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from robust.data.lazy import LazyImages
from robust.data.loader import to_float
from robust.nn.norms import is_dual_route, use_route
from robust.outputs import atomic_output


def _read(x, start: int, end: int) -> torch.Tensor:
    return x.read(np.arange(start, end)) if isinstance(x, LazyImages) else x[start:end]


@torch.no_grad()
def teacher_probabilities(model: nn.Module, x, batch_size: int = 512, device: torch.device | str = "cpu",
                          route: str = "adv", progress: bool = False) -> torch.Tensor:
    """Softmax probabilities (N, classes), float32 on the CPU, of ``model`` (in ``route``) on uint8 images ``x``."""
    model = model.to(device).eval()
    out = []
    bar = tqdm(total=len(x), desc="labelling", unit="img", disable=not progress, leave=False)
    with use_route(model, route) if is_dual_route(model) else contextlib.nullcontext():
        for start in range(0, len(x), batch_size):
            xb = to_float(_read(x, start, min(start + batch_size, len(x))).to(device))
            out.append(torch.softmax(model(xb).float(), 1).cpu())
            bar.update(len(xb))
    bar.close()
    return torch.cat(out)


def select_confident(probs: torch.Tensor, min_confidence: float = 0.0, per_class: int | None = None,
                     balanced: bool = False) -> torch.Tensor:
    """Sorted indices of the images kept: confidence (the top probability) >= ``min_confidence``;
    with ``per_class``, at most that many per predicted class, the most confident first; with
    ``balanced``, the same number for every class (the smallest class's count, after the other rules)."""
    confidence, label = probs.max(1)
    keep = confidence >= min_confidence
    chosen = []
    counts = [int((keep & (label == c)).sum()) for c in range(probs.shape[1])]
    quota = min(counts) if balanced else None
    if per_class is not None:
        quota = per_class if quota is None else min(quota, per_class)
    for c in range(probs.shape[1]):
        idx = torch.nonzero(keep & (label == c)).flatten()
        if quota is not None:
            idx = idx[confidence[idx].argsort(descending=True, stable=True)[:quota]]
        chosen.append(idx)
    return torch.cat(chosen).sort().values


def why_nothing_kept(probs: torch.Tensor, min_confidence: float, balanced: bool) -> str:
    """Why :func:`select_confident` kept no image, naming the option that caused it and its fix."""
    confidence, label = probs.max(1)
    if not bool((confidence >= min_confidence).any()):
        return (f"no image has confidence >= {min_confidence:g} (the highest is {confidence.max().item():.3f}); "
                "lower --min-confidence")
    kept = label[confidence >= min_confidence]
    empty = [c for c in range(probs.shape[1]) if not bool((kept == c).any())]
    if balanced and empty:
        return (f"--balanced keeps as many images per class as the smallest class has, and the teacher gave class "
                f"{empty[0]} no image ({len(empty)} of {probs.shape[1]} classes have none); drop --balanced or "
                "use a better teacher")
    return "no image was kept; loosen --min-confidence or --per-class"


def write_extra_file(path: str | Path, x, probs: torch.Tensor, keep: torch.Tensor, soft: bool = False,
                     overwrite: bool = False) -> Path:
    """The kept images with their labels as an ``--extra-data`` .npz (atomic: all of it or nothing)."""
    positions = keep.numpy()
    images = x.read(positions) if isinstance(x, LazyImages) else x[keep]
    images = images.numpy() if isinstance(images, torch.Tensor) else images
    kept = probs[keep]
    labels = kept.numpy().astype(np.float32) if soft else kept.argmax(1).numpy().astype(np.int64)
    with atomic_output(path, overwrite=overwrite) as fh:
        np.savez(fh, x=np.ascontiguousarray(images, dtype=np.uint8), y=labels,
                 confidence=kept.max(1).values.numpy().astype(np.float32), index=positions.astype(np.int64))
    return Path(path)
