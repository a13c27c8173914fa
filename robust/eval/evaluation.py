"""Clean and robust accuracy per route, with the honesty checks of docs/evaluation.md.

``evaluate(model, (x, y), attacks=["pgd20"], eps=8/255)`` attacks and scores each route through
that same route with the model in eval mode and fp32, verifies that every adversarial input lies
in the eps ball and in [0, 1], and reports the per-example worst case over all attacks (an example
is robust only if it survives every attack; how AutoAttack scores its ensemble). An example that
is misclassified clean counts as non-robust under every attack.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from robust.attacks.registry import build_attack, check_perturbation, parse_attack_name
from robust.data.load import load_dataset
from robust.data.loader import to_float
from robust.data.types import CUSTOM_DATASETS, ImageData
from robust.errors import ConfigError, DataError
from robust.eval.accuracy import correct_under_attack
from robust.nn.norms import bn_mode, routes_for, use_route
from robust.runtime import resolve_device, versions
from robust.threat import resolve_eps


def check_attack_names(attacks: Iterable[str] | str) -> list[str]:
    """Normalized, de-duplicated attack names; ConfigError listing the valid ones for an unknown name."""
    names = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    out: list[str] = []
    for name in names:
        if not str(name).strip():
            continue
        if not str(name).isascii():
            raise ConfigError(f"attack {str(name).strip()!r} has characters that are not ASCII; write its name "
                              "with the letters and digits 0-9, e.g. pgd20")
        try:
            parse_attack_name(str(name))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        key = str(name).strip().lower()
        if key not in out:
            out.append(key)
    if not out:
        raise ConfigError("no attack given; pass e.g. --attack pgd20 or --attack pgd20,autoattack")
    return out


def as_tensors(data: Any, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a tuple or an ImageData (its test split), checked and cut to ``limit`` examples."""
    if isinstance(data, ImageData):
        x, y = data.test_x, data.test_y
        if not isinstance(x, torch.Tensor):  # streamed data: read the images to score now
            x, y = x[:limit].load(), y[:limit]
    else:
        try:
            x, y = data
        except (TypeError, ValueError):
            raise ConfigError("data must be a tuple (x, y) of tensors or an ImageData") from None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
        raise ConfigError("data must be x (N, C, H, W) and y (N,) tensors of the same length")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        x, y = x[:limit], y[:limit]
    if len(y) == 0:
        raise ConfigError("no examples to evaluate")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ConfigError(f"x must be uint8 or float in [0, 1], got {x.dtype}")
        if x.min().item() < 0 or x.max().item() > 1:
            raise ConfigError("float inputs must lie in [0, 1] (the model normalizes inside)")
    return x, y.long()


def check_fits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """DataError when the data does not fit the model: its channels, or a label outside the model's classes
    (scored as wrong, it would lower the accuracy without a word)."""
    args = getattr(model, "build_args", None) or {}
    channels = args.get("in_channels")
    if channels is not None and x.shape[1] != int(channels):
        raise DataError(f"the evaluation images have {x.shape[1]} channel(s) but the model takes {channels}; "
                        "evaluate on the data it was trained on (--data-dir)")
    classes = args.get("num_classes")
    if classes is not None and len(y):
        bad = ((y < 0) | (y >= int(classes))).nonzero()
        if len(bad):
            i = int(bad[0])
            raise DataError(f"label {int(y[i])} of evaluation example {i} is outside the model's {classes} classes "
                            f"(0..{int(classes) - 1}); evaluate on data with the checkpoint's classes (--data-dir)")


def to_model_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device)
    return to_float(x) if x.dtype == torch.uint8 else x.float()


def num_classes_of(model: nn.Module) -> int:
    return int((getattr(model, "build_args", None) or {}).get("num_classes", 10))


def _checked(attack, eps: float, threat: str):
    """``attack`` that also verifies its examples lie in the eps ball and in [0, 1]."""
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = attack(x, y)
        check_perturbation(x, x_adv, eps, threat, name=attack.name)
        return x_adv
    return run


