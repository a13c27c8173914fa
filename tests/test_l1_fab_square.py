"""FAB, FAB-T and Square in L1 against the official AutoAttack code (pyautoattack), the L1 standard version with
all four of the official's parts, and what they record."""

from __future__ import annotations

import pyautoattack
import pytest
import torch

from helpers import confident_batch, confident_net
from robust.attacks.fab_l1 import FABSettings, accepted, fab_l1
from robust.attacks.l1 import l1_norm
from robust.attacks.registry import attack_params, build_attack, check_perturbation, served_threats
from robust.attacks.square_l1 import (
    SquareSettings,
    _proposal,
    _start,
    square_l1,
    square_share,
    two_lobes,
    window_side,
)


def robust_flags(net, x, y, x_adv):
    with torch.no_grad():
        return net(x_adv).argmax(1) == y


def official_fab(net, x, y, eps, targeted, restarts):
    attack = pyautoattack.fab_pt.FABAttack_PT(net, norm="L1", n_restarts=restarts, n_iter=100, eps=eps, seed=0,
                                              targeted=targeted, n_target_classes=9, device="cpu")
    return attack.perturb(x, y)


def test_fab_t_l1_gives_the_official_verdicts_and_points_image_for_image():
    """FAB-T in L1 (9 target classes by logit rank, 1 restart, 100 iterations): torchattacks' single runs are the
    official single runs line for line and a single restart draws nothing random, so the points and verdicts
    are the official's exactly."""
    x, y = confident_batch()
    net = confident_net()
    eps = 0.5
    attack = build_attack("fab-t", net, eps, threat="l1", seed=0)
    ours = attack(x, y)
    theirs = official_fab(net, x, y, eps, targeted=True, restarts=1)
    check_perturbation(x, ours, eps, "l1", name="fab-t")
    assert 4 <= int(robust_flags(net, x, y, theirs).sum()) <= 28  # a radius where the verdicts are informative
    assert torch.equal(robust_flags(net, x, y, ours), robust_flags(net, x, y, theirs))
    assert torch.equal(ours, theirs)
    assert attack.params == {"threat": "l1", "eps": eps, "source": "attacks.fab_l1", "restarts": 1, "seed": 0,
                             "steps": 100, "target_classes": 9}


def test_fab_l1_with_random_restarts_follows_the_official_random_stream():
    """Untargeted FAB, 3 restarts: the second and third start from the official random point (seeded once per
    call, drawn in the same order), so the verdicts are the official's image for image."""
    x, y = confident_batch()
    net = confident_net()
    eps = 0.5
    ours = fab_l1(net, x, y, FABSettings(eps, restarts=3))
    theirs = official_fab(net, x, y, eps, targeted=False, restarts=3)
    assert torch.equal(robust_flags(net, x, y, ours), robust_flags(net, x, y, theirs))
    assert int(robust_flags(net, x, y, ours).sum()) < 32
    assert build_attack("fab", net, eps, threat="l1").params["source"] == "attacks.fab_l1"


def test_fab_l1_keeps_only_points_misclassified_within_eps():
    """A point FAB found beyond eps (its minimal-norm search goes as far as it must) counts as robust: at an eps
    below every example's boundary distance nothing is accepted and the inputs come back unchanged."""
    x, y = confident_batch(8)
    net = confident_net()
    assert torch.equal(fab_l1(net, x, y, FABSettings(1e-4, target_classes=9)), x)
    far = x.clone()
    far[:, :, 0, 0] = 1 - far[:, :, 0, 0]
    assert not accepted(net, x, y, far, 1e-3).any()


def official_square(net, x, y, eps, queries):
    attack = pyautoattack.square.SquareAttack(net, norm="L1", n_queries=queries, eps=eps, p_init=0.8, seed=0,
                                              resc_schedule=False, device="cpu")
    return attack.perturb(x, y)


def test_square_l1_matches_the_official_square_on_the_same_images():
    """Square in L1 with the official draws in the official order from the CPU stream seeded once per call: the
    searches are the same, and the points differ only by the projection's last bits (ours solves for the
    shrinkage, the official bisects; a few ulps of values <= 1). Those can flip an accept decision only when a
    proposal's margin ties the best one within ~1e-6, so at most one verdict in 32 may differ."""
    x, y = confident_batch()
    net = confident_net()
    eps, queries = 1.0, 100
    ours = square_l1(net, x, y, SquareSettings(eps, queries=queries))
    theirs = official_square(net, x, y, eps, queries)
    check_perturbation(x, ours, eps, "l1", name="square")
    ours_robust, theirs_robust = robust_flags(net, x, y, ours), robust_flags(net, x, y, theirs)
    assert 4 <= int(theirs_robust.sum()) <= 28
    assert int((ours_robust != theirs_robust).sum()) <= 1
    assert abs(int(ours_robust.sum()) - int(theirs_robust.sum())) <= 1


@pytest.mark.parametrize("eps", [0.05, 1.0, 8.0, 64.0])
def test_square_l1_points_never_leave_the_ball_or_the_box(eps):
    """The start, every proposal and the result lie in the L1 ball (radius eps (1 - 1e-6)) and [0, 1], also for
    images on the box's faces and for radii larger than the box allows."""
    torch.manual_seed(0)
    x, y = confident_batch(16)
    x[:4] = x[:4].round()
    start = _start(x, eps)
    check_perturbation(x, start, eps, "l1", name="square start")
    best = start
    for query in (0, 20, 300, 4500):
        best = _proposal(x, best, eps, window_side(square_share(0.8, query), 8, 8))
        check_perturbation(x, best, eps, "l1", name="square proposal")
    result = square_l1(confident_net(), x, y, SquareSettings(eps, queries=30))
    check_perturbation(x, result, eps, "l1", name="square")
    if eps <= 8.0:  # a budget the box does not cap: the start spends all of it, up to the fp32 rounding of the
        # projection's sums (the unprojected start has L1 norm <= 64, relative error 1e-7 per addition: < 1e-5)
        assert l1_norm(start - x).min().item() >= eps - 1e-5


