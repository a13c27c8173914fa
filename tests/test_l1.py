"""The L1 threat model: the exact projection against a brute force, the ball's pieces, our APGD-L1 against the
official AutoAttack code, and the one-line refusals of L1 input (FAB, Square and the L1 standard version:
test_l1_fab_square)."""

from __future__ import annotations

import pyautoattack
import pytest
import torch
import torch.nn as nn

from helpers import assert_refused, confident_batch, confident_net
from robust.attacks.apgd import APGDSettings, apgd
from robust.attacks.l1 import L1Ball, l1_norm, project_l1_ball, project_l1_box, sparse_sign
from robust.attacks.pgd import get_threat
from robust.attacks.registry import attack_params, build_attack, check_perturbation
from robust.checkpoint import build_checkpoint, save_checkpoint
from robust.errors import ConfigError
from robust.eval.plan import EvalPlan
from robust.nn.factory import build_model
from robust.threat import check_radius, resolve_eps


def brute_projection(x: torch.Tensor | None, d: torch.Tensor, eps: float) -> torch.Tensor:
    """The projection by bisection on the shrinkage, in float64, one example at a time: z_i = sign(d_i) *
    min(max(|d_i| - lam, 0), room_i), lam the smallest >= 0 with sum |z_i| <= eps (no box: ``x`` None)."""
    out = []
    for xi, di in zip(d.double().flatten(1) if x is None else x.double().flatten(1), d.double().flatten(1)):
        a = di.abs()
        room = torch.full_like(a, float("inf")) if x is None else torch.where(di >= 0, 1 - xi, xi)

        def size(lam: float) -> float:
            return float(torch.minimum((a - lam).clamp_min(0), room).sum())

        low, high = 0.0, float(a.max())
        if size(0.0) > eps:
            for _ in range(100):
                mid = (low + high) / 2
                low, high = (mid, high) if size(mid) > eps else (low, mid)
        lam = high if size(0.0) > eps else 0.0
        out.append(di.sign() * torch.minimum((a - lam).clamp_min(0), room))
    return torch.stack(out).view(d.shape)


