"""Our PGD engine (attacks.pgd) and the attack registry (attacks.registry), on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robust.attacks import L2Ball, LinfBall, cw_margin_loss, fgsm_rs, pgd, pgd_restarts
from robust.attacks.registry import (
    ATTACKS,
    PerturbationError,
    attack_params,
    available_attacks,
    build_attack,
    check_perturbation,
    parse_attack_name,
)


def tiny_net(seed: int = 0) -> nn.Module:
    """A small conv net (no norms) with inputs in [0, 1]: deterministic, cheap to attack."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    with torch.no_grad():
        net[3].weight.mul_(20)  # confident logits, so the loss moves visibly within small balls
    return net


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 8, 8, generator=g)
    x[:4] = 0.0  # edge pixels: the attack must not leave [0, 1]
    x[4:8] = 1.0
    return x, torch.randint(0, 10, (16,), generator=g)


@pytest.mark.parametrize("threat, eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_stays_in_the_ball_and_in_unit_box(batch, threat, eps):
    x, y = batch
    x_adv = pgd(tiny_net(), x, y, eps, alpha=eps / 2, steps=10, threat=threat)
    ball = LinfBall if threat == "linf" else L2Ball
    assert ball.distance(x_adv - x).max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    check_perturbation(x, x_adv, eps, threat)


@pytest.mark.parametrize("threat, eps", [("linf", 0.2), ("l2", 2.0)])
def test_pgd_raises_the_loss(batch, threat, eps):
    x, y = batch
    model = tiny_net()
    x_adv = pgd(model, x, y, eps, alpha=eps / 4, steps=10, threat=threat)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        attacked = F.cross_entropy(model(x_adv), y, reduction="none")
    assert bool((attacked > clean).all())
    assert attacked.sum() > 1.1 * clean.sum()


def test_eps_zero_returns_x(batch):
    x, y = batch
    assert torch.equal(pgd(tiny_net(), x, y, 0.0, alpha=0.01, steps=5), x)
    assert torch.equal(build_attack("pgd20", tiny_net(), 0.0)(x, y), x)


@pytest.mark.precision
def test_fgsm_rs_takes_a_step_of_1_25_eps():
    """Hand computation: x_adv = x + clip(delta0 + 1.25 eps sign(grad at x + delta0), -eps, eps)."""
    model = tiny_net()
    x, y = torch.full((6, 1, 8, 8), 0.5), torch.arange(6)
    eps = 0.1
    torch.manual_seed(7)
    got = fgsm_rs(model, x, y, eps)
    torch.manual_seed(7)
    delta0 = torch.empty_like(x).uniform_(-eps, eps)
    start = (x + delta0).requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(start), y, reduction="sum"), start)
    expected = x + (delta0 + 1.25 * eps * grad.sign()).clamp(-eps, eps)
    assert torch.allclose(got, expected, atol=1e-7)
    wrong_step = x + (delta0 + 1.0 * eps * grad.sign()).clamp(-eps, eps)
    assert not torch.allclose(got, wrong_step, atol=1e-4)


@pytest.mark.precision
def test_cw_margin_loss_equals_hand_computation():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0], [0.0, 0.5, 4.0]])
    y = torch.tensor([0, 0, 2])
    # best wrong logit minus true logit: (3 - 1) + (1 - 5) + (0.5 - 4) = -5.5
    assert cw_margin_loss(logits, y).item() == pytest.approx(-5.5)


def test_pgd_restarts_keeps_examples_fooled_by_any_restart(batch):
    x, y = batch
    model = tiny_net()
    torch.manual_seed(0)
    single = pgd(model, x, y, 0.03, alpha=0.01, steps=3)
    torch.manual_seed(0)
    several = pgd_restarts(model, x, y, restarts=4, eps=0.03, alpha=0.01, steps=3)
    with torch.no_grad():
        fooled_once = model(single).argmax(1) != y
        fooled_any = model(several).argmax(1) != y
    assert bool((fooled_any | ~fooled_once).all())  # the first restart's successes are kept
    assert LinfBall.distance(several - x).max() <= 0.03 + 1e-6


