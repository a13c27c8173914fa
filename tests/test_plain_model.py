"""`robust eval` of a model from outside robust: a TorchScript file, a state dict (.pt or .safetensors)
with --arch and --mean/--std. The loaded model gives the reference model's logits exactly, eval's table
equals the one of robust's own export, and bad files are refused in one line with nothing written."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from helpers import assert_refused, invoke_in, tiny_config

import robust
from robust.checkpoint import load_model
from robust.plain_model import read_plain_model
from robust.train.trainer import Trainer

EVAL = ["--eps", "0.1", "--attack", "pgd2,fgsm", "--limit", "32", "--quiet"]
FMNIST = ["--dataset", "fashion-mnist"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny run, its adv route as robust's export, a plain state dict, a TorchScript file, and a torchvision
    ResNet-18 (random weights, its own normalization outside) as a state dict in both formats."""
    root = tmp_path_factory.mktemp("plain")
    Trainer(tiny_config(root / "run")).fit()
    assert invoke_in(root, ["export", "run", "-o", "export.pt"]).exit_code == 0
    ours = load_model(root / "export.pt")
    torch.save(ours.state_dict(), root / "ours.pt")
    torch.jit.trace(ours, torch.rand(2, 1, 28, 28)).save(str(root / "ours.ts"))
    torch.manual_seed(0)
    resnet = robust.build_model("torchvision:resnet18", norm="bn", num_classes=10, in_channels=1, mean=[0.3], std=[0.4])
    torch.save(resnet.state_dict(), root / "resnet.pt")
    safetensors.torch.save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(root / "resnet.safetensors"))
    return root


def table(root, args) -> dict:
    result = invoke_in(root, ["eval", *args, *EVAL, "--json", "out.json", "--force"])
    assert result.exit_code == 0, result.output
    return json.loads((root / "out.json").read_text())["routes"]


def test_plain_state_dict_and_torchscript_score_as_the_export(files):
    reference = table(files, ["export.pt"])
    assert table(files, ["ours.pt", "--arch", "preact_resnet18", *FMNIST]) == reference
    assert table(files, ["ours.ts", *FMNIST]) == reference


def test_loaded_models_give_the_reference_logits(files):
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ours = load_model(files / "export.pt")
    torch.manual_seed(0)
    resnet = robust.build_model("torchvision:resnet18", norm="bn", num_classes=10, in_channels=1, mean=[0.3], std=[0.4]).eval()
    with torch.no_grad():
        assert torch.equal(read_plain_model(files / "ours.pt", "preact_resnet18", 10, 1)(x), ours(x))
        assert torch.equal(read_plain_model(files / "ours.ts", None, 10, 1)(x), ours(x))
        for name in ("resnet.pt", "resnet.safetensors"):
            plain = read_plain_model(files / name, "torchvision:resnet18", 10, 1, [0.3], [0.4])
            assert torch.equal(plain(x), resnet(x))  # the normalization applied in front, as given
        unnormalized = read_plain_model(files / "resnet.pt", "torchvision:resnet18", 10, 1)
        assert not torch.equal(unnormalized(x), resnet(x))


def test_torchvision_state_dict_evaluated_with_sanity_checks(files):
    result = invoke_in(files, ["eval", "resnet.safetensors", "--arch", "torchvision:resnet18", "--mean", "0.3", "--std", "0.4",
                               *FMNIST, "--eps", "0.1", "--attack", "pgd2,fgsm", "--limit", "16", "--quiet",
                               "--eps-sweep", "0,0.1", "--json", "tv.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((files / "tv.json").read_text())
    assert list(report["routes"]) == ["adv"] and set(report["routes"]["adv"]) == {"clean", "pgd2", "fgsm", "worst_case"}
    assert report["model"]["arch"] == "torchvision:resnet18" and report["model"]["mean"] == [0.3]
    zero = report["eps_sweep"][0]["routes"]["adv"]
    assert zero["worst_case"] == zero["clean"]  # eps 0 changes nothing


class FiveLogits(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :5]


def test_bad_plain_models_refused(files):
    torch.jit.script(FiveLogits()).save(str(files / "five.ts"))
    state = torch.load(files / "resnet.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "fc.bias"}, files / "missing.pt")
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("layer4")},
                                str(files / "missing.safetensors"))
    torch.manual_seed(0)
    wide = robust.build_model("torchvision:resnet18", norm="bn", num_classes=100, in_channels=1, mean=[0.3], std=[0.4])
    torch.save(wide.state_dict(), files / "hundred.pt")
    torch.save(FiveLogits(), files / "pickled_module.pt")
    run = ["--eps", "0.1", "--limit", "8", "--json", "new.json", *FMNIST]
    assert_refused(files, ["eval", "five.ts", *run], "shape (2, 5)", "(N, 10)")
    assert_refused(files, ["eval", "missing.pt", "--arch", "torchvision:resnet18", *run], "missing", "fc.bias")
    assert_refused(files, ["eval", "missing.safetensors", "--arch", "torchvision:resnet18", *run], "missing", "layer4")
    assert_refused(files, ["eval", "hundred.pt", "--arch", "torchvision:resnet18", *run], "fc.weight", "(100, 512)")
    assert_refused(files, ["eval", "ours.pt", "--arch", "torchvision:resnet18", *run], "does not fit")
    assert_refused(files, ["eval", "pickled_module.pt", "--arch", "torchvision:resnet18", *run], "run code")
    assert_refused(files, ["eval", "resnet.pt", "--arch", "torchvision:resnet18", "--mean", "0.3", *run], "--std")
    assert_refused(files, ["eval", "resnet.pt", "--arch", "torchvision:resnet18", "--mean", "0.3,0.3", "--std", "1,1", *run],
                   "--mean", "1 finite value")
    assert_refused(files, ["eval", "ours.ts", "--eps", "0.1", "--json", "new.json"], "--dataset")
    assert_refused(files, ["eval", "export.pt", "--mean", "0.3", "--std", "0.4", "--json", "new.json"], "--mean", "drop")
    assert_refused(files, ["eval", "export.pt", "--arch", "preact_resnet18", *run], "robust checkpoint", "drop --arch")


def test_robust_safetensors_with_missing_or_foreign_weights_refused(files):
    """A safetensors export of robust whose tensors lost a key, or carry another architecture's shapes."""
    assert invoke_in(files, ["export", "run", "-o", "export.safetensors", "--force"]).exit_code == 0
    with safetensors.safe_open(str(files / "export.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        weights = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    dropped = dict(weights)
    del dropped["stem.weight"]
    safetensors.torch.save_file(dropped, str(files / "dropped.safetensors"), metadata=meta)
    resnet = torch.load(files / "resnet.pt", weights_only=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in resnet.items()}, str(files / "foreign.safetensors"),
                                metadata=meta)
    run = ["--limit", "8", "--json", "new.json"]
    assert_refused(files, ["eval", "dropped.safetensors", *run], "do not fit", "stem.weight")
    assert_refused(files, ["eval", "foreign.safetensors", *run], "do not fit")
