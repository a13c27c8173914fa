"""timm's BatchNormAct2d (and SyncBatchNormAct) as dual-route norms (robust.nn.norm_act): the activation and
drop path kept, each route's statistics, split = two route forwards, export back to the same class."""

from __future__ import annotations

import copy

import pytest
import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F

from robust.nn.convert import convert_norms, unconverted_norms
from robust.nn.norm_act import RoutedBatchNormAct
from robust.nn.norms import (
    NORMS,
    ROUTES,
    DualBatchNorm2d,
    SandwichBatchNorm2d,
    export_route,
    is_dual_route,
    split_routes,
    use_route,
)
from robust.nn.syncbn import SyncBatchNorm2d, SyncSharedBatchNorm2d, convert_sync_batchnorm

C = 5


def norm_act(act=nn.SiLU, drop=None, seed: int = 0) -> timm.layers.BatchNormAct2d:
    """A BatchNormAct2d with distinct random statistics and affine (as after training)."""
    layer = timm.layers.BatchNormAct2d(C, act_layer=act, drop_layer=drop)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.3 * torch.randn(C, generator=g))
        layer.bias.copy_(0.3 * torch.randn(C, generator=g))
        layer.running_mean.copy_(0.3 * torch.randn(C, generator=g))
        layer.running_var.copy_(0.5 + torch.rand(C, generator=g))
        layer.num_batches_tracked.fill_(7)
    return layer


def batch(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, C, 3, 3, generator=torch.Generator().manual_seed(seed))


def converted(norm: str, layer: nn.Module | None = None) -> RoutedBatchNormAct:
    return convert_norms(nn.Sequential(copy.deepcopy(layer if layer is not None else norm_act())), norm)[0]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("train", [False, True])
