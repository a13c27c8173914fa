"""Transfer attacks: adversarial examples made on a surrogate model, scored on the model under evaluation.

:class:`Surrogate` is the model the attacks see instead of the scored one: another model (``--transfer-from``,
attacked through its adv route when it has two) or the scored model's other route. A transfer attack is a
weaker attack than a white-box one on the model itself (it never sees the model's gradients), so when it breaks
more examples the white-box figures overstate the robustness: the model's gradients mislead its own attacks
(gradient masking). :func:`transfer_verdict` judges that, :func:`robust.eval.sanity.sanity_checks` runs it.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn as nn

from robust.nn.norms import bn_mode, is_dual_route, use_route


class Surrogate(nn.Module):
    """``model`` as the attacks see it in a transfer attack: through ``route`` (None: as it is) and in eval mode in
    every forward (its own modes restored after each)."""

    def __init__(self, model: nn.Module, route: str | None = None, name: str = "surrogate") -> None:
        super().__init__()
        self.inner = model
        self.route = route
        self.name = name
        self.training = False  # the wrapper itself; the inner model is put in eval mode in each forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = use_route(self.inner, self.route) if self.route is not None else contextlib.nullcontext()
        with bn_mode(self.inner, False), routed:
            return self.inner(x)

    def train(self, mode: bool = True) -> "Surrogate":  # the mode is chosen in each forward; attacks' switches are moot
        return self


def as_surrogate(model: nn.Module, name: str = "surrogate") -> Surrogate:
    """``model`` as a surrogate: a dual-route model is attacked through its adv route (its robust classifier,
    whose gradients transfer best to robust models); a :class:`Surrogate` is kept as it is."""
    if isinstance(model, Surrogate):
        return model
    return Surrogate(model, "adv" if is_dual_route(model) else None, name)


def other_route(model: nn.Module, route: str) -> Surrogate:
    """The surrogate of a dual-route model's ``route``: the same weights through its other route."""
    other = "clean" if route == "adv" else "adv"
    return Surrogate(model, other, f"the {other} route")


class TransferVerdict(NamedTuple):
    """Whether a transfer attack stayed no stronger than the white-box attacks, with the figures."""

    passed: bool
    detail: str


def transfer_verdict(transfer: float, white: dict[str, float], source: str, tol: float) -> TransferVerdict:
    """Judge a transfer attack's robust accuracy (%) against the white-box ones (name -> %) of the same route,
    images and eps: it fails when it is lower than the best white-box figure by more than ``tol`` points."""
    best_name = min(white, key=white.get)
    passed = transfer >= white[best_name] - tol
    figures = f"pgd20 made on {source} {transfer:.2f}%, best white-box {best_name} {white[best_name]:.2f}% (noise {tol:.2f})"
    if passed:
        return TransferVerdict(True, figures)
    return TransferVerdict(False, f"{figures}; gradient masking: examples made on another model fool this one more "
                                  "often than its own gradients do, so its gradients mislead the attacks (obfuscated "
                                  "or shattered gradients, a randomized forward: try --eot and --repeats) and the "
                                  "white-box figures overstate its robustness")

