"""Clean and robust accuracy per route, with the honesty checks of docs/evaluation.md.

``evaluate(model, (x, y), attacks=["pgd20"], eps=8/255)`` attacks and scores each route through
that same route with the model in eval mode and fp32, verifies that every adversarial input lies
in the eps ball and in [0, 1], and reports the per-example worst case over all attacks (an example
is robust only if it survives every attack; how AutoAttack scores its ensemble). An example that
is misclassified clean counts as non-robust under every attack.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.nn as nn

from .attacks.registry import build_attack, check_perturbation, parse_attack_name

from . import checkpoint as ckpt
from .config import ConfigError, parse_eps, parse_fraction
from .data import ImageData, to_float
from .engine import bn_mode, resolve_device
from .metrics import correct_under_attack
from .norms import ROUTES, export_route, is_dual_route, use_route

THREATS = ("linf", "l2")
CHECKPOINT_KINDS = ("train", "export")


# ---------------------------------------------------------------------------------------------
# Loading models


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training or export checkpoint (a run folder means its best.pt), checked for what eval needs."""
    checkpoint = ckpt.load_checkpoint(path)
    kind = checkpoint.get("kind", "train")
    if kind not in CHECKPOINT_KINDS:
        raise ckpt.CheckpointError(f"{path} is a {kind!r} checkpoint, not a model; pass a training checkpoint, run folder or export")
    missing = [k for k in ("model_args", "model") if not isinstance(checkpoint.get(k), dict)]
    if missing:
        raise ckpt.CheckpointError(f"{path} lacks {', '.join(missing)}; it is not a model checkpoint of robust")
    return checkpoint


def model_from(checkpoint: dict[str, Any], route: str | None = None) -> nn.Module:
    """The checkpoint's model in eval mode; with ``route``, the exported single-route model."""
    model = ckpt.model_from_checkpoint(checkpoint).eval()
    exported = checkpoint["model_args"].get("exported_route")
    if route is None:
        return model
    if route not in ROUTES:
        raise ConfigError(f"unknown route {route!r}; valid: {', '.join(ROUTES)}")
    routes_for(model, route)  # the rule eval applies: a route the model has (bn and exports have one)
    if exported is not None:
        return model
    return export_route(model, route).eval()


def load_model(path: str | Path, route: str | None = None) -> nn.Module:
    """Rebuild a model from a checkpoint, a run folder (its best.pt) or an export file.

    With ``route`` ('clean' or 'adv') a dual-route model comes back as the plain single-route
    model of that route (``robust.export_route``). The model is on the CPU, in eval mode.
    """
    return model_from(read_checkpoint(path), route)


# ---------------------------------------------------------------------------------------------
# Arguments


def resolve_eps(eps: float | str, threat: str) -> float:
    """eps in pixel units: [0, 1] for Linf; any value >= 0 for L2 (its ball grows with the image)."""
    if threat not in THREATS:
        raise ConfigError(f"unknown threat {threat!r}; valid: {', '.join(THREATS)}")
    if threat == "linf":
        return parse_eps(eps, allow_zero=True)
    value = parse_fraction(eps, "eps")
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"eps {eps!r} must be >= 0 for the L2 threat model")
    return value


def check_attack_names(attacks: Iterable[str] | str) -> list[str]:
    """Normalized, de-duplicated attack names; ConfigError listing the valid ones for an unknown name."""
    names = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    out: list[str] = []
    for name in names:
        if not str(name).strip():
            continue
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


def routes_for(model: nn.Module, route: str | None) -> list[str]:
    """The routes to score: both for a dual-route model by default; a single-route model has one."""
    if route not in (None, "both", *ROUTES):
        raise ConfigError(f"unknown route {route!r}; valid: clean, adv, both")
    if is_dual_route(model):
        return list(ROUTES) if route in (None, "both") else [route]
    only = (getattr(model, "build_args", None) or {}).get("exported_route", "adv")
    if route in (None, "both", only):
        return [only]
    raise ConfigError(f"this model has a single route ({only}); drop --route or pass --route {only}")


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


def _batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device)
    return to_float(x) if x.dtype == torch.uint8 else x.float()


