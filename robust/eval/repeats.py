"""``--repeats K``: a randomized model evaluated K times with different randomness (seeds seed, seed+1, ...), each
example robust only if it survives every repeat: the worst case over the model's randomness, which a single pass
overstates (one draw of the noise may miss what another finds). Each repeat's own figures are reported beside it.

A model whose forward is deterministic has no randomness to repeat over: it runs once (more random starts of
the attacks are ``--restarts``' work), and the result says so.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

import torch
import torch.nn as nn

from robust.attacks.pgd import forward_is_deterministic
from robust.nn.norms import bn_mode, use_route

PROBE_IMAGES = 32  # images of the two forwards that tell a randomized model
RANDOMIZED_ADVICE = ("a randomized forward (dropout, noise, random transforms): one pass of a single-sample attack "
                     "overstates its robustness; evaluate it with --attack autoattack-rand (APGD with 20 EOT forwards), "
                     "--eot 20 for the gradient attacks and --repeats 5 (robust only if it survives every repeat)")


def randomized_routes(model: nn.Module, x: torch.Tensor, routes: Sequence[str]) -> list[str]:
    """The routes whose eval-mode forwards of ``x`` (model inputs on the model's device) differ between two calls;
    the random stream is left as it was."""
    found = []
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), bn_mode(model, False):
        for route in routes:
            with use_route(model, route):
                if not forward_is_deterministic(model, x[:PROBE_IMAGES]):
                    found.append(route)
    return found


def repeat_seeds(seed: int, repeats: int) -> list[int]:
    """The seeds of the repeats: ``seed`` (the single pass's), then ``seed + 1``, ..."""
    return [seed + k for k in range(repeats)]


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "mean": statistics.fmean(values), "max": max(values)}


def combine_repeats(results: Sequence[dict[str, Any]], seeds: Sequence[int], labels: Sequence[int],
                    randomized: Sequence[str]) -> dict[str, Any]:
    """One result from the repeats' results (each with per-example verdicts, in ``seeds``' order).

    Per route: "worst_case" is the share of examples robust in every repeat and "clean" the share right in every
    repeat's clean forward; each attack's column is its lowest single repeat (an example's verdict per attack is not
    kept across the attacks). ``per_example`` holds, per example, the first repeat that broke it (its prediction and
    ``broken_by``) or repeat 0's when none did. ``repeats`` records the count, the seeds, the randomized routes and
    each repeat's figures with their spread; the seconds are summed over the repeats.
    """
    combined = dict(results[0])
    combined["routes"], combined["per_example"] = {}, {}
    per_repeat: dict[str, list] = {}
    for route in results[0]["routes"]:
        runs = [r["per_example"][route] for r in results]
        examples = _first_failures(runs, labels)
        n = len(labels)
        figures = [r["routes"][route] for r in results]
        accs = {"clean": 100.0 * sum(all(run["prediction"][i] == labels[i] for run in runs) for i in range(n)) / n}
        accs.update({k: min(f[k] for f in figures) for k in figures[0] if k not in ("clean", "worst_case")})
        accs["worst_case"] = 100.0 * sum(examples["robust"]) / n
        combined["routes"][route] = accs
        combined["per_example"][route] = examples
        per_repeat[route] = figures
    combined["repeats"] = {
        "count": len(results), "seeds": list(seeds), "randomized_routes": list(randomized), "per_repeat": per_repeat,
        "spread": {route: {k: _spread([f[k] for f in figures]) for k in ("clean", "worst_case")}
                   for route, figures in per_repeat.items()}}
    combined["seconds"] = sum(r["seconds"] for r in results)
    combined["attack_seconds"] = {k: sum(r["attack_seconds"].get(k, 0.0) for r in results)
                                  for k in results[0]["attack_seconds"]}
    return combined


def _first_failures(runs: Sequence[dict[str, list]], labels: Sequence[int]) -> dict[str, list]:
    """Per example: robust in every run, else the prediction and ``broken_by`` of the first run that broke it."""
    out: dict[str, list] = {"prediction": [], "broken_by": [], "robust": []}
    for i in range(len(labels)):
        broken = next((run for run in runs if not run["robust"][i]), None)
        source = runs[0] if broken is None else broken
        out["prediction"].append(source["prediction"][i])
        out["broken_by"].append(source["broken_by"][i])
        out["robust"].append(broken is None)
    return out


def single_pass(result: dict[str, Any], asked: int, seed: int) -> dict[str, Any]:
    """A deterministic model's one pass, recorded as the answer to ``asked`` repeats."""
    return {**result, "repeats": {"count": 1, "asked": asked, "seeds": [seed], "randomized_routes": [],
                                  "why": "deterministic forward: no randomness to repeat over (more random starts: "
                                         "--restarts)"}}
