"""Dual-route batch norms and the context managers that choose their route.

(LayerNorm and GroupNorm routes live in :mod:`robust.nn.layer_norms`, timm's BatchNormAct2d in
:mod:`robust.nn.norm_act`, and :func:`robust.nn.convert.convert_norms` converts a whole model; all of them
are :class:`RoutedNorm` layers, so the route context managers and the export here serve them all.)

A route is state on the norm layers, never an argument of ``forward``: models keep
``forward(x) -> logits`` so any attack library, DDP or torch.compile sees an ordinary model.

Norm kinds, each a class registered in :data:`NORM_SPECS` (a :class:`NormSpec` per name, the one source
of its facts; :func:`make_norm_layer` builds one from a name):

- ``bn``    :class:`SharedBatchNorm2d`, one BatchNorm2d shared by both routes.
- ``auxbn`` :class:`DualBatchNorm2d`, a full BatchNorm2d (statistics and affine) per route.
- ``sabn``  :class:`SandwichBatchNorm2d`, per-route statistics, one shared affine, then the
  route's own affine: ``y = g_r * (g_s * x_hat_r + b_s) + b_r`` (Gong et al., WACV 2022).

A new kind is one class decorated with ``@NORM_SPECS.register("name", summary=...)``.

Every kind also supports a *split* mode for the fused training step: one forward over a
concatenated batch whose first ``n`` rows take route ``clean`` and the rest route ``adv``, each
normalized with its own batch statistics, exactly as two separate forwards would.

:func:`bn_mode` sets train/eval mode for a block of code and restores every module's mode after it.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from robust.attacks.named import Registry, Spec
from robust.errors import ConfigError


@contextlib.contextmanager
def frozen_statistics(model: nn.Module) -> Iterator[None]:
    """Forwards in train mode (batch statistics) that leave every buffer, running statistics included, bit-identical."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


@contextlib.contextmanager
def bn_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Temporarily put ``model`` in train or eval mode; restore every module's mode on exit."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        yield model
    finally:
        for m, mode in saved:
            m.training = mode


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


ROUTES = ("clean", "adv")


@dataclass(frozen=True)
class NormSpec(Spec):
    """A norm kind: ``build`` is its :class:`RoutedNorm` class (``f(num_features) -> layer``), ``summary`` the
    words --help and docs show."""


NORM_SPECS: Registry[NormSpec] = Registry("norm", NormSpec, error=ConfigError)


DEFAULT_ROUTE = "adv"


def check_route(route: str) -> str:
    """Return ``route`` if it names a route, else raise ConfigError (a ValueError) listing the valid ones."""
    if route not in ROUTES:
        raise ConfigError(f"unknown route {route!r}; valid routes: {', '.join(ROUTES)}")
    return route


def check_norm(norm: str) -> str:
    """Return ``norm`` if it names a norm kind, else raise ConfigError (a ValueError) listing the valid ones."""
    return NORM_SPECS.get(norm).name


def norms_help() -> str:
    """``bn (summary), auxbn (summary), ...`` for --help, from the specs."""
    return NORM_SPECS.help()


class RoutedNorm(nn.Module):
    """Mixin state for route-aware norms: the active route and the optional split point."""

    dual = True  # keeps separate state per route (False for the shared BN)

    def _init_route_state(self) -> None:
        self.route: str = DEFAULT_ROUTE
        self.split_at: int | None = None

    def normalize(self, x: torch.Tensor, route: str) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.split_at
        if n is None:
            return self.normalize(x, self.route)
        # An empty part is skipped: normalizing it would still count a batch in its statistics.
        if n == 0:
            return self.normalize(x, "adv")
        if n >= x.shape[0]:
            return self.normalize(x, "clean")
        return torch.cat([self.normalize(x[:n], "clean"), self.normalize(x[n:], "adv")])

    def export_route(self, route: str) -> nn.Module:  # pragma: no cover
        """A plain layer (BatchNorm2d for the batch norms, the model's own class for the others) equal to this
        layer in ``route`` (eval mode)."""
        raise NotImplementedError


