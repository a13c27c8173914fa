"""An evaluation's plan: every setting checked once when the plan is made (one-line ConfigError naming it),
frozen after, and the same figures whether ``robust.evaluate`` gets keywords or the plan; ``robust eval``
reaches the evaluation with a plan, and a plain model reaches it as a model plus its facts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import invoke_in

import robust
from robust.checkpoint import build_checkpoint, save_checkpoint
from robust.cli.plain_model import load_plain_model
from robust.data.corruptions import CORRUPTIONS
from robust.errors import ConfigError, DataError
from robust.eval.evaluation import evaluate_plan
from robust.eval.plan import CorruptionPlan, EvalPlan, ModelFacts, StateFile
from robust.nn.factory import build_model
from robust.runtime import available_cpus


def tiny_model(norm: str = "sabn"):
    torch.manual_seed(0)
    return build_model("preact_resnet18", norm, 10, 1, 4, (0.286,), (0.353,)).eval()


def images(n: int = 16):
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def test_build_reads_the_keywords_as_users_write_them():
    plan = EvalPlan.build(attacks=" PGD5, fgsm,pgd5", eps="8/255", route="adv", device=torch.device("cpu"),
                          state="s.json", resume=True, corruptions="fog,all", severities="5,1")
    assert plan.attacks == ("pgd5", "fgsm") and plan.eps == pytest.approx(8 / 255)
    assert isinstance(plan.eps, float) and plan.device == "cpu"
    assert plan.state == StateFile("s.json", resume=True, force=False)
    assert plan.corruptions == CorruptionPlan(tuple(CORRUPTIONS), (1, 5), None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.eps = 0.5
    assert plan.at_eps("4/255").eps == pytest.approx(4 / 255) and plan.eps == pytest.approx(8 / 255)
    again = plan.again(["pgd20"], 0)
    assert (again.attacks, again.eps, again.state, again.corruptions, again.route) == (("pgd20",), 0.0, None, None, "adv")
    assert EvalPlan.build(eps=0.1, threat="l2").eps == 0.1 and EvalPlan().eps is None  # None: robust eval fills it


@pytest.mark.parametrize("settings, words", [
    ({"batch_size": 0}, "batch-size must be >= 1, got 0"), ({"batch_size": 2.5}, "batch-size must be a whole number"),
    ({"limit": 0}, "limit must be >= 1"), ({"restarts": 0}, "restarts must be >= 1"), ({"queries": 0}, "queries must be >= 1"),
    ({"jobs": 0}, "--jobs must be >= 1, got 0"), ({"jobs": "2"}, "--jobs must be a whole number"),
    ({"threads": 0}, f"threads must be in [1, {available_cpus()}], got 0"),
    ({"seed": -1}, "seed must be in [0, "), ({"seed": True}, "seed must be a whole number"),
    ({"route": "sideways"}, "unknown route 'sideways'; valid: clean, adv, both"),
    ({"threat": "l3"}, "unknown threat 'l3'"), ({"attack_precision": "fp16"}, "unknown attack_precision 'fp16'"),
    ({"per_example": "yes"}, "per-example must be true or false"), ({"progress": 1}, "progress must be true or false"),
    ({"eps": "8/0"}, "eps"), ({"eps": 2}, "eps"), ({"attacks": "pgd5,nonsense"}, "nonsense"), ({"attacks": ""}, "empty"),
    ({"device": ""}, "device is empty"), ({"resume": True}, "--resume needs --state FILE"),
    ({"state": ""}, "state is empty"), ({"state": "s.json", "resume": "no"}, "resume must be true or false"),
    ({"corruptions": "fogg"}, "did you mean fog"), ({"corruptions": "fog", "severities": "0"}, "not one of 1..5"),
    ({"batchsize": 8}, "unknown evaluation setting(s): batchsize; valid: "),
])
def test_every_bad_setting_is_refused_in_one_line_naming_it(settings, words):
    with pytest.raises(ConfigError) as refused:
        EvalPlan.build(**{"eps": 0.1, **settings})
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_the_official_files_are_looked_for_when_the_plan_is_made(tmp_path):
    with pytest.raises(DataError, match="missing-folder is not a folder"):
        EvalPlan.build(eps=0.1, corruptions="fog", corruptions_dir=tmp_path / "missing-folder")


def test_a_plan_made_directly_is_checked_as_well():
    with pytest.raises(ConfigError, match="batch-size must be >= 1"):
        EvalPlan(eps=0.1, batch_size=0)
    with pytest.raises(ConfigError, match="state of an EvalPlan must be a StateFile"):
        EvalPlan(eps=0.1, state="s.json")
    with pytest.raises(ConfigError, match="batch-size must be >= 1"):
        dataclasses.replace(EvalPlan(eps=0.1), batch_size=-3)


def test_keywords_and_the_plan_give_the_same_figures():
    model, data = tiny_model(), images()
    keywords = {"attacks": ["fgsm", "pgd2"], "eps": 0.1, "batch_size": 8, "attack_precision": "fp32", "per_example": True}
    by_keywords = robust.evaluate(model, data, **keywords)
    plan = EvalPlan.build(**keywords)
    for result in (robust.evaluate(model, data, plan=plan), evaluate_plan(model, data, plan)):
        assert result["routes"] == by_keywords["routes"] and result["per_example"] == by_keywords["per_example"]
        assert result["attacks"] == by_keywords["attacks"]
    assert (by_keywords["route"], by_keywords["batch_size"], by_keywords["limit"], by_keywords["restarts"],
            by_keywords["queries"], by_keywords["device"]) == (None, 8, None, 1, 5000, "cpu")
    with pytest.raises(ConfigError, match="a plan or its settings"):
        robust.evaluate(model, data, plan=plan, seed=3)
    with pytest.raises(ConfigError, match="eps is required"):
        evaluate_plan(model, data, EvalPlan())


def test_the_sweep_and_sanity_checks_take_the_plan(tmp_path):
    model, data = tiny_model(), images()
    plan = EvalPlan.build(attacks="pgd1", eps=0.1, batch_size=8, state=tmp_path / "s.json", per_example=True)
    sweep = robust.eval.eps_sweep(model, data, [0, 0.1], plan=plan)
    keywords = robust.eval.eps_sweep(model, data, [0, 0.1], attacks="pgd1", batch_size=8)
    assert [s["routes"] for s in sweep] == [s["routes"] for s in keywords]
    assert not (tmp_path / "s.json").exists() and "per_example" not in sweep[0]  # the sweep's runs keep no state


def test_a_plain_model_reaches_evaluation_as_a_model_and_its_facts(tmp_path):
    entry = tmp_path / "zoo" / "models" / "fashion-mnist" / "Linf" / "Smith2026.pt"
    entry.parent.mkdir(parents=True)
    torch.jit.trace(tiny_model("bn"), torch.rand(2, 1, 28, 28)).save(str(entry))
    info = tmp_path / "zoo" / "model_info" / "fashion-mnist" / "Linf" / "Smith2026.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"eps": "8/255"}))
    model, facts, (x, y) = load_plain_model(entry, {"dataset": "fashion-mnist"}, None, 8, None)
    assert isinstance(model, torch.nn.Module) and len(x) == len(y) and x.shape[1:] == (1, 28, 28)
    assert model(x[:2].float() / 255).shape == (2, 10)
    assert facts == ModelFacts("fashion-mnist", 8 / 255, "linf", None, str(info))
    _, given, _ = load_plain_model(entry, {"dataset": "fashion-mnist"}, None, 8, None, eps_wanted=False)
    assert given == ModelFacts("fashion-mnist")


def test_robust_eval_writes_the_plan_settings_beside_the_figures(tmp_path):
    save_checkpoint(build_checkpoint(tiny_model(), dataset="fashion-mnist", eps=0.1), tmp_path / "m.pt")
    result = invoke_in(tmp_path, ["eval", "m.pt", "--attack", "fgsm", "--limit", "16", "--batch-size", "8", "--quiet",
                                  "--route", "adv", "--attack-precision", "fp32", "--json", "e.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert (report["eps"], report["route"], report["batch_size"], report["limit"], report["n"]) == (0.1, "adv", 8, 16, 16)
    assert report["dataset"] == "fashion-mnist" and report["weights"] == "live" and list(report["routes"]) == ["adv"]
