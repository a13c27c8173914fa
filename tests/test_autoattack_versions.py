"""AutoAttack's plus and rand versions against the official code (pyautoattack), their stage seconds and
recorded settings, the one ensemble runner behind every version, and the refusals of versions a threat lacks."""

from __future__ import annotations

import pyautoattack
import pytest
import torch
import torch.nn as nn

from helpers import assert_refused, confident_batch, confident_net
from robust.attacks.apgd import APGDSettings, apgd
from robust.attacks.registry import attack_params, build_attack, check_perturbation, served_threats
from robust.checkpoint import build_checkpoint, save_checkpoint
from robust.errors import ConfigError
from robust.eval.evaluation import evaluate
from robust.eval.plan import EvalPlan
from robust.nn.factory import build_model


def official_verdicts(net, x, y, eps, norm, version):
    attack = pyautoattack.AutoAttack(net, norm=norm, eps=eps, version=version, seed=0, device="cpu")
    with torch.no_grad():
        return net(attack.run_standard_evaluation(x, y, batch_size=len(x))[0]).argmax(1) == y


def our_verdicts(net, x, y, eps, threat, name):
    attack = build_attack(name, net, eps, threat=threat, seed=0)
    x_adv = attack(x, y)
    check_perturbation(x, x_adv, eps, threat, name=name)
    with torch.no_grad():
        return net(x_adv).argmax(1) == y, attack


@pytest.mark.parametrize("threat, norm, eps", [("linf", "Linf", 0.03), ("l1", "L1", 0.5)])
def test_rand_version_gives_the_official_verdicts_image_for_image(threat, norm, eps):
    """Same seed, same random starts: our APGD is the official algorithm. In Linf and L2 the arithmetic is the
    official's operation for operation and the verdicts are equal; in L1 only the projection's last bits differ
    (see test_l1), which may move at most one example sitting on the boundary."""
    x, y = confident_batch()
    net = confident_net()
    theirs = official_verdicts(net, x, y, eps, norm, "rand")
    ours, attack = our_verdicts(net, x, y, eps, threat, "autoattack-rand")
    assert 4 <= int(theirs.sum()) <= 28
    assert int((ours != theirs).sum()) <= (1 if threat == "l1" else 0)
    assert list(attack.stage_seconds) == ["apgd-ce", "apgd-dlr"]
    assert attack.params["settings"]["apgd-ce"]["restarts"] == 1


def test_rand_version_on_a_deterministic_model_equals_apgd_ce_then_apgd_dlr():
    """20 forwards of a deterministic model average to its one gradient up to the rounding of a sum of 20 equal
    numbers (relative 20 ulps), far below what moves a sign or a top-k choice here: the verdicts are equal."""
    x, y = confident_batch()
    net = confident_net()
    eps = 0.03
    rand, _ = our_verdicts(net, x, y, eps, "linf", "autoattack-rand")
    robust = net(x).argmax(1) == y
    for loss in ("ce", "dlr"):
        idx = robust.nonzero().squeeze(1)
        x_adv = apgd(net, x[idx], y[idx], APGDSettings(eps, "linf", loss, restarts=1, eot=1))
        robust[idx[net(x_adv).argmax(1) != y[idx]]] = False
    assert torch.equal(rand, robust)


def test_plus_version_gives_the_official_verdicts():
    """The plus version (Linf): APGD-CE, APGD-DLR (5 restarts), FAB (5 restarts), Square, APGD-T, FAB-T. Ours runs
    torchattacks' components, whose random streams are not the official's: APGD-CE with 5 restarts decides
    almost every example, and the verdicts may differ on at most 2 of 32 (the examples a restart's start decides)."""
    x, y = confident_batch()
    net = confident_net()
    eps = 0.04
    theirs = official_verdicts(net, x, y, eps, "Linf", "plus")
    ours, attack = our_verdicts(net, x, y, eps, "linf", "autoattack-plus")
    assert int((ours != theirs).sum()) <= 2
    assert list(attack.stage_seconds)[0] == "apgd-ce"
    settings = attack.params["settings"]
    assert attack.params["parts"] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert [settings[p]["restarts"] for p in attack.params["parts"]] == [5, 5, 5, 1, 1, 1]
    assert settings["apgd-t"]["target_classes"] == 9 and settings["square"]["queries"] == 5000