@NORM_SPECS.register("bn", summary="one BN shared by both routes")
class SharedBatchNorm2d(RoutedNorm, nn.BatchNorm2d):
    """One BatchNorm2d for both routes (the paper's BN baseline).

    Its state_dict is a plain BatchNorm2d's. In split mode each half is normalized with its own
    batch statistics and updates the running statistics once, like two separate forwards.
    """

    dual = False

    def __init__(self, num_features: int, **kwargs) -> None:
        nn.BatchNorm2d.__init__(self, num_features, **kwargs)
        self._init_route_state()

    def normalize(self, x: torch.Tensor, route: str) -> torch.Tensor:
        return nn.BatchNorm2d.forward(self, x)

    def export_route(self, route: str) -> nn.BatchNorm2d:
        check_route(route)
        return plain_batch_norm(self)


@NORM_SPECS.register("auxbn", summary="per-route BN")
class DualBatchNorm2d(RoutedNorm):
    """AuxBN / dual BN (AdvProp): a full BatchNorm2d, statistics and affine, per route."""

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        self._init_route_state()
        self.num_features = num_features
        self.bns = nn.ModuleDict(
            {r: nn.BatchNorm2d(num_features, eps, momentum, track_running_stats=track_running_stats) for r in ROUTES}
        )

    def normalize(self, x: torch.Tensor, route: str) -> torch.Tensor:
        return self.bns[route](x)

    def export_route(self, route: str) -> nn.BatchNorm2d:
        return plain_batch_norm(self.bns[check_route(route)])


