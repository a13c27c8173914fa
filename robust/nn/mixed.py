"""A mixed classifier: an accurate route and a robust route mixed in probability, one ``forward(x) -> logits``.

The robust route's logits go through a nonlinear transform that makes it confident where it is right
(MixedNUTS, Bai et al. 2024): standardized over the classes, shifted by ``offset``, clamped by a GELU,
raised to ``power`` (sign kept) and multiplied by ``scale``. The mixture's output is the log of
``(1 - weight) * softmax(clean) + weight * softmax(transform(adv))``, so attacks, verdicts and exports
treat it as any classifier's logits. ``weight`` 0 is the accurate route alone, 1 the transformed robust route.

A dual-route model is both classifiers at once: its clean and adv routes run in one batched forward over
``[x; x]`` (:func:`robust.nn.norms.split_routes`, each half with its own route's statistics). Two separate
models (a robust model and an accurate one) are mixed the same way, each in its own forward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from robust.errors import ConfigError
from robust.nn.norms import export_route, is_dual_route, split_routes

STANDARDIZE_EPS = 1e-8  # keeps the class-wise standardization finite for constant logits

# Each parameter's allowed range: (low, high, low included). Power below 1 would give |g|^p an infinite
# slope at 0 (NaN input gradients); scale 0 would erase the robust route.
MIX_RANGES = {
    "weight": (0.0, 1.0, True),
    "scale": (0.0, 1000.0, False),
    "power": (1.0, 16.0, True),
    "offset": (-10.0, 10.0, True),
}


@dataclass(frozen=True)
class MixSettings:
    """The mixing weight (of the robust route) and the robust route's transform: scale, power, offset."""

    weight: float = 0.5
    scale: float = 1.0
    power: float = 1.0
    offset: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            check_mix_value(f.name, getattr(self, f.name))

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    def replace(self, **changes: float) -> "MixSettings":
        return MixSettings(**{**self.to_dict(), **changes})


def check_mix_value(name: str, value: object) -> float:
    """``value`` as a float inside ``name``'s range, else ConfigError naming the range."""
    low, high, low_included = MIX_RANGES[name]
    what = f"[{low:g}, {high:g}]" if low_included else f"({low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"mixture {name} must be a finite number in {what}, got {value!r}")
    if value > high or value < low or (value == low and not low_included):
        raise ConfigError(f"mixture {name} must be in {what}, got {value:g}")
    return float(value)


def transform_logits(logits: torch.Tensor, settings: MixSettings) -> torch.Tensor:
    """The robust route's logits made confident where they are clear: ``scale * sign(g) |g|^power`` with
    ``g = GELU(standardized logits + offset)``, in fp32."""
    z = logits.float()
    centred = z - z.mean(dim=1, keepdim=True)
    standardized = centred / (centred.pow(2).mean(dim=1, keepdim=True) + STANDARDIZE_EPS).sqrt()
    g = F.gelu(standardized + settings.offset)
    return settings.scale * g.sign() * g.abs().pow(settings.power)


def mix_log_probs(clean_logits: torch.Tensor, adv_logits: torch.Tensor, settings: MixSettings) -> torch.Tensor:
    """log((1 - w) softmax(clean) + w softmax(transform(adv))), in fp32; weight 0 and 1 give one term exactly."""
    w = settings.weight
    clean = F.log_softmax(clean_logits.float(), dim=1)
    if w == 0:
        return clean
    adv = F.log_softmax(transform_logits(adv_logits, settings), dim=1)
    if w == 1:
        return adv
    return torch.logaddexp(clean + math.log1p(-w), adv + math.log(w))


class MixedClassifier(nn.Module):
    """``forward(x) -> logits`` of the mixture of an accurate and a robust classifier (images in [0, 1]).

    ``accurate`` None mixes the two routes of the dual-route ``robust`` model in one batched forward;
    otherwise ``robust`` (its adv route, a plain model) and ``accurate`` run separately. The mixture has a
    single route of its own (``single_route``): evaluation scores it as one model, end to end.
    """

    single_route = True

    def __init__(self, robust: nn.Module, accurate: nn.Module | None = None,
                 settings: MixSettings | None = None) -> None:
        super().__init__()
        if accurate is None and not is_dual_route(robust):
            raise ConfigError("this model has a single route (bn or an export): mixing its routes needs a dual-route "
                              "model (auxbn, sabn); pass a separate accurate model (--accurate MODEL)")
        if accurate is not None and (is_dual_route(robust) or is_dual_route(accurate)):
            raise ConfigError("mix two separate models as plain single-route models: load each with its route "
                              "(robust.load_model(path, route=...))")
        self.robust = robust
        self.accurate = accurate
        self.settings = settings or MixSettings()

    def route_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean logits, adv logits) of ``x``: one batched forward over ``[x; x]`` for a dual-route model."""
        if self.accurate is not None:
            return self.accurate(x), self.robust(x)
        n = x.shape[0]
        with split_routes(self.robust, n):
            both = self.robust(torch.cat([x, x]))
        return both[:n], both[n:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clean, adv = self.route_logits(x)
        return mix_log_probs(clean, adv, self.settings)

    @property
    def build_args(self) -> dict:
        """What a checkpoint needs to rebuild the mixture: its settings and each part's build arguments."""
        robust = dict(getattr(self.robust, "build_args", None) or {})
        accurate = getattr(self.accurate, "build_args", None) if self.accurate is not None else None
        if not robust or (self.accurate is not None and not accurate):
            raise ConfigError("a part of the mixture has no build_args; build or load its models with robust")
        return {"arch": MIXTURE_ARCH, "norm": robust.get("norm"), "num_classes": robust.get("num_classes"),
                "in_channels": robust.get("in_channels"), "mixture": self.settings.to_dict(), "robust": robust,
                "accurate": dict(accurate) if accurate is not None else None}


MIXTURE_ARCH = "mixture"  # the arch a mixture's build arguments name


def is_mixture_args(args: dict) -> bool:
    """True for the build arguments of a :class:`MixedClassifier`."""
    return args.get("arch") == MIXTURE_ARCH and isinstance(args.get("mixture"), dict)


def plain_mixture(mix: MixedClassifier) -> MixedClassifier:
    """The same mixture made of plain single-route models (each route exported, SaBN affines folded): no dual-route
    norm inside, so it loads as a plain module; its logits equal ``mix``'s in eval mode."""
    if mix.accurate is not None:
        return mix
    robust = export_route(mix.robust, "adv").eval()
    accurate = export_route(mix.robust, "clean").eval()
    return MixedClassifier(robust, accurate, mix.settings)