# ---- the registry --------------------------------------------------------------------------------


def test_attack_names_parse_and_unknown_ones_list_the_valid():
    assert parse_attack_name("pgd20") == ("pgd", 20)
    assert parse_attack_name(" CW30 ") == ("cw", 30)
    assert parse_attack_name("autoattack") == ("autoattack", None)
    with pytest.raises(ValueError) as info:
        parse_attack_name("deepfool")
    for name in ("pgdN", "cwN", "apgd-ce", "apgd-t", "fab", "square", "autoattack"):
        assert name in str(info.value)
    assert set(available_attacks()) >= {"clean", "fgsm", "pgdN", "cwN", "apgd-dlr", "fab-t"}
    with pytest.raises(ValueError, match="at least 1 step"):
        parse_attack_name("pgd0")
    assert build_attack("pgd10", tiny_net(), 0.1, threat="l1").params["threat"] == "l1"
    with pytest.raises(ValueError, match="threat model 'l0'; valid: linf, l2, l1"):
        build_attack("pgd10", tiny_net(), 0.1, threat="l0")


def test_pgd_attack_defaults_to_step_eps_over_4_with_random_start():
    attack = build_attack("pgd10", tiny_net(), 8 / 255, restarts=2)
    assert attack.params["step_size"] == pytest.approx(2 / 255)
    assert attack.params["random_start"] and attack.params["steps"] == 10 and attack.params["restarts"] == 2
    assert build_attack("cw5", tiny_net(), 0.1).params["loss"] == "cw"
    assert build_attack("fgsm", tiny_net(), 0.1).params["step_size"] == 0.1


def test_every_attacks_settings_are_read_from_its_spec_as_a_build_records_them():
    """attack_params (no attack built) gives exactly the .params of the attack built with the same settings."""
    settings = dict(threat="l2", restarts=2, queries=7, seed=3, num_classes=5, step_size=0.05)
    for spec in ATTACKS:
        name = f"{spec.name}3" if spec.stepped else spec.name
        params = attack_params(name, 0.5, **settings)
        assert build_attack(name, tiny_net(), 0.5, **settings).params == params, name
        assert params["threat"] == "l2" and params["eps"] == 0.5 and params["source"] == spec.source
    assert attack_params("pgd3", 0.5, **settings)["step_size"] == 0.05 and attack_params("cw3", 0.5)["steps"] == 3
    assert attack_params("apgd-t", 0.5, **settings)["target_classes"] == 4
    assert attack_params("autoattack", 0.5, **settings)["queries"] == 7


@pytest.mark.parametrize("threat, eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("name", ["fgsm", "pgd5", "cw5", "apgd-ce", "apgd-t", "fab", "square"])
def test_every_attack_stays_in_the_ball(batch, name, threat, eps):
    x, y = batch
    model = tiny_net()
    attack = build_attack(name, model, eps, threat=threat, queries=50)
    n = 4 if name.startswith(("apgd", "fab")) else len(x)  # 100-iteration attacks: a few examples suffice
    x_in, x_adv = x[:n], attack(x[:n], y[:n])
    check_perturbation(x_in, x_adv, eps, threat, name=name)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y[:n]).sum() >= (model(x_in).argmax(1) != y[:n]).sum()


def test_check_perturbation_raises_on_every_violation(batch):
    x, _ = batch
    with pytest.raises(PerturbationError, match="ball"):
        check_perturbation(x, (x + 0.2).clamp(0, 1), 0.1, "linf")
    with pytest.raises(PerturbationError, match=r"\[0, 1\]"):
        check_perturbation(x, x + 0.05, 0.1, "linf")
    with pytest.raises(PerturbationError, match="non-finite"):
        check_perturbation(x, torch.full_like(x, float("nan")), 0.1, "linf")
    with pytest.raises(PerturbationError, match="ball"):
        check_perturbation(x, (x + 0.1).clamp(0, 1), 0.5, "l2")
    check_perturbation(x, x.clone(), 0.0, "l2")
