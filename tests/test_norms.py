"""Layer-level tests of the dual-route norms: the SaBN formula, route isolation, gradients,
parameter counts, the route context managers, conversion and export of single layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from robust.nn.convert import convert_norms
from robust.nn.norms import (
    NORMS,
    ROUTES,
    DualBatchNorm2d,
    SandwichBatchNorm2d,
    SharedBatchNorm2d,
    export_route,
    is_dual_route,
    make_norm_layer,
    routed_norms,
    split_routes,
    use_route,
)

C = 3
EPS = 1e-5


def randomized(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Give every affine parameter and running statistic of ``layer`` a distinct random value,
    so that a formula or a route mix-up cannot hide behind the identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "weight" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for name, b in layer.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=g))
    return layer


def batch(n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, C, 5, 5, generator=g) + 1


def per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def sandwich_by_hand(layer: SandwichBatchNorm2d, route: str, x_hat: torch.Tensor) -> torch.Tensor:
    """y = g_r * (g_s * x_hat + b_s) + b_r, written out from the layer's parameters."""
    g_s, b_s = per_channel(layer.shared_weight), per_channel(layer.shared_bias)
    g_r, b_r = per_channel(layer.route_weight[route]), per_channel(layer.route_bias[route])
    return g_r * (g_s * x_hat + b_s) + b_r


STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def route_buffers(layer: nn.Module, route: str) -> dict[str, torch.Tensor]:
    """Copies of the running statistics that belong to ``route`` (keys like ``stats.adv.running_var``)."""
    return {
        k: v.clone() for k, v in layer.state_dict().items()
        if k.split(".")[-2:-1] == [route] and k.split(".")[-1] in STAT_NAMES
    }


# ---------------------------------------------------------------- the SaBN formula


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.precision
def test_sabn_train_mode_equals_hand_formula_with_batch_stats(route):
    layer = randomized(SandwichBatchNorm2d(C)).train()
    stats = layer.stats[route]
    mean_before, var_before = stats.running_mean.clone(), stats.running_var.clone()
    x = batch()
    with use_route(layer, route):
        y = layer(x)
    mean = x.mean(dim=(0, 2, 3))
    var_biased = x.var(dim=(0, 2, 3), unbiased=False)
    x_hat = (x - per_channel(mean)) / torch.sqrt(per_channel(var_biased) + EPS)
    torch.testing.assert_close(y, sandwich_by_hand(layer, route, x_hat), atol=1e-5, rtol=1e-5)
    # The running statistics moved by momentum 0.1 toward the batch (unbiased variance).
    torch.testing.assert_close(stats.running_mean, 0.9 * mean_before + 0.1 * mean)
    torch.testing.assert_close(stats.running_var, 0.9 * var_before + 0.1 * x.var(dim=(0, 2, 3)))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.precision
def test_sabn_eval_mode_equals_hand_formula_with_running_stats(route):
    layer = randomized(SandwichBatchNorm2d(C)).eval()
    x = batch()
    with use_route(layer, route):
        y = layer(x)
    stats = layer.stats[route]
    x_hat = (x - per_channel(stats.running_mean)) / torch.sqrt(per_channel(stats.running_var) + EPS)
    torch.testing.assert_close(y, sandwich_by_hand(layer, route, x_hat), atol=1e-5, rtol=1e-5)
    # Eval mode leaves the statistics alone.
    assert int(stats.num_batches_tracked) == 0


def test_sabn_routes_give_different_outputs_for_the_same_input():
    layer = randomized(SandwichBatchNorm2d(C)).eval()
    x = batch()
    with use_route(layer, "clean"):
        y_clean = layer(x)
    with use_route(layer, "adv"):
        y_adv = layer(x)
    assert (y_clean - y_adv).abs().max() > 0.1


