"""The sanity checks of docs/evaluation.md, each a verdict with its numbers: eps 0 equals clean accuracy,
an unbounded eps gives about 0%, more steps never help, AutoAttack <= PGD-20, Square no stronger than
the white-box attacks (gradient masking), non-zero input gradients, a deterministic forward, and a transfer
attack (from a dual-route model's other route or a ``--transfer-from`` surrogate) no stronger than the white-box ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn

from robust.attacks.registry import parse_attack_name, served_threats
from robust.errors import ConfigError
from robust.attacks.pgd import forward_is_deterministic
from robust.eval.evaluation import as_tensors, evaluate_plan
from robust.eval.plan import EvalPlan
from robust.eval.repeats import RANDOMIZED_ADVICE
from robust.eval.jobs import to_model_input
from robust.eval.transfer import as_surrogate, other_route, transfer_verdict
from robust.nn.norms import bn_mode, is_dual_route, routes_for, use_route
from robust.runtime import resolve_device
from robust.threat import resolve_eps


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
    xb, yb = to_model_input(x, dev), y.to(dev)
    checks = []
    with bn_mode(model, False):
        for r in routes_for(model, route):
            with use_route(model, r):
                same = forward_is_deterministic(model, xb)
                xg = xb.clone().requires_grad_(True)
                grad, = torch.autograd.grad(nn.functional.cross_entropy(model(xg), yb, reduction="sum"), xg)
            nonzero = grad.flatten(1).abs().sum(1).gt(0).float().mean().item() * 100
            checks.append(SanityCheck(f"{r}: deterministic forward", same, "two eval forwards agree" if same else
                                      f"two eval forwards differ; {RANDOMIZED_ADVICE}"))
            checks.append(SanityCheck(f"{r}: input gradients non-zero", nonzero > 50,
                                      f"{nonzero:.0f}% of examples have a non-zero input gradient" +
                                      ("" if nonzero > 50 else "; gradient masking (saturated or non-differentiable layers)")))
    return checks


SANITY_ATTACKS = ("pgd10", "pgd20", "pgd50", "square", "autoattack")


def _sanity_attacks(threat: str) -> list[str]:
    """The sanity attacks that have a version for ``threat`` (Square has none in L1)."""
    return [name for name in SANITY_ATTACKS if threat in served_threats(parse_attack_name(name)[0])]


def sanity_checks(model: nn.Module, data: Any, eps: float | str, route: str | None = None,
                  reuse: dict[str, Any] | None = None, plan: EvalPlan | None = None, surrogate: nn.Module | None = None,
                  **settings: Any) -> list[SanityCheck]:
    """Run every --sanity check on ``model`` (evaluation.md); ``reuse`` is an earlier ``evaluate`` result.

    The transfer check makes pgd20 on ``surrogate`` (another model of the same images and classes) or, without one,
    on a dual-route model's other route; a single-route model without a surrogate has none.

    Attacks already in ``reuse`` (same eps, threat, seed and examples) are not run again. The evaluations'
    settings are ``plan`` (its route, limit, batch size, device, seed, threat, restarts, queries, progress; its
    attacks, state file and corruptions are not used) or :func:`evaluate`'s keywords in ``settings``.
    """
    if plan is None:
        plan = EvalPlan.build(route=route, **settings)
    elif settings or route is not None:
        raise ConfigError("sanity_checks takes a plan or its settings as keywords, not both")
    eps = resolve_eps(eps, plan.threat)
    if _reusable(reuse, data, eps, plan):
        at_eps = _complete(reuse, model, data, plan.again(_sanity_attacks(plan.threat), eps))
    else:
        at_eps = evaluate_plan(model, data, plan.again(_sanity_attacks(plan.threat), eps))
    at_zero = evaluate_plan(model, data, plan.again(["pgd20"], 0))
    big = {"linf": 1.0, "l2": math.sqrt(x_size(data)), "l1": float(x_size(data))}[plan.threat]
    at_one = evaluate_plan(model, data, plan.again(["pgd20"], big))
    checks = sanity_verdicts(at_eps, at_zero, at_one)
    checks += transfer_checks(model, data, plan.again(["pgd20"], eps), at_eps, surrogate)
    return checks + determinism_checks(model, data, plan.route, plan.device)


WHITE_BOX = ("pgd10", "pgd20", "pgd50", "autoattack")


def transfer_checks(model: nn.Module, data: Any, plan: EvalPlan, at_eps: dict[str, Any],
                    surrogate: nn.Module | None = None) -> list[SanityCheck]:
    """Per route, pgd20 made on ``surrogate`` (or the model's other route) and scored on the route, judged against
    the white-box figures of ``at_eps`` (:func:`robust.eval.transfer.transfer_verdict`)."""
    checks = []
    tol = noise_points(at_eps["n"])
    for route, acc in at_eps["routes"].items():
        white = {k: v for k, v in acc.items() if k in WHITE_BOX}
        if surrogate is not None:
            source = as_surrogate(surrogate, "the --transfer-from model")
        elif is_dual_route(model):
            source = other_route(model, route)
        else:
            continue
        result = evaluate_plan(model, data, dataclasses.replace(plan, route=route), source)
        verdict = transfer_verdict(result["routes"][route]["pgd20"], white, source.name, tol)
        checks.append(SanityCheck(f"{route}: transfer attack not stronger than white-box", *verdict))
    return checks


def _reusable(reuse: dict[str, Any] | None, data: Any, eps: float, plan: EvalPlan) -> bool:
    """True when an earlier result was computed on the same examples, eps, threat and seed."""
    if not reuse or reuse.get("transfer"):  # a transfer attack's figures are no white-box figures
        return False
    n = len(as_tensors(data, plan.limit)[1])
    return (reuse["n"], reuse["eps"], reuse["threat"], reuse["seed"]) == (n, eps, plan.threat, plan.seed)


def _complete(reuse: dict[str, Any], model: nn.Module, data: Any, plan: EvalPlan) -> dict[str, Any]:
    """``reuse`` plus the attacks of ``plan`` it lacks (run now), route by route."""
    missing = [a for a in plan.attacks if any(a not in accs for accs in reuse["routes"].values())]
    if not missing:
        return reuse
    extra = evaluate_plan(model, data, plan.again(missing, plan.eps))
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