def _score_route(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str],
                 eps: float, threat: str, settings: dict[str, Any], batch_size: int, device: torch.device,
                 seed: int, bar) -> tuple[dict[str, float], dict[str, dict[str, Any]], dict[str, list]]:
    """Clean, per-attack and worst-case accuracy (%) of one route, attacked through that route, and per
    example its clean prediction, the first attack (in the given order) that broke it and whether it
    survived every attack."""
    attacks = [build_attack(n, model, eps, threat=threat, seed=seed, num_classes=num_classes_of(model), **settings)
               for n in names if n != "clean"]
    correct = {"clean": 0, **{a.name: 0 for a in attacks}, "worst_case": 0}
    examples: dict[str, list] = {"prediction": [], "broken_by": [], "robust": []}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(y), batch_size):
            xb, yb = to_model_input(x[i:i + batch_size], device), y[i:i + batch_size].to(device)
            with torch.no_grad():
                prediction = model(xb).argmax(1)
            alive = prediction == yb
            correct["clean"] += int(alive.sum())
            worst = alive.clone()
            broken_by = [None if ok else "clean" for ok in alive.tolist()]
            for attack in attacks:
                _, robust = correct_under_attack(model, xb, yb, _checked(attack, eps, threat), clean=alive)
                correct[attack.name] += int(robust.sum())
                for j in (worst & ~robust).nonzero().squeeze(1).tolist():
                    broken_by[j] = attack.name
                worst &= robust
            correct["worst_case"] += int(worst.sum())
            examples["prediction"] += prediction.tolist()
            examples["broken_by"] += broken_by
            examples["robust"] += worst.tolist()
            if bar is not None:
                bar.update(1)
    n = len(y)
    return {k: 100.0 * v / n for k, v in correct.items()}, {a.name: a.params for a in attacks}, examples


def evaluate(model: nn.Module, data: Any, attacks: Iterable[str] | str = ("pgd20",), eps: float | str | None = None,
             route: str | None = None, batch_size: int = 256, limit: int | None = None,
             device: str | torch.device | None = None, seed: int = 0, threat: str = "linf", restarts: int = 1,
             queries: int = 5000, progress: bool = False, per_example: bool = False) -> dict[str, Any]:
    """Clean and robust accuracy (%) of every route of ``model`` under each attack.

    ``data`` is ``(x, y)`` with x uint8 or float in [0, 1] of shape (N, C, H, W) (an ImageData
    means its test split). ``route`` None/'both' scores both routes of a dual-route model; a
    single-route model has one. Returns ``{"n", "eps", "threat", "seed", "attacks": {name:
    params}, "routes": {route: {"clean", <attack>..., "worst_case"}}, "seconds", "versions"}``; with
    ``"per_class": {route: [{"class", "n", "clean", "worst_case"}, ...]}`` (the worst case per class:
    robust to every attack; None for a class without examples); with
    ``per_example``, also ``"per_example": {route: {"prediction", "broken_by", "robust"}}``, a list
    each in the examples' order (``broken_by``: "clean" when misclassified, else the first attack
    that fooled it, None when it survived every attack).
    The model is moved to ``device``; its train/eval modes are restored afterwards.
    """
    if eps is None:
        raise ConfigError("eps is required, e.g. eps=8/255 (robust eval defaults to the checkpoint's training eps)")
    eps = resolve_eps(eps, threat)
    names = check_attack_names(attacks)
    if batch_size < 1 or restarts < 1 or queries < 1:
        raise ConfigError(f"batch-size, restarts and queries must be >= 1, got {batch_size}, {restarts}, {queries}")
    x, y = as_tensors(data, limit)
    check_fits(model, x, y)
    routes = routes_for(model, route)
    device = resolve_device("auto" if device is None else str(device))
    model.to(device)
    settings = {"restarts": restarts, "queries": queries}
    start = time.perf_counter()
    result: dict[str, Any] = {"n": len(y), "eps": eps, "threat": threat, "seed": seed, "attacks": {}, "routes": {}}
    bar = _progress_bar(len(routes) * math.ceil(len(y) / batch_size), progress)
    try:
        with bn_mode(model, False), torch.autocast(device.type, enabled=False):  # eval mode, fp32
            for r in routes:
                with use_route(model, r):
                    accuracy, params, examples = _score_route(model, x, y, names, eps, threat, settings, batch_size,
                                                              device, seed, bar)
                result["routes"][r] = accuracy
                result.setdefault("per_class", {})[r] = per_class_accuracy(examples, y, num_classes_of(model))
                if per_example:
                    result.setdefault("per_example", {})[r] = examples
                result["attacks"].update(params)
    finally:
        if bar is not None:
            bar.close()
    result["seconds"] = time.perf_counter() - start
    result["versions"] = versions()
    return result