def test_versions_and_their_threat_models():
    assert served_threats("autoattack") == ("linf", "l2", "l1")
    assert served_threats("autoattack-rand") == ("linf", "l2", "l1")
    assert served_threats("autoattack-plus") == ("linf", "l2")
    with pytest.raises(ValueError, match=r"^attack 'autoattack-plus' has no l1 version; its threat models: linf, l2$"):
        build_attack("autoattack-plus", confident_net(), 1.0, threat="l1")
    with pytest.raises(ConfigError, match="'autoattack-plus' has no l1 version"):
        EvalPlan.build(attacks="autoattack-plus", eps=1.0, threat="l1")
    assert attack_params("autoattack-rand", 1.0, threat="l1")["settings"]["apgd-ce"]["larger_eps"] is False


def test_a_version_goes_where_the_standard_one_goes_with_stage_seconds_and_per_example(tmp_path):
    x, y = confident_batch(12)
    data = (x, y)
    result = evaluate(confident_net(), data, attacks="autoattack-rand", eps=0.03, per_example=True,
                      state=tmp_path / "rand.state")
    route = next(iter(result["routes"].values()))
    assert set(route) >= {"clean", "autoattack-rand"}
    recorded = result["attacks"]["autoattack-rand"]
    assert recorded["version"] == "rand" and recorded["settings"]["apgd-dlr"]["eot"] == 20
    assert {"autoattack-rand/apgd-ce", "autoattack-rand/apgd-dlr"} <= set(result["attack_seconds"])
    broken = next(iter(result["per_example"].values()))["broken_by"]
    assert set(broken) <= {None, "autoattack-rand"}
    again = evaluate(confident_net(), data, attacks="autoattack-rand", eps=0.03, per_example=True,
                     state=tmp_path / "rand.state", resume=True)
    assert again["routes"] == result["routes"]


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("preact_resnet18", "bn", 10, 1, 4, (0.286,), (0.353,))
    (tmp_path / "ckpt").mkdir()
    return save_checkpoint(build_checkpoint(model, dataset="fashion-mnist", eps=0.1), tmp_path / "ckpt" / "model.pt")


def test_cli_refuses_a_version_the_threat_lacks_with_exit_2_and_nothing_written(tmp_path, checkpoint):
    assert_refused(tmp_path, ["eval", str(checkpoint), "--threat", "l1", "--eps", "12", "--attack", "autoattack-plus",
                              "--limit", "8", "--json", "out.json"], "'autoattack-plus' has no l1 version")


def test_the_benchmark_runs_the_chosen_version_and_threat_on_both_sides():
    """The rand version in Linf on both sides: the official verdicts image for image (the test above says why),
    the stages its two parts, the report naming threat and version."""
    from robust.bench.autoattack import bench

    x, y = confident_batch(16)
    net = confident_net()
    report = bench(net, x, y, 0.02, {"fp32": {"precision": "fp32", "jobs": 1, "threads": None}}, rounds=1,
                   batch_size=16, seed=0, attack=("linf", "rand"))
    ours = report["variants"]["fp32"]
    assert (report["threat"], report["version"], report["stages"]) == ("linf", "rand", ["apgd-ce", "apgd-dlr"])
    assert ours["agree_with_official"] == 16 and 25 <= ours["robust_accuracy"] <= 75  # verdicts that tell something
    assert ours["robust_accuracy"] == report["variants"]["official"]["robust_accuracy"]
    assert set(ours["stage_seconds"]) == {"apgd-ce", "apgd-dlr"} and ours["stage_seconds"]["apgd-ce"] > 0


@pytest.mark.parametrize("args, expected", [
    (["--version", "plus", "--threat", "l1"], "--version plus --threat l1: attack 'autoattack-plus' has no l1 version"),
    (["--threat", "l1", "--eps", "12/255"], "is a fraction of 255"),
    (["--version", "quick"], "Invalid value for '--version'"),
])
def test_the_benchmark_refuses_a_version_or_radius_its_threat_lacks_before_reading_anything(tmp_path, args, expected):
    from robust.bench import autoattack

    assert_refused(tmp_path, ["missing.pt", *args], expected, command=autoattack.command)