def num_classes_of(model: nn.Module) -> int:
    return int((getattr(model, "build_args", None) or {}).get("num_classes", 10))


def versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers, stored next to them."""
    import torchattacks

    from . import __version__

    return {"robust": __version__, "torch": torch.__version__, "torchattacks": torchattacks.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------
# Evaluation


def _checked(attack, eps: float, threat: str):
    """``attack`` that also verifies its examples lie in the eps ball and in [0, 1]."""
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = attack(x, y)
        check_perturbation(x, x_adv, eps, threat, name=attack.name)
        return x_adv
    return run


def _score_route(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str],
                 eps: float, threat: str, settings: dict[str, Any], batch_size: int, device: torch.device,
                 seed: int, bar) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Clean, per-attack and worst-case accuracy (%) of one route, attacked through that route."""
    attacks = [build_attack(n, model, eps, threat=threat, seed=seed, num_classes=num_classes_of(model), **settings)
               for n in names if n != "clean"]
    correct = {"clean": 0, **{a.name: 0 for a in attacks}, "worst_case": 0}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(y), batch_size):
            xb, yb = _batch(x[i:i + batch_size], device), y[i:i + batch_size].to(device)
            with torch.no_grad():
                alive = model(xb).argmax(1) == yb
            correct["clean"] += int(alive.sum())
            worst = alive.clone()
            for attack in attacks:
                _, robust = correct_under_attack(model, xb, yb, _checked(attack, eps, threat), clean=alive)
                correct[attack.name] += int(robust.sum())
                worst &= robust
            correct["worst_case"] += int(worst.sum())
            if bar is not None:
                bar.update(1)
    n = len(y)
    return {k: 100.0 * v / n for k, v in correct.items()}, {a.name: a.params for a in attacks}


def evaluate(model: nn.Module, data: Any, attacks: Iterable[str] | str = ("pgd20",), eps: float | str | None = None,
             route: str | None = None, batch_size: int = 256, limit: int | None = None,
             device: str | torch.device | None = None, seed: int = 0, threat: str = "linf", restarts: int = 1,
             queries: int = 5000, progress: bool = False) -> dict[str, Any]:
    """Clean and robust accuracy (%) of every route of ``model`` under each attack.

    ``data`` is ``(x, y)`` with x uint8 or float in [0, 1] of shape (N, C, H, W) (an ImageData
    means its test split). ``route`` None/'both' scores both routes of a dual-route model; a
    single-route model has one. Returns ``{"n", "eps", "threat", "seed", "attacks": {name:
    params}, "routes": {route: {"clean", <attack>..., "worst_case"}}, "seconds", "versions"}``.
    The model is moved to ``device``; its train/eval modes are restored afterwards.
    """
    if eps is None:
        raise ConfigError("eps is required, e.g. eps=8/255 (robust eval defaults to the checkpoint's training eps)")
    eps = resolve_eps(eps, threat)
    names = check_attack_names(attacks)
    if batch_size < 1 or restarts < 1 or queries < 1:
        raise ConfigError(f"batch-size, restarts and queries must be >= 1, got {batch_size}, {restarts}, {queries}")
    x, y = as_tensors(data, limit)
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
                    accuracy, params = _score_route(model, x, y, names, eps, threat, settings, batch_size, device, seed, bar)
                result["routes"][r] = accuracy
                result["attacks"].update(params)
    finally:
        if bar is not None:
            bar.close()
    result["seconds"] = time.perf_counter() - start
    result["versions"] = versions()
    return result


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar on a terminal only: redirected output gets the final table, not bar frames."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="eval", unit="batch", leave=False, dynamic_ncols=True)


def eps_sweep(model: nn.Module, data: Any, eps_values: Sequence[float | str], **kwargs: Any) -> list[dict[str, Any]]:
    """``evaluate`` at each eps (same attacks, seed and examples); one result per eps, in order."""
    return [evaluate(model, data, eps=e, **kwargs) for e in eps_values]


def parse_eps_list(text: str, threat: str = "linf") -> list[float]:
    """``"0,2/255,4/255"`` -> sorted eps values (each parsed like --eps)."""
    values = [resolve_eps(part, threat) for part in text.split(",") if part.strip()]
    if not values:
        raise ConfigError(f"eps list {text!r} is empty; write it like 0,2/255,4/255,8/255")
    return sorted(set(values))


