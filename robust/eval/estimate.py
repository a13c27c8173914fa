"""How long an expensive attack will take, from a short timed probe on a few images, said before it starts.

AutoAttack costs from seconds to minutes per image and route depending on the model and the machine,
so ``robust eval`` times each expensive attack on the first ``PROBE_IMAGES`` images of one route and
scales that to the whole evaluation. Images the model already gets wrong cost nearly nothing and
robust ones the most, so the estimate is rough; it is there to say minutes or hours before the wait.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
import torch.nn as nn

from robust.attacks.registry import ATTACKS, build_attack, parse_attack_name
from robust.eval.jobs import to_model_input
from robust.nn.norms import bn_mode, use_route
from robust.progress import format_duration

PROBED = tuple(spec.name for spec in ATTACKS if spec.slow)  # announced before they start (the specs marked slow)
PROBE_IMAGES = 2
TARGET_SECONDS = 600.0  # the --limit suggested when the estimate is hours takes about this long


def probe_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str, route: str,
                  settings: dict[str, Any]) -> float:
    """Seconds per image of attack ``name`` on the first images of ``x`` through ``route`` (eval mode, fp32);
    the global RNG is left as it was, so the evaluation's own seeds are untouched."""
    xb, yb = to_model_input(x[:PROBE_IMAGES], torch.device("cpu")), y[:PROBE_IMAGES]
    device = next(model.parameters()).device
    xb, yb = xb.to(device), yb.to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), bn_mode(model, False), \
            use_route(model, route):
        attack = build_attack(name, model, **settings)
        start = time.perf_counter()
        attack(xb, yb)
        return (time.perf_counter() - start) / len(yb)


def estimate_lines(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str], routes: Sequence[str],
                   settings: dict[str, Any]) -> list[str]:
    """One line per expensive attack in ``names``: its estimated time over ``len(y)`` images x ``routes``, and
    a clear warning with a smaller ``--limit`` when that is hours. ``settings``: build_attack's eps, threat, ..."""
    lines = []
    for name in (n for n in names if ATTACKS.get(parse_attack_name(n)[0]).slow):
        per_image = probe_seconds(model, x, y, name, routes[0], settings)
        count = len(y) * len(routes)
        total = per_image * count
        what = f"{len(y)} images x {len(routes)} routes" if len(routes) > 1 else f"{len(y)} images"
        line = (f"estimate: {name} on {what} takes about {format_duration(total)} here "
                f"({per_image:.1f} s per image and route on a probe of {min(PROBE_IMAGES, len(y))} image(s); "
                "images the model gets wrong cost less, robust ones more)")
        if total >= 3600:
            limit = max(1, math.floor(TARGET_SECONDS / max(per_image * len(routes), 1e-9)))
            line += (f"\nthat is HOURS ({total / 3600:.1f} h); stop with Ctrl-C and pass --limit {limit} for about "
                     f"{format_duration(limit * len(routes) * per_image)}, or --state FILE to make it resumable")
        lines.append(line)
    return lines
