"""Dual-route LayerNorm and GroupNorm (robust.nn.layer_norms): each kind against a hand computation,
the plain layer when the routes share their affine, split = two route forwards, export to the
layer's own class, conversion that keeps a model's function."""

from __future__ import annotations

import copy

import pytest
import timm.layers
import torch
import torch.nn as nn
import torchvision.models.convnext as tv_convnext

from robust.nn.convert import convert_norms
from robust.nn.layer_norms import DualAffineNorm, SandwichAffineNorm
from robust.nn.norms import ROUTES, export_route, is_dual_route, split_routes, use_route

C = 6


def channels_last_ln(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x_hat of a LayerNorm over the last dimension (mean and biased variance of each row)."""
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def channels_first_ln(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x_hat of a LayerNorm over the channels of an NCHW tensor (each pixel on its own)."""
    return channels_last_ln(x.permute(0, 2, 3, 1), eps).permute(0, 3, 1, 2)


def group_norm(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """x_hat of a GroupNorm: each example's group of channels (with all its pixels) normalized together."""
    n = x.shape[0]
    g = x.reshape(n, groups, -1)
    out = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    return out.reshape_as(x)


# (layer, an input of its layout, x_hat by hand, the shape that broadcasts a per-channel affine)
CASES = {
    "torch LayerNorm (tokens)": (lambda: nn.LayerNorm(C, eps=1e-6), (3, 5, C), lambda x: channels_last_ln(x, 1e-6), (C,)),
    "timm LayerNorm (NHWC)": (lambda: timm.layers.LayerNorm(C), (3, 4, 4, C), lambda x: channels_last_ln(x, 1e-6), (C,)),
    "timm LayerNorm2d (NCHW)": (lambda: timm.layers.LayerNorm2d(C), (3, C, 4, 4), lambda x: channels_first_ln(x, 1e-6),
                                (C, 1, 1)),
    "timm LayerNorm2dFp32": (lambda: timm.layers.LayerNorm2dFp32(C), (3, C, 4, 4), lambda x: channels_first_ln(x, 1e-6),
                             (C, 1, 1)),
    "torchvision LayerNorm2d": (lambda: tv_convnext.LayerNorm2d(C, eps=1e-6), (3, C, 4, 4),
                                lambda x: channels_first_ln(x, 1e-6), (C, 1, 1)),
    "torch GroupNorm": (lambda: nn.GroupNorm(3, C), (3, C, 4, 4), lambda x: group_norm(x, 3, 1e-5), (C, 1, 1)),
    "timm GroupNorm1": (lambda: timm.layers.GroupNorm1(C), (3, C, 4, 4), lambda x: group_norm(x, 1, 1e-5), (C, 1, 1)),
    "torch LayerNorm without bias": (lambda: nn.LayerNorm(C, bias=False), (3, 5, C), lambda x: channels_last_ln(x, 1e-5),
                                     (C,)),
}


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every affine parameter set to a distinct random value, so no check passes by the identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1.0 if "weight" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    return module


def make(case: str, norm: str, seed: int = 0):
    build, shape, by_hand, affine_shape = CASES[case]
    layer = randomized(build(), seed)
    routed = randomized(convert_norms(nn.Sequential(copy.deepcopy(layer)), norm)[0], seed + 1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2))
    return layer, routed, x, by_hand, affine_shape


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("route", ROUTES)
def test_sabn_equals_the_hand_formula(case, route):
    _, routed, x, by_hand, shape = make(case, "sabn")
    assert isinstance(routed, SandwichAffineNorm)
    g_s, g_r = routed.shared_weight.view(shape), routed.route_weight[route].view(shape)
    if routed.shared_bias is None:
        expected = g_r * (g_s * by_hand(x))
    else:
        b_s, b_r = routed.shared_bias.view(shape), routed.route_bias[route].view(shape)
        expected = g_r * (g_s * by_hand(x) + b_s) + b_r
    with use_route(routed, route):
        got = routed(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("route", ROUTES)
def test_auxbn_equals_the_hand_formula(case, route):
    _, routed, x, by_hand, shape = make(case, "auxbn")
    assert isinstance(routed, DualAffineNorm)
    expected = routed.route_weight[route].view(shape) * by_hand(x)
    if routed.route_bias is not None:
        expected = expected + routed.route_bias[route].view(shape)
    with use_route(routed, route):
        got = routed(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("norm", ["auxbn", "sabn"])
def test_conversion_keeps_the_layers_function_in_both_routes(case, norm):
    build, shape, _, _ = CASES[case]
    layer = randomized(build())
    routed = convert_norms(nn.Sequential(copy.deepcopy(layer)), norm)[0]
    x = torch.randn(shape)
    for route in ROUTES:
        with use_route(routed, route):
            torch.testing.assert_close(routed(x), layer(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_auxbn_with_one_affine_in_both_routes_is_the_plain_layer(case):
    layer, routed, x, _, _ = make(case, "auxbn")
    with torch.no_grad():
        for r in ROUTES:
            routed.route_weight[r].copy_(layer.weight)
            if layer.bias is not None:
                routed.route_bias[r].copy_(layer.bias)
    for route in ROUTES:
        with use_route(routed, route):
            assert torch.equal(routed(x), layer(x))  # the layer's own forward with its own affine: bit-identical


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("norm", ["auxbn", "sabn"])
def test_split_equals_two_route_forwards_and_their_gradients(case, norm):
    _, routed, x, _, _ = make(case, norm)
    n = 2
    with split_routes(routed, n):
        split = routed(x)
    split.square().sum().backward()
    split_grads = {k: p.grad.clone() for k, p in routed.named_parameters()}
    routed.zero_grad()
    with use_route(routed, "clean"):
        clean = routed(x[:n])
    with use_route(routed, "adv"):
        adv = routed(x[n:])
    (clean.square().sum() + adv.square().sum()).backward()
    assert torch.equal(split, torch.cat([clean, adv]))
    for k, p in routed.named_parameters():
        torch.testing.assert_close(split_grads[k], p.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("norm", ["auxbn", "sabn"])
@pytest.mark.parametrize("route", ROUTES)
def test_export_is_the_layers_own_class_equal_to_the_route(case, norm, route):
    layer, routed, x, _, _ = make(case, norm)
    exported = export_route(nn.Sequential(routed), route)[0]
    assert type(exported) is type(layer)
    fresh = CASES[case][0]()
    fresh.load_state_dict(exported.state_dict(), strict=True)
    with use_route(routed, route):
        expected = routed(x)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-6)


def test_sabn_export_folds_the_two_affines():
    _, routed, _, _, _ = make("timm LayerNorm2d (NCHW)", "sabn")
    exported = export_route(nn.Sequential(routed), "adv")[0]
    g_r, b_r = routed.route_weight["adv"], routed.route_bias["adv"]
    torch.testing.assert_close(exported.weight, g_r * routed.shared_weight, rtol=0, atol=0)
    torch.testing.assert_close(exported.bias, g_r * routed.shared_bias + b_r, rtol=0, atol=0)


def test_bn_keeps_the_models_own_layers_and_affine_free_ones_are_kept_by_every_kind():
    ln, free = nn.LayerNorm(C), nn.GroupNorm(2, C, affine=False)
    model = nn.Sequential(ln, free)
    assert convert_norms(model, "bn")[0] is ln and not is_dual_route(model)
    converted = convert_norms(nn.Sequential(nn.LayerNorm(C), free), "sabn")
    assert isinstance(converted[0], SandwichAffineNorm) and converted[1] is free and is_dual_route(converted)


def test_routed_state_holds_the_route_affines_and_no_copy_of_the_layers():
    routed = convert_norms(nn.Sequential(nn.LayerNorm(C)), "sabn")
    assert sorted(routed.state_dict()) == sorted(
        ["0.shared_weight", "0.shared_bias", *(f"0.route_{k}.{r}" for k in ("weight", "bias") for r in ROUTES)])
    again = convert_norms(routed, "auxbn")
    assert isinstance(again[0], SandwichAffineNorm)  # already routed: left as it is


def test_each_route_trains_its_own_affine_only():
    routed = convert_norms(nn.Sequential(nn.LayerNorm(C)), "sabn")[0]
    with use_route(routed, "clean"):
        routed(torch.randn(4, C)).square().sum().backward()
    assert routed.route_weight["adv"].grad is None and routed.route_weight["clean"].grad.abs().sum() > 0
    assert routed.shared_weight.grad.abs().sum() > 0