@NORM_SPECS.register("sabn", summary="per-route BN + shared sandwich affine")
class SandwichBatchNorm2d(RoutedNorm):
    """Sandwich BN with per-route statistics ("SaAuxBN" in the reference code).

    ``y_r = g_r * (g_s * x_hat_r + b_s) + b_r``: ``x_hat_r`` comes from the route's own
    BatchNorm2d without affine (so SyncBatchNorm conversion can reach it), ``g_s, b_s`` are shared
    by both routes, ``g_r, b_r`` belong to route ``r``. The two affines fold into one,
    ``g = g_r*g_s, b = g_r*b_s + b_r``, which is how a route exports to a plain BatchNorm2d.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        self._init_route_state()
        self.num_features = num_features
        self.stats = nn.ModuleDict({
            r: nn.BatchNorm2d(num_features, eps, momentum, affine=False, track_running_stats=track_running_stats)
            for r in ROUTES
        })
        self.shared_weight = nn.Parameter(torch.empty(num_features))
        self.shared_bias = nn.Parameter(torch.empty(num_features))
        self.route_weight = nn.ParameterDict({r: nn.Parameter(torch.empty(num_features)) for r in ROUTES})
        self.route_bias = nn.ParameterDict({r: nn.Parameter(torch.empty(num_features)) for r in ROUTES})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference init: every gamma ~ N(1, 0.02), every beta = 0."""
        for w in [self.shared_weight, *self.route_weight.values()]:
            nn.init.normal_(w, 1.0, 0.02)
        for b in [self.shared_bias, *self.route_bias.values()]:
            nn.init.zeros_(b)

    def folded_affine(self, route: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The composite affine of ``route`` as one (weight, bias) pair."""
        g_r, b_r = self.route_weight[route], self.route_bias[route]
        return g_r * self.shared_weight, g_r * self.shared_bias + b_r

    def normalize(self, x: torch.Tensor, route: str) -> torch.Tensor:
        weight, bias = self.folded_affine(route)
        stats = self.stats[route]
        if type(stats) is nn.BatchNorm2d:  # one fused kernel with the folded affine
            return _batch_norm_with_affine(stats, x, weight, bias)
        # A replaced inner BN (route-aware SyncBatchNorm) normalizes itself; then the affine.
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(bias.view(shape), stats(x), weight.view(shape))

    def export_route(self, route: str) -> nn.BatchNorm2d:
        stats = self.stats[check_route(route)]
        plain = nn.BatchNorm2d(
            self.num_features, eps=stats.eps, momentum=stats.momentum,
            track_running_stats=stats.track_running_stats,
        ).to(**device_dtype(self))
        with torch.no_grad():
            weight, bias = self.folded_affine(route)
            plain.weight.copy_(weight)
            plain.bias.copy_(bias)
            if stats.track_running_stats:
                plain.running_mean.copy_(stats.running_mean)
                plain.running_var.copy_(stats.running_var)
                plain.num_batches_tracked.copy_(stats.num_batches_tracked)
        return plain


def plain_batch_norm(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """An exact nn.BatchNorm2d twin of ``bn``, which may be a subclass (a synchronized BN, timm's BatchNormAct2d):
    its own statistics and affine are copied, submodules such as an activation are not."""
    plain = nn.BatchNorm2d(
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    ).to(**device_dtype(bn))
    with torch.no_grad():
        for name, tensor in [*plain.named_parameters(recurse=False), *plain.named_buffers(recurse=False)]:
            tensor.copy_(getattr(bn, name))
    return plain


def device_dtype(module: nn.Module) -> dict:
    """Where ``module``'s floating tensors live (device, dtype), so a replacement goes there too.

    Parameters come first; a norm without affine is placed by its running statistics.
    """
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    return {"device": tensors[0].device, "dtype": tensors[0].dtype} if tensors else {}


def _batch_norm_with_affine(bn: nn.BatchNorm2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exactly what ``bn(x)`` computes and updates (an affine-free BN), followed by ``weight, bias``.

    One F.batch_norm call instead of a BN then an addcmul: 2.5-3x faster per layer on the CPU
    and one activation-sized tensor less kept for backward.
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
            factor = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or not bn.track_running_stats
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(x, bn.running_mean if track else None, bn.running_var if track else None,
                        weight, bias, use_batch_stats, factor, bn.eps)


NORMS = NORM_SPECS.names()  # ("bn", "auxbn", "sabn"): the names --norm takes, in registration order


def make_norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """The norm factory: a name becomes a callable ``f(num_features) -> module``."""
    return NORM_SPECS.get(norm).build


def routed_norms(model: nn.Module) -> Iterator[RoutedNorm]:
    """Every route-aware norm layer of ``model``."""
    return (m for m in model.modules() if isinstance(m, RoutedNorm))


def is_dual_route(model: nn.Module) -> bool:
    """True when the model's norms keep separate statistics per route (auxbn, sabn), unless the model fixes its
    routes itself (``single_route``: a mixture of both routes is one classifier)."""
    return not getattr(model, "single_route", False) and any(m.dual for m in routed_norms(model))


@contextlib.contextmanager
def _set_norm_state(model: nn.Module, route: str, split_at: int | None) -> Iterator[nn.Module]:
    layers = list(routed_norms(model))
    saved = [(m.route, m.split_at) for m in layers]
    try:
        for m in layers:
            m.route, m.split_at = route, split_at
        yield model
    finally:
        for m, (r, s) in zip(layers, saved):
            m.route, m.split_at = r, s


def use_route(model: nn.Module, route: str):
    """Context manager: every norm layer of ``model`` uses ``route`` ('clean' or 'adv').

    Restores the previous route on exit, also on exceptions and when nested. Independent of
    train/eval mode, so an attack library that calls ``model.eval()`` attacks the chosen route.
    """
    return _set_norm_state(model, check_route(route), None)


def split_routes(model: nn.Module, n_clean: int):
    """Context manager: rows ``[:n_clean]`` of each batch take route clean, the rest route adv.

    Each part is normalized with its own batch statistics, so one forward over
    ``torch.cat([x, x_adv])`` equals a clean-route forward of x and an adv-route forward of x_adv.
    """
    if n_clean < 0:
        raise ValueError(f"n_clean must be >= 0, got {n_clean}")
    return _set_norm_state(model, DEFAULT_ROUTE, n_clean)


def replace_modules(model: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace each submodule for which ``convert`` returns a module; the root may be replaced too."""
    root = convert(model)
    if root is not None:
        return root
    for name, child in model.named_children():
        setattr(model, name, replace_modules(child, convert))
    return model


def convert_batch_norm(m: nn.Module, norm: str) -> RoutedNorm | None:
    """The dual-route norm ``norm`` equal to ``m`` when ``m`` is a plain BatchNorm2d or an nn.SyncBatchNorm; else None.

    The function is preserved: both routes start from ``m``'s running statistics, and for sabn ``m``'s affine
    becomes the shared affine with identity route affines. (:func:`robust.nn.convert.convert_norms` applies it,
    and the other norms' converters, to a whole model.)
    """
    if type(m) is not nn.BatchNorm2d and not isinstance(m, nn.SyncBatchNorm):
        return None
    cls = make_norm_layer(norm)
    kwargs = dict(eps=m.eps, momentum=m.momentum, track_running_stats=m.track_running_stats)
    if cls is SharedBatchNorm2d:
        kwargs["affine"] = m.affine
    new = cls(m.num_features, **kwargs)
    _copy_plain_bn_into(m, new)
    return new.to(**device_dtype(m)).train(m.training)


def _copy_plain_bn_into(bn: nn.BatchNorm2d, new: RoutedNorm) -> None:
    with torch.no_grad():
        if isinstance(new, SharedBatchNorm2d):
            new.load_state_dict(bn.state_dict())
            return
        targets = new.bns.values() if isinstance(new, DualBatchNorm2d) else new.stats.values()
        for t in targets:
            if bn.track_running_stats:
                t.running_mean.copy_(bn.running_mean)
                t.running_var.copy_(bn.running_var)
                t.num_batches_tracked.copy_(bn.num_batches_tracked)
            if t.affine and bn.affine:
                t.weight.copy_(bn.weight)
                t.bias.copy_(bn.bias)
        if isinstance(new, SandwichBatchNorm2d):
            if bn.affine:
                new.shared_weight.copy_(bn.weight)
                new.shared_bias.copy_(bn.bias)
            else:
                new.shared_weight.fill_(1.0)
                new.shared_bias.zero_()
            for r in ROUTES:
                new.route_weight[r].fill_(1.0)
                new.route_bias[r].zero_()


def export_route(model: nn.Module, route: str) -> nn.Module:
    """A copy of ``model`` whose norms are plain layers equal to ``route``: BatchNorm2d for our batch norms,
    the model's own class (LayerNorm, GroupNorm, timm's BatchNormAct2d, ...) for a converted model's.

    Affines are folded (``g = g_r*g_s, b = g_r*b_s + b_r``) and the route's running statistics
    copied, so in eval mode the copy's logits equal the dual-route model's in that route. Its
    state_dict loads into the same architecture built with ``norm="bn"`` (an external model's into
    the library's own constructor). The copy comes back in the mode ``model`` is in (every layer's train/eval
    flag kept): call ``.eval()`` on it for inference, as ``robust.load_model(path, route)`` returns it.
    """
    if not isinstance(model, nn.Module):
        what = f"the path {model!r}" if isinstance(model, (str, os.PathLike)) else repr(model)
        raise ConfigError(f"export_route takes a model, got {what}; for a checkpoint or run folder use "
                          "robust.load_model(path, route=...)")
    check_route(route)
    exported = copy.deepcopy(model)

    def convert(m: nn.Module) -> nn.Module | None:
        return m.export_route(route).train(m.training) if isinstance(m, RoutedNorm) else None

    exported = replace_modules(exported, convert)
    build_args = getattr(model, "build_args", None)
    if build_args is not None:
        exported.build_args = {**build_args, "norm": "bn", "exported_route": route}
    return exported