def points(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean inputs (a quarter on the box's faces, 0 or 1 exactly) and perturbations of every size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 5, 5, generator=g)
    x[: n // 4] = x[: n // 4].round()
    d = torch.randn(n, 1, 5, 5, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 3
    d[n // 4: n // 2] *= 1e-3  # well inside every ball
    x[0], d[0] = 0.0, -d[0].abs()  # pushed out of the box everywhere: the box alone projects it to x
    x[1], d[1] = 1.0, d[1].abs()
    return x, d


@pytest.mark.parametrize("eps", [0.0, 0.3, 2.0, 12.0, 100.0])
def test_projection_equals_a_brute_force_solution_inside_outside_and_on_the_box(eps):
    x, d = points()
    z = project_l1_box(x, d, eps)
    want = brute_projection(x, d, eps)
    # fp32 arithmetic on sums of 25 values of size <= ~10: a few ulps of the largest sum
    assert (z.double() - want).abs().max().item() <= 1e-5
    assert l1_norm(z).max().item() <= eps * (1 + 1e-6) + 1e-6
    assert (x + z).min().item() >= -1e-7 and (x + z).max().item() <= 1 + 1e-7
    inside = (l1_norm(torch.minimum(d.abs(), torch.where(d >= 0, 1 - x, x))) <= eps)
    assert int(inside.sum()) >= (10 if eps > 0 else 1)  # both kinds of point are there
    # where the box alone brings it into the ball, the projection is the box clip
    assert (z[inside] - ((x + d).clamp(0, 1) - x)[inside]).abs().max().item() <= 1e-7


def test_ball_projection_without_box_and_the_official_projection_agree_with_the_brute_force():
    x, d = points(seed=1)
    free = project_l1_ball(d, 2.0)
    assert (free.double() - brute_projection(None, d, 2.0)).abs().max().item() <= 1e-5
    assert l1_norm(free).max().item() == pytest.approx(2.0, rel=1e-5)
    # without a box the shrinkage is soft thresholding: every coordinate moves by the same lam or to 0
    for di, zi in zip(d, free):
        moved = (di - zi).abs()[zi != 0]
        assert moved.max().item() - moved.min().item() <= 1e-5
    official = d + pyautoattack.autopgd_base.L1_projection(x, d, 2.0)
    assert (official.double() - brute_projection(x, d, 2.0)).abs().max().item() <= 1e-5


def test_the_l1_ball_is_a_threat_model_with_start_step_and_distance():
    ball = get_threat("l1")
    assert ball is L1Ball and ball.name == "l1"
    x = torch.rand(6, 1, 8, 8)
    start = ball.random_start(x, 3.0)
    assert (ball.distance(start) <= 3.0 + 1e-5).all() and (ball.distance(start) > 0).all()
    grad = torch.randn(6, 1, 8, 8)
    step = ball.step(grad, 0.5)
    assert ball.distance(step) == pytest.approx(torch.full((6,), 0.5), rel=1e-5)
    # the top 20% of the 64 coordinates (13 of them, ties kept) move, each by the same amount
    assert ((step != 0).flatten(1).sum(1) == 13).all()
    assert torch.equal(sparse_sign(grad, 1.0).abs().flatten(1).sum(1) > 0, torch.ones(6, dtype=torch.bool))
    assert ball.project(torch.full((1, 4), 1.0), 2.0).tolist() == [[0.5, 0.5, 0.5, 0.5]]


@pytest.mark.parametrize("name", ["pgd20", "fgsm", "cw10", "apgd-ce", "apgd-dlr", "apgd-t"])
def test_attacks_in_l1_stay_in_the_ball_and_the_box(name):
    x, y = confident_batch(8)
    attack = build_attack(name, confident_net(), 1.5, threat="l1")
    x_adv = attack(x, y)
    check_perturbation(x, x_adv, 1.5, "l1", name=name)
    assert attack.params["threat"] == "l1"


def test_our_pgd_in_l1_fools_more_as_the_ball_grows():
    x, y = confident_batch()
    net = confident_net()
    fooled = [int((net(build_attack("pgd20", net, eps, threat="l1")(x, y)).argmax(1) != y).sum()) for eps in (0.2, 3.0)]
    assert fooled[0] < fooled[1] and fooled[1] >= 16


def official_apgd(net, x, y, eps, **settings):
    attack = pyautoattack.autopgd_base.APGDAttack(net, norm="L1", eps=eps, seed=0, device="cpu", **settings)
    return attack.perturb(x, y)


def test_our_apgd_ce_l1_gives_the_official_verdicts_image_for_image():
    """APGD-CE-L1 with the official L1 settings (5 restarts, the larger-eps schedule), seed 0 as the official seeds.

    The only arithmetic that differs is the projection (ours solves for the shrinkage, the official bisects
    over sorted kinks and adds a correction to the point): last-bit differences that can move an example
    sitting on the decision boundary, so at most one verdict in 32 may differ."""
    x, y = confident_batch()
    net = confident_net()
    eps = 0.5
    ours = apgd(net, x, y, APGDSettings(eps, "l1", "ce", restarts=5, larger_eps=True))
    theirs = official_apgd(net, x, y, eps, n_restarts=5, use_largereps=True, loss="ce")
    ours_robust, theirs_robust = net(ours).argmax(1) == y, net(theirs).argmax(1) == y
    assert 4 <= int(theirs_robust.sum()) <= 28  # a radius where the verdicts are informative
    assert int((ours_robust != theirs_robust).sum()) <= 1
    check_perturbation(x, ours, eps, "l1")


def test_l1_eps_is_read_in_pixel_units_and_nonsense_is_refused_in_one_line():
    assert resolve_eps("12", "l1") == 12.0 and resolve_eps(0, "l1") == 0.0 and resolve_eps("3/2", "l1") == 1.5
    with pytest.raises(ConfigError, match="write e.g. 12, not 12/255") as info:
        resolve_eps("12/255", "l1")
    assert "\n" not in str(info.value)
    for bad in ("inf", "-1", "nan"):
        with pytest.raises(ConfigError):
            resolve_eps(bad, "l1")
    check_radius(784.0, "l1", 784)
    with pytest.raises(ConfigError, match="larger than any l1 perturbation"):
        check_radius(785.0, "l1", 784)
    assert attack_params("pgd20", 12.0, threat="l1")["threat"] == "l1"


def test_attacks_without_an_l1_version_are_refused_naming_their_threats():
    with pytest.raises(ValueError, match=r"'autoattack-plus' has no l1 version; its threat models: linf, l2"):
        build_attack("autoattack-plus", confident_net(), 1.0, threat="l1")
    with pytest.raises(ConfigError, match="'autoattack-plus' has no l1 version"):
        EvalPlan.build(attacks="pgd20,autoattack-plus", eps=1.0, threat="l1")
    assert EvalPlan.build(attacks="pgd20,apgd-ce,autoattack", eps=12, threat="l1").threat == "l1"


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("preact_resnet18", "bn", 10, 1, 4, (0.286,), (0.353,))
    (tmp_path / "ckpt").mkdir()
    return save_checkpoint(build_checkpoint(model, dataset="fashion-mnist", eps=0.1), tmp_path / "ckpt" / "model.pt")


@pytest.mark.parametrize("args, problem", [
    (["--eps", "12/255"], "write e.g. 12, not 12/255"),
    (["--eps", "-3"], "must be a finite number >= 0"),
    (["--eps", "2", "--attack", "autoattack-plus"], "'autoattack-plus' has no l1 version"),
])
def test_cli_refuses_bad_l1_input_with_exit_2_and_nothing_written(tmp_path, checkpoint, args, problem):
    assert_refused(tmp_path, ["eval", str(checkpoint), "--threat", "l1", "--limit", "8", "--json", "out.json", *args],
                   problem)