# ---------------------------------------------------------------------------------------------
# Honesty checks


class SanityCheck(NamedTuple):
    """One honesty check: its name, whether it passed, and the figures (plus the likely cause when failed)."""

    name: str
    passed: bool
    detail: str


def noise_points(n: int) -> float:
    """How far (percentage points) two attacks may differ by chance: two examples, at least 0.5 points."""
    return max(0.5, 200.0 / n)


def sanity_verdicts(at_eps: dict[str, Any], at_zero: dict[str, Any], at_one: dict[str, Any]) -> list[SanityCheck]:
    """Judge the figures of the --sanity runs (pure; results come from :func:`evaluate`).

    ``at_eps`` holds clean, pgd10, pgd20, pgd50, autoattack and square at the evaluation eps,
    ``at_zero`` pgd20 at eps 0, ``at_one`` pgd20 at eps 1 (Linf) or a very large L2 eps.
    """
    n = at_eps["n"]
    tol = noise_points(n)
    one_example = 100.0 / n
    checks: list[SanityCheck] = []
    for route, acc in at_eps["routes"].items():
        def add(name: str, passed: bool, figures: str, cause: str) -> None:
            checks.append(SanityCheck(f"{route}: {name}", passed, figures if passed else f"{figures}; {cause}"))

        zero = at_zero["routes"][route]
        add("eps=0 equals clean", zero["pgd20"] == zero["clean"],
            f"pgd20 at eps 0 = {zero['pgd20']:.2f}%, clean = {zero['clean']:.2f}%",
            "the attack changes inputs it may not change, or the forward pass is randomized")
        steps = [(s, acc[s]) for s in ("pgd10", "pgd20", "pgd50") if s in acc]
        falls = all(a >= b - tol for (_, a), (_, b) in zip(steps, steps[1:]))
        add("more PGD steps never help", falls, ", ".join(f"{s} {v:.2f}%" for s, v in steps) + f" (noise {tol:.2f})",
            "gradient masking or a randomized forward (more steps should only find more adversarial inputs)")
        unbounded = at_one["routes"][route]["pgd20"]
        add("unbounded eps gives ~0%", unbounded <= max(1.0, one_example),
            f"pgd20 at eps {at_one['eps']:g} = {unbounded:.2f}%",
            "gradient masking (obfuscated or shattered gradients) or the attack does not see the scored model")
        if "autoattack" in acc and "pgd20" in acc:
            add("AutoAttack <= PGD-20", acc["autoattack"] <= acc["pgd20"] + tol,
                f"autoattack {acc['autoattack']:.2f}%, pgd20 {acc['pgd20']:.2f}%",
                "the AutoAttack run does not attack the scored route or model mode (a route mismatch)")
        white = {k: v for k, v in acc.items() if k in ("pgd10", "pgd20", "pgd50", "autoattack")}
        if "square" in acc and white:
            best_name = min(white, key=white.get)
            margin = max(0.2, one_example)
            add("black-box Square not stronger than white-box", acc["square"] >= white[best_name] - margin,
                f"square {acc['square']:.2f}%, best white-box {best_name} {white[best_name]:.2f}%",
                "gradient masking: a gradient-free attack beats the gradient attacks, so the gradients mislead")
    return checks


def determinism_checks(model: nn.Module, data: Any, route: str | None = None, device: str | None = None,
                       examples: int = 32) -> list[SanityCheck]:
    """Eval-mode forwards are deterministic and input gradients are non-zero, per route."""
    x, y = as_tensors(data, examples)
    dev = resolve_device("auto" if device is None else device)
    model.to(dev)
    xb, yb = _batch(x, dev), y.to(dev)
    checks = []
    with bn_mode(model, False):
        for r in routes_for(model, route):
            with use_route(model, r):
                with torch.no_grad():
                    same = torch.equal(model(xb), model(xb))
                xg = xb.clone().requires_grad_(True)
                grad, = torch.autograd.grad(nn.functional.cross_entropy(model(xg), yb, reduction="sum"), xg)
            nonzero = grad.flatten(1).abs().sum(1).gt(0).float().mean().item() * 100
            checks.append(SanityCheck(f"{r}: deterministic forward", same, "two eval forwards agree" if same else
                                      "two eval forwards differ; a randomized forward (dropout, noise) makes attacks look weaker"))
            checks.append(SanityCheck(f"{r}: input gradients non-zero", nonzero > 50,
                                      f"{nonzero:.0f}% of examples have a non-zero input gradient" +
                                      ("" if nonzero > 50 else "; gradient masking (saturated or non-differentiable layers)")))
    return checks