def test_square_l1_schedule_and_patterns():
    """p halves after queries 10, 50, 200, 500, 1000, 2000, 4000 (5000 queries end at p_init / 128); a window is
    odd and at least 3, then cut to the image's side; a pattern has L1 norm 1, half positive, half negative."""
    assert [square_share(0.8, q) for q in (0, 10, 11, 50, 51, 4001, 4999)] == [0.8, 0.8, 0.4, 0.4, 0.2, 0.00625,
                                                                                  0.00625]
    assert [window_side(p, 32, 32) for p in (0.8, 0.4, 0.05, 0.00625)] == [29, 21, 7, 3]
    assert window_side(0.8, 8, 8) == 7 and window_side(0.8, 4, 4) == 4
    for side in (1, 3, 5, 7):
        lobes = two_lobes(side, transpose=False)
        assert lobes.abs().sum().item() == pytest.approx(1.0, rel=1e-6)
        assert torch.equal(two_lobes(side, transpose=True), lobes.t())
    lobes = two_lobes(5, transpose=False)
    assert lobes[:2].min().item() > 0 and lobes[2:].max().item() < 0
    official = pyautoattack.square.SquareAttack(None, norm="L1", eps=1.0, device="cpu")
    for side in (3, 5, 7):  # the official pattern, whichever way its own draw turned it
        theirs = official.eta(side)
        assert min((theirs - lobes_).abs().max().item() for lobes_ in (two_lobes(side, False), two_lobes(side, True))
                   ) <= 1e-7


def test_the_l1_standard_version_runs_the_official_four_parts_with_the_official_verdicts():
    """AutoAttack standard in L1: APGD-CE (5 restarts) and APGD-T (5 targets) on the larger-eps schedule, FAB-T (9
    targets), Square, against the official standard version (its Square cut to 100 queries in both, the rest as
    set_version sets it). FAB-T and Square follow the official exactly (above); the APGD stages differ by the
    projection's last bits (test_l1), which may move an example sitting on the boundary: at most one verdict in
    32 may differ."""
    x, y = confident_batch()
    net = confident_net()
    eps, queries = 0.5, 100
    official = pyautoattack.AutoAttack(net, norm="L1", eps=eps, version="standard", seed=0, device="cpu")
    assert official.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"] and official.fab.n_target_classes == 9
    official.square.n_queries = queries
    theirs = robust_flags(net, x, y, official.run_standard_evaluation(x, y, batch_size=len(x))[0])
    attack = build_attack("autoattack", net, eps, threat="l1", seed=0, queries=queries)
    x_adv = attack(x, y)
    check_perturbation(x, x_adv, eps, "l1", name="autoattack")
    ours = robust_flags(net, x, y, x_adv)
    assert 1 <= int(theirs.sum()) <= 28
    assert int((ours != theirs).sum()) <= 1
    assert list(attack.stage_seconds) == ["apgd-ce", "apgd-t", "fab-t", "square"]  # each left some robust


def test_the_l1_standard_version_records_its_four_parts_and_their_sources():
    params = attack_params("autoattack", 12.0, threat="l1")
    assert params["parts"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    settings = params["settings"]
    assert {part: settings[part]["source"] for part in params["parts"]} == {
        "apgd-ce": "attacks.apgd", "apgd-t": "attacks.apgd", "fab-t": "attacks.fab_l1", "square": "attacks.square_l1"}
    assert settings["apgd-ce"]["restarts"] == 5 and settings["apgd-ce"]["larger_eps"]
    assert settings["apgd-t"]["target_classes"] == 5
    assert settings["fab-t"] == {"source": "attacks.fab_l1", "restarts": 1, "seed": 0, "steps": 100,
                                 "target_classes": 9}
    assert settings["square"] == {"source": "attacks.square_l1", "restarts": 1, "seed": 0, "queries": 5000,
                                  "p_init": 0.8, "resc_schedule": False}
    for name in ("fab", "fab-t", "square", "autoattack"):
        assert "l1" in served_threats(name)
    assert "l1" not in served_threats("autoattack-plus")
    assert attack_params("square", 3.0, threat="l1")["source"] == "attacks.square_l1"


@pytest.mark.parametrize("name", ["fab", "fab-t", "square"])
def test_l1_fab_and_square_under_bf16_autocast_keep_fp32_verdicts_and_eps_zero_returns_the_inputs(name):
    """Searching in bf16 (their logits taken in fp32), they return fp32 points inside the ball and the box, and
    every example they count as fooled is misclassified by the fp32 forward; at eps 0 the inputs come back."""
    x, y = confident_batch(8)
    net = confident_net()
    attack = build_attack(name, net, 1.0, threat="l1", queries=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = attack(x, y)
    check_perturbation(x, x_adv, 1.0, "l1", name=name)
    assert x_adv.dtype == torch.float32
    moved = (x_adv != x).flatten(1).any(dim=1)
    assert moved.any() and not robust_flags(net, x, y, x_adv)[moved].any()
    assert torch.equal(build_attack(name, net, 0.0, threat="l1", queries=50)(x, y), x)