def test_sabn_init_matches_reference():
    torch.manual_seed(0)
    layer = SandwichBatchNorm2d(100_000)
    gammas = [layer.shared_weight, layer.route_weight["clean"], layer.route_weight["adv"]]
    betas = [layer.shared_bias, layer.route_bias["clean"], layer.route_bias["adv"]]
    for g in gammas:
        # N(1, 0.02): the mean of 1e5 draws has standard error 6e-5.
        assert abs(g.mean().item() - 1.0) < 1e-3
        assert 0.018 < g.std().item() < 0.022
    assert not torch.equal(gammas[0], gammas[1])  # drawn independently
    for b in betas:
        assert torch.equal(b, torch.zeros_like(b))
    for stats in layer.stats.values():
        assert not stats.affine


# ---------------------------------------------------------------- route isolation


@pytest.mark.parametrize("norm", ["auxbn", "sabn"])
@pytest.mark.parametrize("route", ROUTES)
def test_train_forward_in_one_route_changes_only_that_routes_statistics(norm, route):
    layer = randomized(make_norm_layer(norm)(C)).train()
    other = "clean" if route == "adv" else "adv"
    before_mine, before_other = route_buffers(layer, route), route_buffers(layer, other)
    assert len(before_mine) == 3 and len(before_other) == 3
    with use_route(layer, route):
        layer(batch())
    after_mine, after_other = route_buffers(layer, route), route_buffers(layer, other)
    for key, value in before_other.items():
        assert torch.equal(after_other[key], value), key
    for key, value in before_mine.items():
        assert not torch.equal(after_mine[key], value), key


def test_bn_shares_one_set_of_statistics_between_routes():
    layer = randomized(SharedBatchNorm2d(C)).eval()
    x = batch()
    with use_route(layer, "clean"):
        y_clean = layer(x)
    with use_route(layer, "adv"):
        y_adv = layer(x)
    assert torch.equal(y_clean, y_adv)
    layer.train()
    with use_route(layer, "adv"):
        layer(x)
    assert int(layer.num_batches_tracked) == 1
    assert not is_dual_route(layer)
    assert is_dual_route(DualBatchNorm2d(C)) and is_dual_route(SandwichBatchNorm2d(C))