SANITY_ATTACKS = ("pgd10", "pgd20", "pgd50", "square", "autoattack")


def sanity_checks(model: nn.Module, data: Any, eps: float | str, route: str | None = None,
                  reuse: dict[str, Any] | None = None, **kwargs: Any) -> list[SanityCheck]:
    """Run every --sanity check on ``model`` (evaluation.md); ``reuse`` is an earlier ``evaluate`` result.

    Attacks already in ``reuse`` (same eps, threat, seed and examples) are not run again.
    ``kwargs`` go to :func:`evaluate` (limit, batch_size, device, seed, threat, restarts, queries, progress).
    """
    threat = kwargs.get("threat", "linf")
    eps = resolve_eps(eps, threat)
    if _reusable(reuse, data, eps, kwargs):
        at_eps = _complete(reuse, model, data, eps, route, kwargs)
    else:
        at_eps = evaluate(model, data, attacks=SANITY_ATTACKS, eps=eps, route=route, **kwargs)
    at_zero = evaluate(model, data, attacks=["pgd20"], eps=0, route=route, **kwargs)
    big = 1.0 if threat == "linf" else math.sqrt(x_size(data))
    at_one = evaluate(model, data, attacks=["pgd20"], eps=big, route=route, **kwargs)
    checks = sanity_verdicts(at_eps, at_zero, at_one)
    return checks + determinism_checks(model, data, route, kwargs.get("device"))


def _reusable(reuse: dict[str, Any] | None, data: Any, eps: float, kwargs: dict[str, Any]) -> bool:
    """True when an earlier result was computed on the same examples, eps, threat and seed."""
    if not reuse:
        return False
    n = len(as_tensors(data, kwargs.get("limit"))[1])
    return (reuse["n"], reuse["eps"], reuse["threat"], reuse["seed"]) == (n, eps, kwargs.get("threat", "linf"), kwargs.get("seed", 0))


def _complete(reuse: dict[str, Any], model: nn.Module, data: Any, eps: float, route: str | None,
              kwargs: dict[str, Any]) -> dict[str, Any]:
    """``reuse`` plus the sanity attacks it lacks (run now), route by route."""
    missing = [a for a in SANITY_ATTACKS if any(a not in accs for accs in reuse["routes"].values())]
    if not missing:
        return reuse
    extra = evaluate(model, data, attacks=missing, eps=eps, route=route, **kwargs)
    return {**reuse, "routes": {r: {**reuse["routes"].get(r, {}), **accs} for r, accs in extra["routes"].items()}}


def x_size(data: Any) -> int:
    """Values per input (C*H*W): the L2 diameter of [0, 1]^d is its square root."""
    x, _ = as_tensors(data, 1)
    return x[0].numel()


def eps_monotonic_checks(sweep: Sequence[dict[str, Any]]) -> list[SanityCheck]:
    """Worst-case accuracy never rises with eps beyond noise, per route."""
    checks = []
    if len(sweep) < 2:
        return checks
    tol = noise_points(sweep[0]["n"])
    for r in sweep[0]["routes"]:
        values = [(s["eps"], s["routes"][r]["worst_case"]) for s in sweep]
        ok = all(a >= b - tol for (_, a), (_, b) in zip(values, values[1:]))
        figures = ", ".join(f"{e:.4g}: {v:.2f}%" for e, v in values)
        checks.append(SanityCheck(f"{r}: accuracy falls as eps grows", ok,
                                  figures if ok else f"{figures}; gradient masking or an attack that misses the scored route"))
    return checks
