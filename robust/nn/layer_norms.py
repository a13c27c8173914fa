"""Dual-route LayerNorm and GroupNorm: the norms of ViTs, ConvNeXts and group-norm ResNets.

These norms normalize every example on its own and keep no running statistics, so the two routes
can differ in their affines only (the normalization ``x_hat`` is the same function in both):

- ``bn``    the model's own layer, left as it is: with no statistics, nothing could differ.
- ``auxbn`` :class:`DualAffineNorm`, the layer's normalization, then the route's own affine
  ``y_r = g_r * x_hat + b_r``.
- ``sabn``  :class:`SandwichAffineNorm`, a shared sandwich affine, then the route's:
  ``y_r = g_r * (g_s * x_hat + b_s) + b_r``.

Any subclass of ``nn.LayerNorm`` or ``nn.GroupNorm`` whose forward applies ``self.weight`` and
``self.bias`` converts (torch's, timm's LayerNorm (channels-last), LayerNorm2d (NCHW), their fp32
variants, GroupNorm, GroupNorm1, torchvision's ConvNeXt LayerNorm2d): the routed layer keeps a
*shell* of the model's layer (its class, shape, eps and channel layout, its weight and bias
removed) and runs the layer's own forward with the route's affine folded into one pair,
``g = g_r*g_s, b = g_r*b_s + b_r``. Split mode is exact because a per-example norm never mixes rows,
and a route exports as a copy of the shell holding the folded affine: the model's own class.
A layer without an affine stays as it is (no route could learn anything in it).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from robust.nn.norms import ROUTES, RoutedNorm, check_route, device_dtype

AFFINE_NAMES = ("weight", "bias")


def is_affine_norm(m: nn.Module) -> bool:
    """True for a LayerNorm or GroupNorm (any subclass) that has a learned affine."""
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and getattr(m, "weight", None) is not None


def shell_of(layer: nn.Module, names: tuple[str, ...] = AFFINE_NAMES) -> nn.Module:
    """A copy of ``layer`` with the tensors ``names`` removed (set to None): its forward, without its weights."""
    shell = copy.deepcopy(layer)
    for name in names:
        if name in shell._parameters or name in shell._buffers:
            setattr(shell, name, None)
    return shell


def run_with_affine(shell: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``shell``'s own forward of ``x`` with ``weight`` and ``bias`` in place of its removed parameters.

    The tensors sit in the shell's parameter slots for the call only (gradients flow to the route's
    parameters through them); the slots are emptied again afterwards, also on an exception.
    """
    params = shell._parameters
    params["weight"], params["bias"] = weight, bias
    try:
        return shell(x)
    finally:
        params["weight"] = params["bias"] = None


def _route_parameters(value: torch.Tensor | None) -> nn.ParameterDict | None:
    if value is None:
        return None
    return nn.ParameterDict({r: nn.Parameter(value.detach().clone()) for r in ROUTES})


class RoutedAffineNorm(RoutedNorm):
    """A LayerNorm/GroupNorm whose affine depends on the route (see the module docstring).

    Subclasses say how a route's affine is composed in :meth:`folded_affine`.
    """

    def __init__(self, layer: nn.Module) -> None:
        if not is_affine_norm(layer):
            raise ValueError(f"{type(layer).__name__} is not a LayerNorm or GroupNorm with an affine")
        super().__init__()
        self._init_route_state()
        self.shell = shell_of(layer)

    def folded_affine(self, route: str) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def normalize(self, x: torch.Tensor, route: str) -> torch.Tensor:
        return run_with_affine(self.shell, *self.folded_affine(route), x)

    def export_route(self, route: str) -> nn.Module:
        """The model's own layer class holding ``route``'s folded affine: equal to this layer in that route."""
        plain = copy.deepcopy(self.shell)
        weight, bias = self.folded_affine(check_route(route))
        plain.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            plain.bias = nn.Parameter(bias.detach().clone())
        return plain.to(**device_dtype(self))


class DualAffineNorm(RoutedAffineNorm):
    """auxbn for a LayerNorm/GroupNorm: the layer's normalization, then route r's own affine ``(g_r, b_r)``.

    Both routes start from the layer's affine, so a converted model computes what it did before.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        self.route_weight = _route_parameters(layer.weight)
        self.route_bias = _route_parameters(layer.bias)

    def folded_affine(self, route: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = self.route_bias[route] if self.route_bias is not None else None
        return self.route_weight[route], bias


class SandwichAffineNorm(RoutedAffineNorm):
    """sabn for a LayerNorm/GroupNorm: ``y_r = g_r * (g_s * x_hat + b_s) + b_r``.

    The layer's affine becomes the shared ``(g_s, b_s)`` and the route affines start at the identity,
    so a converted model computes what it did before. A layer without a bias has none here either.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        self.shared_weight = nn.Parameter(layer.weight.detach().clone())
        self.route_weight = _route_parameters(torch.ones_like(layer.weight))
        has_bias = layer.bias is not None
        self.shared_bias = nn.Parameter(layer.bias.detach().clone()) if has_bias else None
        self.route_bias = _route_parameters(torch.zeros_like(layer.bias)) if has_bias else None

    def folded_affine(self, route: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        g_r = self.route_weight[route]
        bias = None if self.shared_bias is None else g_r * self.shared_bias + self.route_bias[route]
        return g_r * self.shared_weight, bias


_AFFINE_NORM_CLASSES: dict[str, type[RoutedAffineNorm]] = {"auxbn": DualAffineNorm, "sabn": SandwichAffineNorm}


def convert_affine_norm(m: nn.Module, norm: str) -> nn.Module | None:
    """The dual-route ``norm`` equal to ``m`` when ``m`` is a LayerNorm/GroupNorm with an affine; else None.

    Under ``bn`` the model's own layer is kept (returned as it is).
    """
    if not is_affine_norm(m):
        return None
    if norm == "bn":
        return m
    return _AFFINE_NORM_CLASSES[norm](m).to(**device_dtype(m)).train(m.training)