def per_class_accuracy(examples: dict[str, list], y: torch.Tensor, num_classes: int) -> list[dict[str, Any]]:
    """Clean and worst-case accuracy (%) per true class, from one route's per-example verdicts."""
    labels = y.cpu().long()
    classes = max(num_classes, int(labels.max()) + 1)
    n = torch.bincount(labels, minlength=classes)
    clean = torch.bincount(labels[torch.tensor(examples["prediction"]) == labels], minlength=classes)
    robust = torch.bincount(labels[torch.tensor(examples["robust"], dtype=torch.bool)], minlength=classes)
    return [{"class": c, "n": int(n[c]), "clean": 100.0 * int(clean[c]) / int(n[c]) if n[c] else None,
             "worst_case": 100.0 * int(robust[c]) / int(n[c]) if n[c] else None} for c in range(classes)]


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar on a terminal only: redirected output gets the final table, not bar frames."""
    if not enabled or not sys.stderr.isatty():
        return None

    return tqdm(total=total, desc="eval", unit="batch", leave=False, dynamic_ncols=True)


def eps_sweep(model: nn.Module, data: Any, eps_values: Sequence[float | str], **kwargs: Any) -> list[dict[str, Any]]:
    """``evaluate`` at each eps (same attacks, seed and examples); one result per eps, in order."""
    return [evaluate(model, data, eps=e, **kwargs) for e in eps_values]


def load_test_split(state: dict[str, Any], data_dir: str | None, limit: int | None):
    """The test images and labels of the checkpoint's dataset (your own data: from where it was trained).

    Streamed data is read here, only the first ``limit`` images of it.
    """

    record = state.get("data") or {}
    custom = state["dataset"] in CUSTOM_DATASETS
    # Your own data streams (only the first ``limit`` images are read) where it can: a compressed .npz cannot,
    # so auto holds it in memory when it fits; eval has no --data-mode to ask for it.
    data = load_dataset(state["dataset"], data_dir or record.get("data_dir"), image_size=record.get("image_size"),
                        mode="auto" if custom else "memory", budget=0 if custom else None)
    if record.get("classes") and list(data.info.classes or []) != list(record["classes"]):
        raise DataError(f"the classes of {data.source['data_dir']} ({', '.join(data.info.classes or [])}) differ from "
                       f"the checkpoint's ({', '.join(record['classes'])}); pass --data-dir with the data it was trained on")
    trained = record.get("input_size")
    found = list(data.test_x.shape[1:])
    if trained and list(trained) != found:
        raise DataError(f"the test images of {data.source.get('data_dir') if data.source else state['dataset']} are "
                        f"{'x'.join(map(str, found))} (C x H x W) but the checkpoint was trained on "
                        f"{'x'.join(map(str, trained))}; pass --data-dir with the data it was trained on")
    args = state.get("model_args") or {}
    if args.get("num_classes") is not None and data.num_classes > int(args["num_classes"]):
        raise DataError(f"{data.source.get('data_dir') if data.source else state['dataset']} has {data.num_classes} classes "
                        f"but the checkpoint's model has {args['num_classes']}; pass --data-dir with the data it was trained on")
    x, y = data.test_x, data.test_y
    if not isinstance(x, torch.Tensor):
        x, y = x[:limit].load(), y[:limit]
    return x, y
