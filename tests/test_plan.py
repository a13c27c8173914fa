"""The run's plan: one resolution of every source, checked once, frozen, and what the trainer and config.json read."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

import robust.checks
import robust.config
import robust.plan
from helpers import tiny_config
from robust.config import TrainConfig
from robust.errors import ConfigError
from robust.objectives.trades import TRADES
from robust.plan import TrainPlan, command_words, load_config
from robust.train.step import StepSettings
from robust.train.trainer import Trainer


def test_a_flag_given_by_name_reaches_the_plan_as_a_checked_number(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('method = "trades"\nbeta = 5\neps = "8/255"\n')
    plan = load_config({"beta": 6.0, "epochs": 10, "norm": None}, str(toml))
    assert plan.method == "trades" and isinstance(plan.objective, TRADES) and plan.objective.beta == 6.0
    assert dict(plan.options) == {"beta": 6.0} and plan.eps == 8 / 255 and plan.step_size == 2 / 255
    assert (plan.clean_weight, plan.attack_bn, plan.co_guard) == (0.5, "eval", False)  # sabn; TRADES attacks in eval
    assert plan.milestone_epochs == (3, 8) and plan.kept_epochs == () and plan.epochs == 10  # 0.25, 0.75 of 10
    assert plan.settings["eps"] == "8/255" and plan.data.dataset == "cifar10" and plan.data.extra_fraction == 0.0


def test_the_plan_is_frozen_and_leaves_the_config_it_came_from_as_written():
    config = TrainConfig(method="mart", method_options="beta=4", keep_epochs="2,1", epochs=3)
    plan = TrainPlan.of(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.eps = 0.5
    with pytest.raises(TypeError):
        plan.settings["epochs"] = 9
    assert plan.kept_epochs == (1, 2) and dict(plan.options) == {"beta": 4.0}
    assert config.method_options == "beta=4" and plan.config() == config and plan.to_dict() == config.to_dict()
    with pytest.raises(AttributeError, match="no 'epochz'"):
        plan.epochz  # noqa: B018


def test_every_field_is_checked_once_per_plan(monkeypatch):
    calls = []
    real = robust.checks.check_fields

    def counted(cls, values, partial=False):
        calls.append((cls.__name__, partial))
        return real(cls, values, partial)

    monkeypatch.setattr(robust.config, "check_fields", counted)
    monkeypatch.setattr(robust.plan, "check_fields", counted)
    load_config({"method": "trades", "beta": 6.0, "epochs": 4})
    assert calls == [("TrainConfig", True), ("TrainConfig", True), ("TrainConfig", False)]  # TOML, flags, then all


def test_the_recipe_applies_wherever_the_plan_is_made():
    plan = TrainPlan.of(TrainConfig(recipe="zhang2019", dataset="fashion-mnist"))
    assert (plan.method, dict(plan.options), plan.epochs) == ("trades", {"beta": 6.0}, 76)
    assert load_config({"recipe": "zhang2019", "beta": 3.0}).objective.beta == 3.0


def test_a_bad_source_is_refused_when_the_plan_is_built(tmp_path):
    with pytest.raises(ConfigError, match="beta given both by name and in method-options"):
        load_config({"method": "trades", "beta": 6.0, "method_options": "beta=5"})
    with pytest.raises(ConfigError, match="keep-epochs"):
        TrainPlan.of(TrainConfig(epochs=3, keep_epochs="4"))


def test_the_trainer_trains_with_the_plan_and_config_json_stores_its_settings(tmp_path):
    config = tiny_config(tmp_path / "r", method="trades", method_options="beta=2")
    trainer = Trainer(config, log=lambda m: None)
    assert isinstance(trainer.plan, TrainPlan) and trainer.plan.objective.beta == 2.0
    assert Trainer(trainer.plan).plan is trainer.plan  # a plan is taken as it is
    trainer.fit()
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved == trainer.plan.to_dict() == config.to_dict()
    assert TrainPlan.of(TrainConfig.from_saved(saved)) == trainer.plan


def test_step_settings_read_the_plan():
    plan = TrainPlan.of(TrainConfig(norm="bn", method="hybrid", attack_bn="frozen", eps="0.1"))
    s = StepSettings.from_plan(plan, None, torch.device("cpu"))
    assert s.objective is plan.objective and s.clean_weight == 0.5 and s.attack_train_mode and s.attack_frozen
    assert (s.objective.eps, s.objective.alpha) == (0.1, 0.025)


def test_a_plan_pickles_as_its_settings():
    plan = TrainPlan.of(TrainConfig(method="trades", method_options="beta=3"))
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan and again.objective.beta == 3.0 and again is not plan


def test_one_command_line_rebuild_for_the_workers_and_results_md():
    words = command_words({"epochs": 5, "fused": False, "compile": True, "norm": None, "eps": "8/255"}, "run.toml",
                          ("resume",))
    assert words == ["--config=run.toml", "--epochs=5", "--no-fused", "--compile", "--eps=8/255", "--resume"]
