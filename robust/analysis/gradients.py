"""Gradient analysis of the norm layers: makes the paper's "balanced norms, diverse directions" checkable.

For a few training batches, with the run's own training examples made through the adv route by the
training step's :func:`robust.train.step.make_adversarial` (PGD for pgd/hybrid), we
take two losses, each through its own route:

- the clean loss ``CE(clean route on x)`` and
- the adversarial loss, the objective's loss in the adv route (``CE(adv route on x_adv)`` for pgd),

and, per norm layer, the gradient of each w.r.t. the layer's affine parameters (weight and bias
together as one vector):

- ``shared_clean`` / ``shared_adv``: norms of the two gradients w.r.t. the shared affine
  (sabn: ``g_s, b_s``; bn: the one BatchNorm's affine). None for auxbn, which has no shared affine.
- ``route_clean`` / ``route_adv``: the norm of the clean loss's gradient w.r.t. the clean route's
  affine and of the adversarial loss's gradient w.r.t. the adv route's affine (sabn: ``g_r, b_r``;
  auxbn: each route's BatchNorm affine). None for bn, which has no per-route affine.
- ``cosine``: cosine similarity between the clean and adversarial gradients of the shared affine
  (bn, sabn). auxbn has no shared parameter both losses reach, so its ``cosine`` is the cosine
  between the two routes' affine gradients (clean loss on the clean affine vs adversarial loss on
  the adv affine): the directions in which each route moves its own copy. ``cosine_of`` says which.
- ``route_cosine``: that route-vs-route cosine for auxbn and sabn (None for bn).

Every figure is computed per batch and averaged over batches (a norm of the optimizer's view of
one step, not of a gradient summed over the batches). The losses use batch statistics (train
mode) and the attack runs in the run's ``attack_bn`` mode, as in a training step; the model is
analysed on a copy, so the caller's running statistics are not touched. The hybrid weights are not applied: these are the raw losses.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from robust import checkpoint as ckpt
from robust.data.load import load_dataset
from robust.data.loader import BatchLoader, split_train_val
from robust.errors import ConfigError
from robust.stats import mean_sd
from robust.nn.layer_norms import DualAffineNorm, SandwichAffineNorm, is_affine_norm
from robust.nn.norm_act import RoutedBatchNormAct
from robust.nn.norms import ROUTES, DualBatchNorm2d, RoutedNorm, SandwichBatchNorm2d, SharedBatchNorm2d, bn_mode, use_route
from robust.plan import saved_plan
from robust.run import checkpoint_path
from robust.runtime import resolve_device
from robust.train.step import StepSettings, make_adversarial, step_loss

FIGURES = ("shared_clean", "shared_adv", "route_clean", "route_adv", "cosine", "route_cosine")


def _present(*params: nn.Parameter | None) -> list[nn.Parameter]:
    return [p for p in params if p is not None]


def _route_affine(layer: nn.Module, route: str) -> list[nn.Parameter]:
    return _present(layer.route_weight[route], None if layer.route_bias is None else layer.route_bias[route])


def affine_groups(layer: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The affine parameters of a norm layer, grouped as 'shared', 'clean', 'adv' (where they exist).

    Batch norms, LayerNorm/GroupNorm routes and timm's BatchNormAct2d alike; a LayerNorm or GroupNorm a
    ``bn`` model keeps as its own layer has one shared affine, as a shared batch norm has.
    """
    if isinstance(layer, RoutedBatchNormAct):
        return affine_groups(layer.norm)
    if isinstance(layer, (SandwichBatchNorm2d, SandwichAffineNorm)):
        return {"shared": _present(layer.shared_weight, layer.shared_bias), **{r: _route_affine(layer, r) for r in ROUTES}}
    if isinstance(layer, DualBatchNorm2d):
        return {r: _present(layer.bns[r].weight, layer.bns[r].bias) for r in ROUTES}
    if isinstance(layer, DualAffineNorm):
        return {r: _route_affine(layer, r) for r in ROUTES}
    if isinstance(layer, SharedBatchNorm2d) or is_affine_norm(layer):
        return {"shared": _present(layer.weight, layer.bias)}
    raise TypeError(f"not a routed norm layer: {type(layer).__name__}")


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every norm layer with affine parameters, in model order: the routed norms
    and the LayerNorm/GroupNorm layers a ``bn`` model keeps (never a layer inside another one's)."""
    out: list[tuple[str, nn.Module]] = []
    inside: str | None = None
    for name, m in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(m, RoutedNorm) or is_affine_norm(m):
            inside = f"{name}."
            if all(affine_groups(m).values()):
                out.append((name, m))
    return out


def _flat_grads(loss: torch.Tensor, params: list[nn.Parameter]) -> dict[int, torch.Tensor]:
    """d loss / d p for every parameter (zeros where the loss does not reach it), keyed by id."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {id(p): (torch.zeros_like(p) if g is None else g).detach().flatten() for p, g in zip(params, grads)}


def _vector(grads: dict[int, torch.Tensor], params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([grads[id(p)] for p in params]).double()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity, 0 when either vector is zero; clamped to [-1, 1] against rounding."""
    denom = a.norm() * b.norm()
    if denom == 0:
        return 0.0
    return float((a @ b / denom).clamp(-1.0, 1.0))


def layer_figures(groups: dict[str, list[nn.Parameter]], g_clean: dict[int, torch.Tensor],
                  g_adv: dict[int, torch.Tensor]) -> dict[str, float | None]:
    """The figures of one layer for one batch, from the clean and adversarial gradients."""
    out: dict[str, float | None] = dict.fromkeys(FIGURES)
    if "shared" in groups:
        sc, sa = _vector(g_clean, groups["shared"]), _vector(g_adv, groups["shared"])
        out.update(shared_clean=float(sc.norm()), shared_adv=float(sa.norm()), cosine=_cosine(sc, sa))
    if "clean" in groups:
        rc, ra = _vector(g_clean, groups["clean"]), _vector(g_adv, groups["adv"])
        out.update(route_clean=float(rc.norm()), route_adv=float(ra.norm()), route_cosine=_cosine(rc, ra))
        if "shared" not in groups:
            out["cosine"] = out["route_cosine"]
    return out


def batch_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: StepSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean-route loss on ``x`` and the objective's adv-route loss on its own examples.

    The examples come from the training step's own :func:`robust.train.step.make_adversarial` (the
    run's objective and ``attack_bn`` mode); the losses use batch statistics (train mode) as a
    training step does. For ``pgd`` the adversarial loss is ``CE(adv route, x_adv)``.
    """
    x_adv = make_adversarial(model, x, y, settings)
    with bn_mode(model, True):
        adv_loss, _ = step_loss(model, x, x_adv, y, dataclasses.replace(settings, clean_weight=0.0))
        with use_route(model, "clean"):
            clean_loss = F.cross_entropy(model(x), y)
    return clean_loss, adv_loss


def gradient_analysis(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], eps: float,
                      alpha: float | None = None, steps: int = 7, attack_train_mode: bool = True,
                      method: str = "pgd", options: dict | None = None) -> dict[str, Any]:
    """Per-layer gradient norms and cosines of the clean and adversarial losses, averaged over ``batches``.

    ``method`` (and its ``options``, e.g. trades's beta) choose the objective whose examples and loss are the adversarial side.
    Returns ``{"norm", "cosine_of", "settings", "layers": [{"layer", **figures}], "summary"}``; the
    figures are described in the module docstring. ``model`` itself is not modified.
    """
    model = copy.deepcopy(model)
    alpha = eps / 4 if alpha is None else alpha
    settings = StepSettings.of(method, eps, alpha, steps, options=options, attack_bn="train" if attack_train_mode else "eval")
    layers = norm_layers(model)
    if not layers:
        raise ValueError("the model has no norm layers with affine parameters; build it with robust.build_model")
    groups = [affine_groups(m) for _, m in layers]
    params = [p for g in groups for ps in g.values() for p in ps]
    sums: list[dict[str, float]] = [dict.fromkeys(FIGURES, 0.0) for _ in layers]
    n_batches = 0
    for x, y in batches:
        clean_loss, adv_loss = batch_losses(model, x, y, settings)
        g_clean, g_adv = _flat_grads(clean_loss, params), _flat_grads(adv_loss, params)
        for total, g in zip(sums, groups):
            for key, value in layer_figures(g, g_clean, g_adv).items():
                total[key] = None if value is None else total[key] + value
        n_batches += 1
    if n_batches == 0:
        raise ValueError("no batches to analyse")
    rows = [{"layer": name, **{k: (None if v is None else v / n_batches) for k, v in total.items()}}
            for (name, _), total in zip(layers, sums)]
    norm = _norm_kind(layers[0][1])
    return {
        "norm": norm,
        "cosine_of": "route affines (clean vs adv)" if norm == "auxbn" else "shared affine (clean vs adv loss)",
        "settings": {"method": method, "batches": n_batches, "batch_size": int(len(y)), "eps": float(eps), "alpha": float(alpha),
                     "steps": int(steps), "attack_bn": "train" if attack_train_mode else "eval"},
        "layers": rows,
        "summary": summarize(rows),
    }


def _norm_kind(layer: nn.Module) -> str:
    layer = layer.norm if isinstance(layer, RoutedBatchNormAct) else layer
    if isinstance(layer, (SandwichBatchNorm2d, SandwichAffineNorm)):
        return "sabn"
    return "auxbn" if isinstance(layer, (DualBatchNorm2d, DualAffineNorm)) else "bn"


def summarize(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Means over layers, plus the mean adv/clean gradient-norm ratio (1 = balanced)."""
    out: dict[str, float | None] = {}
    for key in FIGURES:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    for part in ("shared", "route"):
        ratios = [r[f"{part}_adv"] / r[f"{part}_clean"] for r in rows
                  if r[f"{part}_clean"] is not None and r[f"{part}_clean"] > 0]
        out[f"{part}_ratio"] = sum(ratios) / len(ratios) if ratios else None
    return out


def analyze_checkpoint(path: str | Path, batches: int = 4, batch_size: int | None = None, eps: float | None = None,
                       steps: int | None = None, data=None, data_dir: str | None = None, device: str = "auto",
                       seed: int | None = None) -> dict[str, Any]:
    """:func:`gradient_analysis` of a checkpoint on its own training data, attack and batch size.

    Dataset, split, eps, step size, steps and batch size default to the checkpoint's training
    config; the first ``batches`` augmented training batches of epoch 0 are used.
    """

    if batches < 1:
        raise ConfigError(f"batches must be >= 1, got {batches}")
    state = ckpt.load_checkpoint(path)
    model = ckpt.load_model(state, weights="live").train()  # as built: gradient_analysis sets the modes
    config = saved_plan(state["config"]) if isinstance(state.get("config"), dict) else None
    dataset = state.get("dataset") or (config.dataset if config else None)
    if dataset is None:
        raise ConfigError(f"{path} does not say which dataset it was trained on; analyse the run's own checkpoint (best.pt)")
    eps = float(eps if eps is not None else state.get("eps") or (config.eps if config else 8 / 255))
    alpha = config.step_size * eps / config.eps if config else eps / 4  # the run's step/eps ratio
    steps = steps or (config.steps if config else 7)
    batch_size = batch_size or (config.batch_size if config else 128)
    seed = seed if seed is not None else (config.seed if config else 0)
    if data is None:
        data = load_dataset(dataset, data_dir or (config.data.data_dir if config else None),
                            image_size=config.data.image_size if config else None)
    (train_x, train_y), _ = split_train_val(data, config.data.val_split if config else 0.1, seed,
                                            config.data.limit if config else None)
    dev = resolve_device(device)
    loader = BatchLoader(train_x, train_y, batch_size, augment=True, flip=data.flip, seed=seed)
    model = model.to(dev)
    torch.manual_seed(seed)
    chosen = [(x.to(dev), y.to(dev)) for _, (x, y) in zip(range(batches), loader)]
    attack_train = config.attack_bn == "train" if config else True
    result = gradient_analysis(model, chosen, eps, alpha, steps, attack_train_mode=attack_train,
                               method=config.objective_name if config else "pgd",
                               options=dict(config.options) if config else None)
    result["checkpoint"] = str(checkpoint_path(path))
    result["settings"].update(dataset=dataset, seed=seed)
    return result


def architecture_of(path: str | Path) -> str:
    """A checkpoint's architecture in words (``preact_resnet18, width 16``), from its build arguments."""
    args = ckpt.read_checkpoint(path)["model_args"]
    return f"{args.get('arch')}, width {args['width']}" if args.get("width") else str(args.get("arch"))


def check_poolable(paths: Sequence[str | Path]) -> str:
    """The one architecture of the checkpoints whose figures are pooled; ConfigError for a checkpoint given
    twice (it would count twice in every mean and sd) or two that differ in architecture (a gradient figure
    of a ResNet and of a ViT have no common mean)."""
    seen: dict[str, str | Path] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise ConfigError(f"{path} and {seen[real]} are the same checkpoint; give each once")
        seen[real] = path
    first = architecture_of(paths[0])
    for path in paths[1:]:
        other = architecture_of(path)
        if other != first:
            raise ConfigError(f"{paths[0]} is a {first} but {path} is a {other}; the mean over checkpoints pools one "
                              "architecture: analyse each architecture's checkpoints in its own call")
    return first


SPREAD_FIGURES = ("cosine", "route_cosine", "shared_ratio", "route_ratio", "shared_clean", "shared_adv",
                  "route_clean", "route_adv")


def spread_by_norm(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per norm kind, over the analysed checkpoints (e.g. one per seed): n, and the mean and sample
    standard deviation of each summary figure (None where the norm has no such figure)."""

    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(result["norm"], []).append(result)
    spread: dict[str, dict[str, Any]] = {}
    for norm, group in groups.items():
        figures: dict[str, Any] = {}
        for key in SPREAD_FIGURES:
            values = [r["summary"][key] for r in group if r["summary"].get(key) is not None]
            figures[key] = mean_sd(values) if values else None
        spread[norm] = {"n": len(group), "cosine_of": group[0]["cosine_of"], "figures": figures}
    return spread
