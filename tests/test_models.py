"""Model-level tests: the architectures, split mode on a whole model, route isolation, export to a
plain model, torchattacks through a chosen route, and conversion of a torchvision ResNet."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchattacks
import torchvision

from helpers import assert_refused

from robust.checkpoint import build_checkpoint, load_checkpoint, load_model, save_checkpoint
from robust.nn.factory import build_model
from robust.nn.convert import convert_norms
from robust.nn.norms import (
    NORMS,
    ROUTES,
    RoutedNorm,
    export_route,
    is_dual_route,
    routed_norms,
    split_routes,
    use_route,
)
from robust.nn.resnet import available_archs

SMALL = dict(arch="preact_resnet18", num_classes=10, in_channels=3, width=4)
STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")
FINAL_ADV_VAR = {  # the last norm of PreAct-18 (the reference has none after the last block)
    "bn": "blocks.7.bn2.running_var",
    "auxbn": "blocks.7.bn2.bns.adv.running_var",
    "sabn": "blocks.7.bn2.stats.adv.running_var",
}


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm affine and running statistic a distinct random value, so that the two routes
    of a dual model differ (as after training) and no check can pass by the identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, (RoutedNorm, nn.BatchNorm2d)):
                continue
            for name, p in m.named_parameters(recurse=False):
                scale, shift = (0.2, 1.0) if "weight" in name else (0.2, 0.0)
                p.copy_(shift + scale * torch.randn(p.shape, generator=g))
            for name, p in m.named_parameters():  # ParameterDicts of a sandwich norm
                if "route_" in name:
                    shift = 1.0 if "weight" in name else 0.0
                    p.copy_(shift + 0.2 * torch.randn(p.shape, generator=g))
            for name, b in m.named_buffers(recurse=False):
                if name == "running_mean":
                    b.copy_(0.3 * torch.randn(b.shape, generator=g))
                elif name == "running_var":
                    b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def images(n: int, seed: int, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def small_model(norm: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(build_model(norm=norm, **{**SMALL, **overrides}), seed)


def route_stats(model: nn.Module, route: str) -> dict[str, torch.Tensor]:
    """Copies of the running statistics of ``route`` (keys like ``blocks.0.bn1.stats.adv.running_var``)."""
    return {
        k: v.clone() for k, v in model.state_dict().items()
        if k.split(".")[-2:-1] == [route] and k.split(".")[-1] in STAT_NAMES
    }


def routes_and_modes(model: nn.Module) -> tuple[set[str], list[bool]]:
    return {m.route for m in routed_norms(model)}, [m.training for m in model.modules()]


# ---------------------------------------------------------------- architectures


@pytest.mark.parametrize("arch, norm_layers", [("preact_resnet18", 16), ("preact_resnet34", 32), ("wide_resnet34_10", 31)])
@pytest.mark.parametrize("norm", NORMS)
def test_every_arch_runs_on_one_channel_28x28_inputs(arch, norm_layers, norm):
    model = build_model(arch, norm=norm, num_classes=10, in_channels=1, width=4).eval()
    logits = model(torch.rand(2, 1, 28, 28))
    assert logits.shape == (2, 10) and bool(torch.isfinite(logits).all())
    assert len(list(routed_norms(model))) == norm_layers
    assert model.build_args == dict(
        arch=arch, norm=norm, num_classes=10, in_channels=1, width=4, mean=[0.5], std=[0.5],
        final_norm=arch == "wide_resnet34_10",  # TRADES's WRN ends with BN + ReLU; the reference PreAct does not
    )
    assert is_dual_route(model) == (norm != "bn")


def parameter_count(**kwargs) -> int:
    with torch.device("meta"):  # no memory, no init cost: only the shapes matter
        return sum(p.numel() for p in build_model(**kwargs).parameters())


def test_full_size_parameter_counts_match_the_reference_architectures():
    # PreAct ResNet-18 of the SaBN reference (layer4 -> avg pool -> linear): 11,171,146 with BN,
    # 11,184,714 with SaAuxBN (its README); fast_adversarial's variant adds a final BN (+1,024).
    assert parameter_count(arch="preact_resnet18", norm="bn") == 11_171_146
    assert parameter_count(arch="preact_resnet18", norm="sabn") == 11_184_714
    assert parameter_count(arch="preact_resnet18", norm="bn", final_norm=True) == 11_172_170
    # WRN-34-10 of Madry et al. / TRADES: 46.16M parameters.
    assert parameter_count(arch="wide_resnet34_10", norm="bn") == 46_160_474


def test_channel_plan_of_the_architectures():
    resnet18 = build_model("preact_resnet18", norm="bn", width=4)
    assert [b.conv2.out_channels for b in resnet18.blocks] == [4, 4, 8, 8, 16, 16, 32, 32]
    resnet34 = build_model("preact_resnet34", norm="bn", width=4)
    assert [b.conv2.out_channels for b in resnet34.blocks] == [4] * 3 + [8] * 4 + [16] * 6 + [32] * 3
    wrn = build_model("wide_resnet34_10", norm="bn", width=4)
    assert wrn.stem.out_channels == 16
    assert [b.conv2.out_channels for b in wrn.blocks] == [4] * 5 + [8] * 5 + [16] * 5
    with torch.device("meta"):
        assert build_model("wide_resnet34_10", norm="bn").build_args["width"] == 160


def test_input_normalization_lives_inside_the_model():
    model = build_model(norm="bn", width=4, in_channels=3)
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    model = build_model(norm="bn", width=4, in_channels=1, mean=[0.25], std=[0.5])
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(model.normalize(x), (x - 0.25) / 0.5)


def test_unknown_arch_and_norm_raise_value_error_listing_valid_names():
    with pytest.raises(ValueError, match="'resnet9000'") as excinfo:
        build_model("resnet9000")
    for name in available_archs():
        assert name in str(excinfo.value)
    assert set(available_archs()) >= {"preact_resnet18", "preact_resnet34", "wide_resnet34_10"}
    with pytest.raises(ValueError, match="'batchnorm'") as excinfo:
        build_model("preact_resnet18", norm="batchnorm", width=4)
    for name in NORMS:
        assert name in str(excinfo.value)


@pytest.mark.parametrize("bad, message", [
    (dict(width=0), "width"),
    (dict(num_classes=1), "num_classes"),
    (dict(in_channels=1, mean=[0.5, 0.5], std=[0.5, 0.5]), "mean/std"),
    (dict(in_channels=1, mean=[0.5], std=[0.0]), "std must be positive"),
])
def test_bad_build_arguments_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        build_model(**{**SMALL, **bad})


def test_sabn_model_has_2c_more_parameters_per_norm_layer_than_auxbn():
    def count(norm):
        return sum(p.numel() for p in build_model(norm=norm, **SMALL).parameters())

    channels = sum(m.num_features for m in routed_norms(build_model(norm="sabn", **SMALL)))
    assert count("sabn") - count("auxbn") == 2 * channels
    assert count("auxbn") - count("bn") == 2 * channels


# ---------------------------------------------------------------- split mode on a whole model


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.precision
def test_split_forward_equals_two_route_forwards(norm):
    split_model = small_model(norm).train()
    two_model = copy.deepcopy(split_model)
    x, x_adv = images(5, seed=1), images(3, seed=2)
    weights = torch.randn(8, 10, generator=torch.Generator().manual_seed(3))

    with split_routes(split_model, 5):
        out_split = split_model(torch.cat([x, x_adv]))
    (out_split * weights).sum().backward()

    with use_route(two_model, "clean"):
        out_clean = two_model(x)
    with use_route(two_model, "adv"):
        out_adv = two_model(x_adv)
    (torch.cat([out_clean, out_adv]) * weights).sum().backward()

    torch.testing.assert_close(out_split, torch.cat([out_clean, out_adv]), atol=1e-5, rtol=1e-5)
    two_params = dict(two_model.named_parameters())
    for name, p in split_model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, two_params[name].grad, atol=1e-5, rtol=1e-5, msg=name)
    two_buffers = dict(two_model.named_buffers())
    for name, b in split_model.named_buffers():
        torch.testing.assert_close(b, two_buffers[name], atol=1e-5, rtol=1e-5, msg=name)
    # Training-mode statistics really moved (so the comparison above is not of untouched buffers).
    key = FINAL_ADV_VAR[norm]
    assert not torch.equal(split_model.state_dict()[key], small_model(norm).state_dict()[key])


@pytest.mark.precision
def test_split_forward_in_eval_mode_equals_two_route_forwards():
    model = small_model("sabn").eval()
    x, x_adv = images(4, seed=1), images(4, seed=2)
    with split_routes(model, 4):
        out = model(torch.cat([x, x_adv]))
    with use_route(model, "clean"):
        out_clean = model(x)
    with use_route(model, "adv"):
        out_adv = model(x_adv)
    torch.testing.assert_close(out, torch.cat([out_clean, out_adv]), atol=1e-5, rtol=1e-5)
    assert (out_clean - model(x)).abs().max() > 1e-3  # the default route (adv) differs from clean


# ---------------------------------------------------------------- route isolation


@pytest.mark.parametrize("norm", ["auxbn", "sabn"])
def test_train_forward_in_adv_changes_only_adv_statistics(norm):
    model = small_model(norm).train()
    params_before = {k: v.clone() for k, v in model.named_parameters()}
    clean_before, adv_before = route_stats(model, "clean"), route_stats(model, "adv")
    assert len(clean_before) == len(adv_before) == 3 * len(list(routed_norms(model)))
    with use_route(model, "adv"):
        model(images(4, seed=5))
    clean_after, adv_after = route_stats(model, "clean"), route_stats(model, "adv")
    for key, value in clean_before.items():
        assert torch.equal(clean_after[key], value), key
    for key, value in adv_before.items():
        assert not torch.equal(adv_after[key], value), key
    for key, value in model.named_parameters():
        assert torch.equal(value, params_before[key]), key


# ---------------------------------------------------------------- export to a plain model


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.precision
def test_export_equals_the_route_and_loads_into_a_bn_model(norm, route):
    model = small_model(norm).train()
    for r, seed in (("clean", 7), ("adv", 8)):  # real batch statistics in both routes
        with use_route(model, r):
            model(images(6, seed))
    model.eval()
    x = images(4, seed=9)
    with use_route(model, route):
        expected = model(x)

    exported = export_route(model, route).eval()
    norm_like = [m for m in exported.modules() if isinstance(m, (RoutedNorm, nn.modules.batchnorm._NormBase))]
    assert len(norm_like) == len(list(routed_norms(model))) == 16
    assert all(type(m) is nn.BatchNorm2d for m in norm_like)
    assert not is_dual_route(exported)
    assert (exported(x) - expected).abs().max().item() <= 1e-5
    assert exported.build_args["norm"] == "bn" and exported.build_args["exported_route"] == route

    plain = build_model(norm="bn", **SMALL)
    plain.load_state_dict(exported.state_dict(), strict=True)
    plain.eval()
    assert (plain(x) - expected).abs().max().item() <= 1e-5
    # The source model is untouched by the export.
    assert len(list(routed_norms(model))) == 16 and not model.training


def test_export_of_the_two_routes_differs_for_a_dual_model():
    model = small_model("sabn").eval()
    x = images(4, seed=9)
    clean, adv = export_route(model, "clean").eval(), export_route(model, "adv").eval()
    assert (clean(x) - adv(x)).abs().max() > 1e-3


@pytest.mark.precision
def test_export_keeps_the_models_dtype():
    model = small_model("sabn").double().eval()
    x = images(2, seed=9).double()
    exported = export_route(model, "adv").eval()
    assert {p.dtype for p in exported.parameters()} == {torch.float64}
    with use_route(model, "adv"):
        torch.testing.assert_close(exported(x), model(x), atol=1e-10, rtol=0)


# ---------------------------------------------------------------- torchattacks through a route


def pgd(model: nn.Module) -> torchattacks.PGD:
    return torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=4, random_start=True)


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.precision
def test_torchattacks_pgd_inside_use_route_attacks_that_route_and_restores_state(train_mode):
    # float64 so that the dual model and its export give the same gradient signs, step for step.
    model = small_model("sabn").double().train(train_mode)
    x, y = images(4, seed=11).double(), torch.tensor([0, 1, 2, 3])
    with use_route(model, "clean"):
        before = routes_and_modes(model)
        with use_route(model, "adv"):
            torch.manual_seed(0)
            x_adv = pgd(model)(x, y)
            assert {m.route for m in routed_norms(model)} == {"adv"}
        assert routes_and_modes(model) == before == ({"clean"}, [train_mode] * len(before[1]))
    assert {m.route for m in routed_norms(model)} == {"adv"}

    assert (x_adv - x).abs().max().item() <= 8 / 255 + 1e-9 and (x_adv - x).abs().max() > 1e-3
    # The same attack, same seed, on plain exports of each route: it matches the adv export only.
    torch.manual_seed(0)
    x_adv_export = pgd(export_route(model, "adv"))(x, y)
    torch.manual_seed(0)
    x_clean_export = pgd(export_route(model, "clean"))(x, y)
    torch.testing.assert_close(x_adv, x_adv_export, atol=1e-9, rtol=0)
    assert (x_adv - x_clean_export).abs().gt(1e-3).float().mean() > 0.2


def test_torchattacks_with_train_mode_batchnorms_only_moves_the_adv_statistics():
    model = small_model("auxbn").train()
    clean_before, adv_before = route_stats(model, "clean"), route_stats(model, "adv")
    attack = pgd(model)
    attack.set_model_training_mode(model_training=True, batchnorm_training=True)
    with use_route(model, "adv"):
        attack(images(4, seed=12), torch.tensor([0, 1, 2, 3]))
    for key, value in route_stats(model, "clean").items():
        assert torch.equal(value, clean_before[key]), key
    adv_after = route_stats(model, "adv")
    key = "blocks.7.bn2.bns.adv.num_batches_tracked"
    assert int(adv_after[key]) == int(adv_before[key]) + 4  # one count per PGD step
    assert model.training and {m.route for m in routed_norms(model)} == {"adv"}


def test_a_checkpoint_written_before_the_final_norm_option_still_loads():
    """Models of robust 0.1 always had the final norm and their model_args do not name it."""

    old = small_model("sabn", final_norm=True).eval()
    state = build_checkpoint(old)
    del state["model_args"]["final_norm"]
    rebuilt = load_model(state)
    assert rebuilt.final_norm is not None
    x = images(2, seed=3)
    assert torch.equal(rebuilt(x), old(x))
    plain = build_checkpoint(small_model("sabn"))
    del plain["model_args"]["final_norm"]
    assert load_model(plain).final_norm is None


# ---------------------------------------------------------------- bring your own architecture


@pytest.fixture(scope="module")
def torchvision_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(weights=None, num_classes=10)).eval()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.precision
def test_convert_norms_on_torchvision_resnet18_keeps_its_logits(torchvision_resnet18, norm):
    x = images(2, seed=13, size=32)
    expected = torchvision_resnet18(x)
    plain_bns = sum(type(m) is nn.BatchNorm2d for m in torchvision_resnet18.modules())
    assert plain_bns == 20

    converted = convert_norms(copy.deepcopy(torchvision_resnet18), norm)
    assert len(list(routed_norms(converted))) == plain_bns
    routed_names = [n for n, m in converted.named_modules() if isinstance(m, RoutedNorm)]
    for name, m in converted.named_modules():
        if type(m) is nn.BatchNorm2d:  # only the per-route parts inside a routed norm remain plain
            assert any(name.startswith(r + ".") for r in routed_names), name
    assert not converted.training and not any(m.training for m in converted.modules())
    for route in ROUTES:
        with use_route(converted, route):
            torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, count", [("wide_resnet28_10", 36_479_194), ("wide_resnet34_10", 46_160_474),
                                         ("wide_resnet70_16", 266_796_506), ("wide_resnet16_4", 2_748_890),
                                         ("wide_resnet40_2", 2_243_546)])
def test_wide_resnets_have_the_standard_parameter_counts(arch, count):
    """Plain BN and ReLU on CIFAR-10, as the standard WideResNet (TRADES's, DeepMind's) counts them."""
    with torch.device("meta"):  # counted without allocating WRN-70-16's 1 GB of weights
        model = build_model(arch, norm="bn", num_classes=10, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == count


def test_any_wrn_depth_and_widen_factor_builds_and_others_are_refused(tmp_path):
    torch.manual_seed(0)
    family = build_model("wide_resnet22_2", norm="sabn", in_channels=1)
    assert family.build_args["width"] == 32 and len(family.blocks) == 9  # three groups of (22 - 4) / 6 blocks
    assert [family.blocks[i].conv1.out_channels for i in (0, 3, 6)] == [32, 64, 128]  # 16 x 2, doubling
    for bad in ("wide_resnet27_10", "wide_resnet4_2", "wide_resnet28_0"):
        with pytest.raises(ValueError, match="depth D = 6n \\+ 4"):
            build_model(bad)
    assert_refused(tmp_path, ["train", "--arch", "wide_resnet27_10", "--out", "r"], "unknown arch 'wide_resnet27_10'",
                   "wide_resnetD_K")


def test_silu_models_differ_from_relu_only_in_the_activation_and_round_trip_checkpoints(tmp_path):
    torch.manual_seed(0)
    relu = build_model("wide_resnet28_10", norm="sabn", in_channels=1, width=4)
    torch.manual_seed(0)
    silu = build_model("wide_resnet28_10", norm="sabn", in_channels=1, width=4, activation="silu")
    assert relu.state_dict().keys() == silu.state_dict().keys() and silu.build_args["activation"] == "silu"
    x = torch.rand(2, 1, 28, 28)
    relu.eval(), silu.eval()
    with torch.no_grad(), use_route(relu, "adv"), use_route(silu, "adv"):
        assert not torch.allclose(relu(x), silu(x))
        save_checkpoint(build_checkpoint(silu, dataset="fashion-mnist"), tmp_path / "s.pt")
        rebuilt = load_model(load_checkpoint(tmp_path / "s.pt"))
        assert torch.equal(rebuilt(x), silu(x))
    with pytest.raises(ValueError, match="activation applies to our own architectures"):
        build_model("torchvision:resnet18", norm="bn", activation="silu")


def test_build_model_takes_its_options_by_keyword_and_refuses_an_unknown_one():
    from robust.nn.factory import ModelOptions
    model = build_model("preact_resnet18", "sabn", 10, 1, 4, (0.5,), (0.25,), final_norm=True, activation="silu")
    assert model.build_args["mean"] == [0.5] and model.build_args["std"] == [0.25]
    assert model.build_args["final_norm"] and model.build_args["activation"] == "silu"
    rebuilt = build_model(**model.build_args)  # what a checkpoint does
    assert rebuilt.build_args == model.build_args
    with pytest.raises(TypeError, match="unexpected keyword argument 'final_nrom'.*final_norm, activation, image_size, patch_size"):
        build_model("preact_resnet18", "sabn", 10, 1, 4, final_nrom=True)
    assert ModelOptions() == ModelOptions(final_norm=None, activation="relu", image_size=None, patch_size=None)
