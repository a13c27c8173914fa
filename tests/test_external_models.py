"""ConvNeXt, ViT and EfficientNet (LayerNorm, LayerNorm2d, BatchNormAct2d) as dual-route models, end to end:
conversion keeps the model's function, training, evaluation, exact resume, and the exported adv route
loading strictly into the library's own constructor with the dual-route model's logits."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from helpers import assert_refused, tiny_config

import robust
from robust.checkpoint import load_checkpoint
from robust.cli.main import cli
from robust.data.types import ImageData
from robust.errors import ModelError
from robust.nn.convert import convert_norms
from robust.nn.norms import ROUTES, RoutedNorm, export_route, use_route
from robust.train.trainer import Trainer

# name: (image side, timm keywords beyond num_classes and in_chans); sides kept small for the CPU
MODELS = {
    "convnext_atto": (32, {}),  # its stem and three downsamplings need 32 pixels
    "vit_tiny_patch16_224": (32, {"img_size": 32, "patch_size": 8}),
    "efficientnet_b0": (16, {}),
}


def resized(fmnist, side: int, n: int = 48, n_test: int = 8) -> ImageData:
    """Real Fashion-MNIST images at ``side`` x ``side`` (bilinear, as uint8), for models that want that size."""
    def size(x):
        return F.interpolate(x.float(), size=(side, side), mode="bilinear", antialias=True).round().clamp(0, 255).byte()
    return ImageData("fashion-mnist", size(fmnist.train_x[:n]), fmnist.train_y[:n], size(fmnist.test_x[:n_test]),
                     fmnist.test_y[:n_test])


def perturb_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every routed norm's affine off its init, routes apart (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RoutedNorm):
                for _, p in m.named_parameters(recurse=False):
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
                for name, p in m.named_parameters():
                    if "route_" in name:
                        p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.precision
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("norm", ["bn", "auxbn", "sabn"])
def test_conversion_keeps_the_models_function_in_both_routes(name, norm):
    side, kwargs = MODELS[name]
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=10, in_chans=1, **kwargs).eval()
    converted = convert_norms(copy.deepcopy(net), norm).eval()
    x = torch.rand(2, 1, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(x)
        for route in ROUTES:
            with use_route(converted, route):
                torch.testing.assert_close(converted(x), expected, rtol=0, atol=1e-5)


_config = partial(tiny_config, width=None, limit=16, batch_size=16, val_limit=4, device="cpu", save_every=0.0)


@pytest.mark.precision
@pytest.mark.parametrize("name", list(MODELS))
def test_trains_evaluates_resumes_exactly_and_exports_into_timm(tmp_path, fmnist, name):
    side, kwargs = MODELS[name]
    data = resized(fmnist, side)
    extra = {"patch_size": kwargs["patch_size"]} if "patch_size" in kwargs else {}
    arch = f"timm:{name}"
    Trainer(_config(tmp_path / "a", arch=arch, epochs=2, **extra), data=data, log=lambda m: None).fit()
    Trainer(_config(tmp_path / "b", arch=arch, epochs=1, **extra), data=data, log=lambda m: None).fit()
    Trainer(_config(tmp_path / "b", arch=arch, epochs=2, **extra), data=data, resume=True, log=lambda m: None).fit()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key  # the resumed run is the uninterrupted one
    assert a["model_args"].get("image_size") == (side if "img_size" in kwargs else None)

    model = robust.load_model(tmp_path / "a" / "last.pt", weights="live")
    x, y = data.test_x[:4].float() / 255, data.test_y[:4]
    report = robust.evaluate(model, (x, y), attacks="pgd20", eps=0.1, route="adv")
    with torch.no_grad(), use_route(model, "adv"):
        logits = model(x)
    assert report["routes"]["adv"]["clean"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert report["routes"]["adv"]["pgd20"] <= report["routes"]["adv"]["clean"]

    plain = timm.create_model(name, num_classes=10, in_chans=1, **kwargs)
    plain.load_state_dict(export_route(model, "adv").state_dict())  # strict: the same keys and shapes
    plain.eval()
    mean, std = model.build_args["mean"][0], model.build_args["std"][0]
    with torch.no_grad():
        torch.testing.assert_close(plain((x - mean) / std), logits, rtol=0, atol=1e-5)


@pytest.mark.precision
@pytest.mark.parametrize("name, call", [
    ("vit_tiny_patch16_224", "timm.create_model('vit_tiny_patch16_224', num_classes=10, in_chans=1, img_size=32, "
                             "patch_size=8)"),
    ("efficientnet_b0", "timm.create_model('efficientnet_b0', num_classes=10, in_chans=1)"),
])
def test_the_cli_export_names_the_constructor_and_the_file_loads_into_it_and_into_robust(tmp_path, fmnist, name, call):
    side, kwargs = MODELS[name]
    data = resized(fmnist, side)
    extra = {"patch_size": kwargs["patch_size"]} if "patch_size" in kwargs else {}
    Trainer(_config(tmp_path / "run", arch=f"timm:{name}", norm="auxbn", epochs=1, **extra), data=data,
            log=lambda m: None).fit()
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run" / "last.pt"), "-o", str(tmp_path / "adv.pt")])
    assert result.exit_code == 0, result.output
    assert call in result.output
    exported = load_checkpoint(tmp_path / "adv.pt")
    assert exported["constructor"] == call
    plain = timm.create_model(name, num_classes=10, in_chans=1, **kwargs).eval()
    plain.load_state_dict(exported["model"])
    x = data.test_x[:3].float() / 255
    mean, std = exported["input_normalization"]["mean"][0], exported["input_normalization"]["std"][0]
    with torch.no_grad():
        torch.testing.assert_close(plain((x - mean) / std), robust.load_model(tmp_path / "adv.pt")(x), rtol=0, atol=1e-5)


@pytest.mark.precision
@pytest.mark.parametrize("norm", ["bn", "sabn"])
def test_torchvision_vit_b_16_converts_exports_and_loads_strictly(norm):
    torch.manual_seed(0)
    model = perturb_norms(robust.build_model("torchvision:vit_b_16", norm, 10, 3, image_size=32)).eval()
    assert model.build_args["image_size"] == 32
    assert robust.is_dual_route(model) == (norm != "bn")
    plain = torchvision.models.vit_b_16(num_classes=10, image_size=32)
    plain.load_state_dict(export_route(model, "adv").state_dict())
    plain.eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(model.build_args["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.build_args["std"]).view(1, 3, 1, 1)
    with torch.no_grad(), use_route(model, "adv"):
        torch.testing.assert_close(plain((x - mean) / std), model(x), rtol=0, atol=1e-5)


def test_a_patch_that_does_not_tile_the_image_is_refused_with_the_fix():
    with pytest.raises(ModelError, match=r"16-pixel patches, which do not tile 28 x 28 images; pass --patch-size P "
                                         r"with P dividing the image side such as 2, 4, 7, 14"):
        robust.build_model("timm:vit_tiny_patch16_224", "sabn", 10, 1, image_size=28)
    with pytest.raises(ModelError, match="timm:convnext_atto takes no patch size; drop --patch-size"):
        robust.build_model("timm:convnext_atto", "sabn", 10, 1, image_size=32, patch_size=4)
    with pytest.raises(ValueError, match="patch size applies to ViT-style timm models"):
        robust.build_model("preact_resnet18", "sabn", 10, 1, patch_size=4)


def test_the_cli_refuses_a_misfit_patch_and_a_patch_for_our_models(tmp_path):
    common = ["train", "--dataset", "fashion-mnist", "--limit", "16", "--epochs", "1", "--device", "cpu"]
    assert_refused(tmp_path, [*common, "--arch", "timm:vit_tiny_patch16_224"], "do not tile 28 x 28 images",
                   "--patch-size")
    assert_refused(tmp_path, [*common, "--arch", "preact_resnet18", "--patch-size", "4"], "--patch-size applies to timm")


@pytest.mark.parametrize("method", ["pgd", "hybrid", "trades", "mart", "fast", "nfgsm"])
def test_every_method_trains_a_layernorm_model(tmp_path, fmnist, method):
    result = Trainer(_config(tmp_path / "run", arch="timm:convnext_atto", norm="sabn", method=method, epochs=1),
                     data=resized(fmnist, 32), log=lambda m: None).fit()
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    start = convert_norms(timm.create_model("convnext_atto", num_classes=10, in_chans=1), "sabn").state_dict()
    adv = [k for k in state["model"] if ".route_weight.adv" in k]
    assert adv and any(not torch.equal(state["model"][k], start[k]) for k in adv)  # the adv route's affines trained
