"""Transfer attacks: adversarial examples made on a surrogate and scored on the model (``--transfer-from``), and the
--sanity transfer check (from a dual-route model's other route or the surrogate) that flags gradient masking."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from helpers import assert_refused, invoke_in

import robust
from robust.checkpoint import build_checkpoint, save_checkpoint
from robust.errors import ConfigError
from robust.eval.evaluation import evaluate, route_now
from robust.eval.plan import EvalPlan
from robust.eval.sanity import transfer_checks
from robust.eval.transfer import other_route, transfer_verdict
from robust.nn.factory import build_model

EPS = 0.1
DATA = {"dataset": "fashion-mnist", "input_size": [1, 28, 28], "data_dir": "/usr/share/datasets/fashion-mnist"}


class Quantized(nn.Module):
    """``model`` behind an input quantization to ``levels`` steps: its input gradient is exactly zero (round has
    none), so white-box attacks see nothing, while a perturbation of eps 0.1 moves pixels by two levels of 0.05."""

    def __init__(self, model: nn.Module, levels: int = 20) -> None:
        super().__init__()
        self.inner, self.levels = model, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * self.levels) / self.levels)


@pytest.fixture(scope="module")
def data(fmnist):
    return fmnist.test_x[:128], fmnist.test_y[:128]


def test_transfer_from_the_model_itself_equals_white_box(fgsm_model, data):
    white = evaluate(fgsm_model, data, attacks="pgd5,fgsm", eps=EPS, per_example=True, attack_precision="fp32")
    moved = evaluate(fgsm_model, data, attacks="pgd5,fgsm", eps=EPS, per_example=True, attack_precision="fp32",
                     surrogate=fgsm_model)
    assert moved["transfer"] is True and "transfer" not in white
    assert moved["routes"] == white["routes"] and moved["per_example"] == white["per_example"]
    assert 0 < white["routes"]["adv"]["pgd5"] < white["routes"]["adv"]["clean"]  # something to compare


def test_other_route_is_the_same_weights_through_the_other_route(fmnist):
    torch.manual_seed(0)
    net = build_model("preact_resnet18", "sabn", 10, 1, 4, (0.286,), (0.353,)).eval()
    x = fmnist.test_x[:4].float() / 255
    with robust.nn.norms.use_route(net, "clean"), torch.no_grad():
        clean = net(x)
    with robust.nn.norms.use_route(net, "adv"), torch.no_grad():
        through = other_route(net, "adv")(x)
        assert route_now(net) == "adv"  # the surrogate's route is restored after its forward
    assert torch.equal(through, clean)


def test_transfer_verdict_flags_a_transfer_attack_stronger_than_white_box():
    white = {"pgd20": 60.0, "pgd50": 58.0}
    assert transfer_verdict(58.5, white, "the clean route", tol=1.0).passed  # within noise of the best white-box
    failed = transfer_verdict(50.0, white, "the clean route", tol=1.0)
    assert not failed.passed
    assert "gradient masking" in failed.detail and "pgd50 58.00%" in failed.detail and "--eot" in failed.detail


def test_sanity_transfer_check_catches_masked_gradients(fgsm_model, data):
    """White-box PGD sees a zero gradient through the quantization and stays at the random start's figure; the
    same examples made on the unquantized model break many more: the check fails with its cause."""
    masked = Quantized(fgsm_model)
    plan = EvalPlan.build(attacks="pgd20", eps=EPS, attack_precision="fp32")
    at_eps = evaluate(masked, data, plan=plan)
    checks = transfer_checks(masked, data, plan, at_eps, surrogate=fgsm_model)
    assert len(checks) == 1 and not checks[0].passed and "gradient masking" in checks[0].detail
    honest = transfer_checks(fgsm_model, data, plan, evaluate(fgsm_model, data, plan=plan), surrogate=fgsm_model)
    assert honest[0].passed  # the model itself as its surrogate: the same figure


def test_sanity_transfer_check_uses_a_dual_route_models_other_route(fmnist, data):
    torch.manual_seed(0)
    net = build_model("preact_resnet18", "sabn", 10, 1, 4, (0.286,), (0.353,)).eval()
    plan = EvalPlan.build(attacks="pgd20", eps=EPS, attack_precision="fp32", limit=32)
    checks = transfer_checks(net, data, plan, evaluate(net, data, plan=plan))
    assert [c.name for c in checks] == ["clean: transfer attack not stronger than white-box",
                                        "adv: transfer attack not stronger than white-box"]
    assert "made on the adv route" in checks[0].detail and "made on the clean route" in checks[1].detail


def test_surrogate_of_other_classes_or_shape_is_refused(fgsm_model, data):
    torch.manual_seed(0)
    five = build_model("preact_resnet18", "bn", 5, 1, 4, (0.286,), (0.353,))
    with pytest.raises(ConfigError, match="classes"):
        evaluate(fgsm_model, data, attacks="pgd2", eps=EPS, surrogate=five)
    three = build_model("preact_resnet18", "bn", 10, 3, 4, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError, match="3 channel"):
        evaluate(fgsm_model, data, attacks="pgd2", eps=EPS, surrogate=three)


# ---- the CLI ---------------------------------------------------------------------------------------


def _checkpoint(path, classes: int = 10, channels: int = 1, size: int = 28):
    torch.manual_seed(0)
    model = build_model("preact_resnet18", "bn", classes, channels, 4, (0.5,) * channels, (0.5,) * channels)
    data = {**DATA, "input_size": [channels, size, size]}
    return save_checkpoint(build_checkpoint(model, dataset="fashion-mnist", eps=EPS, data=data), path)


def test_cli_transfer_from_writes_the_surrogate_and_the_figures(tmp_path):
    _checkpoint(tmp_path / "model.pt")
    _checkpoint(tmp_path / "other.pt")
    result = invoke_in(tmp_path, ["eval", "model.pt", "--transfer-from", "other.pt", "--limit", "16", "--attack",
                                  "pgd2", "--attack-precision", "fp32", "--quiet", "--json", "out.json"])
    assert result.exit_code == 0, result.output
    assert "adversarial examples made on other.pt (transfer)" in result.output
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["transfer"] is True and report["transfer_from"] == "other.pt"


@pytest.mark.parametrize("shape, named", [({"classes": 5}, "classes"), ({"channels": 3, "size": 32}, "3x32x32"), ({"channels": 3}, "3x28x28")])
def test_cli_refuses_a_surrogate_of_another_task(shape, named, tmp_path):
    _checkpoint(tmp_path / "model.pt")
    _checkpoint(tmp_path / "other.pt", **shape)
    assert_refused(tmp_path, ["eval", "model.pt", "--transfer-from", "other.pt", "--limit", "16", "--attack", "pgd2",
                              "--json", "out.json"], "surrogate", named)