# ---------------------------------------------------------------- split mode on one layer


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.precision
def test_split_layer_equals_two_route_forwards(norm):
    x = batch(7)
    split_layer = randomized(make_norm_layer(norm)(C)).train()
    two_layer = randomized(make_norm_layer(norm)(C)).train()
    with split_routes(split_layer, 4):
        y_split = split_layer(x)
    with use_route(two_layer, "clean"):
        y_clean = two_layer(x[:4])
    with use_route(two_layer, "adv"):
        y_adv = two_layer(x[4:])
    torch.testing.assert_close(y_split, torch.cat([y_clean, y_adv]), atol=1e-6, rtol=1e-6)
    for key, value in two_layer.state_dict().items():
        torch.testing.assert_close(split_layer.state_dict()[key], value, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n_clean, counted_route", [(0, "adv"), (4, "clean"), (9, "clean")])
def test_split_with_an_empty_part_counts_no_batch_for_it(n_clean, counted_route):
    layer = DualBatchNorm2d(C).train()
    with split_routes(layer, n_clean):
        y = layer(batch(4))
    assert y.shape == (4, C, 5, 5)
    other = "clean" if counted_route == "adv" else "adv"
    assert int(layer.bns[counted_route].num_batches_tracked) == 1
    assert int(layer.bns[other].num_batches_tracked) == 0


# ---------------------------------------------------------------- gradients and parameter counts


@pytest.mark.precision
def test_gradients_reach_shared_affine_and_both_route_affines_in_split_mode():
    layer = randomized(SandwichBatchNorm2d(C)).train()
    x = batch(6)
    w = torch.randn(6, C, 5, 5, generator=torch.Generator().manual_seed(3))
    with split_routes(layer, 2):
        (layer(x) * w).sum().backward()
    for p in [layer.shared_weight, layer.shared_bias, *layer.route_weight.values(), *layer.route_bias.values()]:
        assert p.grad is not None and bool((p.grad != 0).all())
    # d/d b_r is the summed upstream gradient of that route's rows; d/d b_s weighs each route by g_r.
    sum_clean, sum_adv = w[:2].sum(dim=(0, 2, 3)), w[2:].sum(dim=(0, 2, 3))
    torch.testing.assert_close(layer.route_bias["clean"].grad, sum_clean)
    torch.testing.assert_close(layer.route_bias["adv"].grad, sum_adv)
    expected_shared = layer.route_weight["clean"].detach() * sum_clean + layer.route_weight["adv"].detach() * sum_adv
    torch.testing.assert_close(layer.shared_bias.grad, expected_shared)


def test_single_route_forward_leaves_the_other_route_affine_without_gradient():
    layer = randomized(SandwichBatchNorm2d(C)).train()
    with use_route(layer, "adv"):
        layer(batch()).square().sum().backward()
    assert layer.route_weight["clean"].grad is None and layer.route_bias["clean"].grad is None
    assert bool((layer.route_weight["adv"].grad != 0).all()) and bool((layer.shared_weight.grad != 0).all())


@pytest.mark.parametrize("channels", [1, 16, 64])
def test_sabn_has_exactly_2c_more_parameters_than_auxbn(channels):
    def count(norm):
        return sum(p.numel() for p in make_norm_layer(norm)(channels).parameters())

    assert count("bn") == 2 * channels
    assert count("auxbn") == 4 * channels
    assert count("sabn") == count("auxbn") + 2 * channels


# ---------------------------------------------------------------- the route context managers


def routes_of(module: nn.Module) -> set[str]:
    return {m.route for m in routed_norms(module)}


def small_stack(norm: str = "sabn") -> nn.Sequential:
    factory = make_norm_layer(norm)
    return nn.Sequential(factory(C), nn.ReLU(), factory(C))


def test_use_route_restores_when_nested():
    model = small_stack()
    assert routes_of(model) == {"adv"}  # the default route
    with use_route(model, "clean"):
        assert routes_of(model) == {"clean"}
        with use_route(model, "adv"):
            assert routes_of(model) == {"adv"}
            with use_route(model, "clean"):
                assert routes_of(model) == {"clean"}
            assert routes_of(model) == {"adv"}
        assert routes_of(model) == {"clean"}
    assert routes_of(model) == {"adv"}


def test_use_route_restores_on_exception():
    model = small_stack()
    with use_route(model, "clean"):
        with pytest.raises(RuntimeError, match="boom"):
            with use_route(model, "adv"):
                raise RuntimeError("boom")
        assert routes_of(model) == {"clean"}
    with pytest.raises(KeyError):
        with split_routes(model, 2):
            assert {m.split_at for m in routed_norms(model)} == {2}
            raise KeyError("inside split")
    assert {m.split_at for m in routed_norms(model)} == {None}
    assert routes_of(model) == {"adv"}


def test_use_route_is_independent_of_train_eval_mode():
    model = small_stack()
    with use_route(model, "clean"):
        model.eval()
        assert routes_of(model) == {"clean"}
        model.train()
        assert routes_of(model) == {"clean"}
    assert model.training


def test_use_route_inside_split_routes_takes_over_and_then_gives_back():
    model = small_stack()
    with split_routes(model, 3):
        with use_route(model, "clean"):
            assert {(m.route, m.split_at) for m in routed_norms(model)} == {("clean", None)}
        assert {m.split_at for m in routed_norms(model)} == {3}


# ---------------------------------------------------------------- bad names


def assert_lists_all(excinfo, names):
    message = str(excinfo.value)
    for name in names:
        assert name in message, (name, message)


def test_unknown_route_raises_value_error_listing_routes():
    model = small_stack()
    with pytest.raises(ValueError, match="'sideways'") as excinfo:
        use_route(model, "sideways")
    assert_lists_all(excinfo, ROUTES)
    with pytest.raises(ValueError) as excinfo:
        export_route(model, "Adv")
    assert_lists_all(excinfo, ROUTES)
    assert routes_of(model) == {"adv"}


def test_unknown_norm_raises_value_error_listing_norms():
    with pytest.raises(ValueError, match="'groupnorm'") as excinfo:
        make_norm_layer("groupnorm")
    assert_lists_all(excinfo, NORMS)
    with pytest.raises(ValueError) as excinfo:
        convert_norms(nn.Sequential(nn.BatchNorm2d(C)), "saban")
    assert_lists_all(excinfo, NORMS)


def test_negative_split_raises_value_error():
    with pytest.raises(ValueError, match="n_clean"):
        split_routes(small_stack(), -1)


# ---------------------------------------------------------------- export and conversion of layers


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.precision
def test_layer_export_is_a_plain_batchnorm_equal_in_eval_mode(norm, route):
    layer = randomized(make_norm_layer(norm)(C)).eval()
    plain = layer.export_route(route).eval()
    assert type(plain) is nn.BatchNorm2d
    x = batch()
    with use_route(layer, route):
        torch.testing.assert_close(plain(x), layer(x), atol=1e-5, rtol=0)


@pytest.mark.precision
def test_sabn_export_folds_the_affines():
    layer = randomized(SandwichBatchNorm2d(C))
    plain = layer.export_route("clean")
    g_r, b_r = layer.route_weight["clean"], layer.route_bias["clean"]
    torch.testing.assert_close(plain.weight.detach(), (g_r * layer.shared_weight).detach())
    torch.testing.assert_close(plain.bias.detach(), (g_r * layer.shared_bias + b_r).detach())
    assert torch.equal(plain.running_var, layer.stats["clean"].running_var)
    assert plain.weight.is_leaf and plain.weight.requires_grad  # a trainable parameter, not a graph node


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.precision
def test_export_keeps_the_layers_dtype(norm):
    layer = randomized(make_norm_layer(norm)(C)).double().eval()
    plain = layer.export_route("adv").eval()
    assert plain.weight.dtype == torch.float64 and plain.running_mean.dtype == torch.float64
    x = batch().double()
    with use_route(layer, "adv"):
        torch.testing.assert_close(plain(x), layer(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("bn_kwargs", [dict(affine=False), dict(track_running_stats=False), dict(momentum=None)])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.precision
def test_convert_keeps_function_of_unusual_batchnorms(norm, bn_kwargs, train):
    def original() -> nn.Sequential:
        return randomized(nn.Sequential(nn.BatchNorm2d(C, **bn_kwargs), nn.ReLU())).train(train)

    x = batch()
    expected = original()(x)
    for route in ROUTES:
        converted = convert_norms(original(), norm)
        assert isinstance(converted[0], make_norm_layer(norm))
        assert converted[0].training == train  # the layer keeps the mode of the BN it replaced
        with use_route(converted, route):
            torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=0)
        exported = export_route(convert_norms(original(), norm), route)
        assert type(exported[0]) is nn.BatchNorm2d
        torch.testing.assert_close(exported(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("first, second", [("sabn", "auxbn"), ("auxbn", "sabn"), ("bn", "sabn"), ("sabn", "sabn")])
def test_convert_leaves_routed_norms_alone(first, second):
    model = small_stack(first)
    keys = list(model.state_dict())
    again = convert_norms(model, second)
    assert again is model
    assert list(again.state_dict()) == keys
    assert all(type(m) is make_norm_layer(first) for m in routed_norms(again))
    assert len(list(routed_norms(again))) == 2


class SubclassedBatchNorm2d(nn.BatchNorm2d):
    """Stands in for a library subclass (a synchronized BN) placed inside a routed norm."""


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.precision
def test_export_gives_exactly_nn_batchnorm2d_even_from_subclassed_inner_bns(norm):
    layer = randomized(make_norm_layer(norm)(C))
    if norm == "auxbn":
        inner = SubclassedBatchNorm2d(C)
        inner.load_state_dict(layer.bns["adv"].state_dict())
        layer.bns["adv"] = inner
    elif norm == "sabn":
        inner = SubclassedBatchNorm2d(C, affine=False)
        inner.load_state_dict(layer.stats["adv"].state_dict())
        layer.stats["adv"] = inner
    layer.eval()
    plain = layer.export_route("adv").eval()
    assert type(plain) is nn.BatchNorm2d
    x = batch()
    with use_route(layer, "adv"):
        torch.testing.assert_close(plain(x), layer(x), atol=1e-5, rtol=0)