def test_conversion_keeps_the_layers_function_in_both_routes(norm, train):
    layer = norm_act().train(train)
    for route in ROUTES:
        routed = converted(norm, layer).train(train)
        assert isinstance(routed, RoutedBatchNormAct)
        with use_route(routed, route):
            got = routed(batch())
        torch.testing.assert_close(got, copy.deepcopy(layer)(batch()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("route", ROUTES)
def test_sabn_equals_the_hand_formula_then_the_activation(route):
    routed = converted("sabn").eval()
    with torch.no_grad():
        for r in ROUTES:  # routes that differ, as after training
            routed.norm.route_weight[r].normal_(1, 0.3)
            routed.norm.route_bias[r].normal_(0, 0.3)
        routed.norm.stats["clean"].running_var.mul_(2)
    stats, x = routed.norm.stats[route], batch()
    shape = (1, C, 1, 1)
    x_hat = (x - stats.running_mean.view(shape)) / torch.sqrt(stats.running_var.view(shape) + stats.eps)
    g_r, b_r = routed.norm.route_weight[route].view(shape), routed.norm.route_bias[route].view(shape)
    expected = F.silu(g_r * (routed.norm.shared_weight.view(shape) * x_hat + routed.norm.shared_bias.view(shape)) + b_r)
    with use_route(routed, route):
        torch.testing.assert_close(routed(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["auxbn", "sabn"])
def test_a_training_forward_updates_only_its_routes_statistics(norm):
    routed = converted(norm).train()
    inner = routed.norm.bns if isinstance(routed.norm, DualBatchNorm2d) else routed.norm.stats
    before = {r: inner[r].running_mean.clone() for r in ROUTES}
    with use_route(routed, "adv"):
        routed(batch())
    assert torch.equal(inner["clean"].running_mean, before["clean"])
    assert not torch.equal(inner["adv"].running_mean, before["adv"])


@pytest.mark.parametrize("norm", NORMS)
def test_split_equals_two_route_forwards(norm):
    split_layer, two = converted(norm).train(), converted(norm).train()
    x, n = batch(8), 3
    with split_routes(split_layer, n):
        split = split_layer(x)
    with use_route(two, "clean"):
        clean = two(x[:n])
    with use_route(two, "adv"):
        adv = two(x[n:])
    torch.testing.assert_close(split, torch.cat([clean, adv]), rtol=0, atol=0)
    for (k, a), b in zip(split_layer.state_dict().items(), two.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("route", ROUTES)
def test_export_is_a_batchnormact2d_with_its_activation_equal_to_the_route(norm, route):
    routed = converted(norm, norm_act(act=nn.Hardswish)).eval()
    with torch.no_grad():
        for p in routed.norm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    exported = export_route(nn.Sequential(routed), route)[0]
    assert type(exported) is timm.layers.BatchNormAct2d and isinstance(exported.act, nn.Hardswish)
    fresh = timm.layers.BatchNormAct2d(C, act_layer=nn.Hardswish).eval()
    fresh.load_state_dict(exported.state_dict(), strict=True)
    with use_route(routed, route):
        torch.testing.assert_close(fresh(batch()), routed(batch()), rtol=1e-5, atol=1e-6)


def test_the_drop_path_is_kept_and_applied_after_the_norm():
    layer = norm_act(drop=lambda: nn.Dropout(0.5)).train()
    routed = converted("sabn", layer).train()
    torch.manual_seed(3)
    expected = layer(batch())
    torch.manual_seed(3)
    with use_route(routed, "adv"):
        got = routed(batch())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got == 0).float().mean() > 0.3  # the dropout did act
    assert isinstance(export_route(nn.Sequential(routed), "adv")[0].drop, nn.Dropout)


def test_timms_synced_variant_converts_and_exports_back_to_its_class():
    synced = timm.layers.convert_sync_batchnorm(nn.Sequential(norm_act()))[0]
    assert type(synced) is timm.layers.SyncBatchNormAct
    routed = converted("sabn", synced).eval()
    with use_route(routed, "adv"):
        torch.testing.assert_close(routed(batch()), norm_act().eval()(batch()), rtol=1e-5, atol=1e-6)
    exported = export_route(nn.Sequential(routed), "adv")[0]
    assert type(exported) is timm.layers.SyncBatchNormAct and isinstance(exported.act, nn.SiLU)


def test_route_aware_syncbn_reaches_the_batch_norm_inside():
    model = convert_sync_batchnorm(nn.Sequential(converted("sabn"), converted("bn")))
    assert all(isinstance(model[0].norm.stats[r], SyncBatchNorm2d) for r in ROUTES)
    assert isinstance(model[0].norm, SandwichBatchNorm2d) and isinstance(model[1].norm, SyncSharedBatchNorm2d)


def test_frozen_batch_norms_are_kept_as_they_are():
    frozen = timm.layers.FrozenBatchNormAct2d(C)
    model = convert_norms(nn.Sequential(frozen, nn.BatchNorm2d(C)), "sabn")
    assert model[0] is frozen and isinstance(model[1], SandwichBatchNorm2d)
    assert not unconverted_norms(model)


@pytest.mark.parametrize("norm", NORMS)
def test_a_state_dict_without_its_version_metadata_loads_strictly(norm):
    saved = dict(converted(norm).state_dict())  # a plain dict, as a checkpoint holds it
    fresh = converted(norm)
    fresh.load_state_dict(saved, strict=True)
    assert fresh.state_dict().keys() == saved.keys()


def test_under_bn_the_keys_are_the_timm_layers_own_and_an_export_loads_back():
    layer = norm_act(act=nn.PReLU)  # an activation with a weight of its own
    routed = converted("bn", layer)
    assert sorted(routed.state_dict()) == sorted(layer.state_dict())
    exported = export_route(nn.Sequential(converted("sabn", layer)), "adv")[0]
    again = converted("bn", layer)
    again.load_state_dict(exported.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(batch()), exported.eval()(batch()), rtol=1e-5, atol=1e-6)
    assert {"act.weight", "shared_weight", "route_weight.adv", "stats.adv.running_mean"} <= set(
        converted("sabn", layer).state_dict())


@pytest.mark.parametrize("norm", NORMS)
def test_a_model_of_shared_batchnormact_layers_has_one_route(norm):
    assert is_dual_route(nn.Sequential(converted(norm))) == (norm != "bn")
