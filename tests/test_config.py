"""The eps parser, the config dataclass (reference defaults, validation, TOML) and the lr schedules."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
from click.testing import CliRunner

from robust.cli.main import cli
from robust.cli.train import resolve_config
from robust.cli.train import train as train_command
from robust.config import TrainConfig, _f
from robust.errors import ConfigError
from robust.objectives import method_names
from robust.threat import parse_eps
from robust.train.schedule import lr_at


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.031", 0.031), ("1", 1.0), (" 2/255 ", 2 / 255), (0.1, 0.1)])
def test_parse_eps_accepts_fractions_and_decimals(text, value):
    assert parse_eps(text) == pytest.approx(value, abs=0)


@pytest.mark.parametrize("text", ["8/0", "abc", "-1", "0", "2", "__import__('os')", "1e400/1e400"])
def test_parse_eps_rejects_bad_values_with_a_hint(text):
    with pytest.raises(ConfigError, match="eps"):
        parse_eps(text)


def test_defaults_are_the_reference_recipe():
    c = TrainConfig().validate()
    assert (c.dataset, c.arch, c.norm) == ("cifar10", "preact_resnet18", "sabn")
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.epochs) == (0.1, 0.9, 5e-4, 128, 200)
    assert c.milestone_epochs == [50, 150] and c.warmup_steps == 200
    assert c.eps_value == 8 / 255 and c.step_size_value == pytest.approx(2 / 255) and c.steps == 7
    assert c.resolved_method == "pgd" and c.resolved_clean_weight == 0.5 and c.resolved_attack_bn == "train"
    assert TrainConfig(norm="bn").resolved_method == "pgd" and TrainConfig(norm="bn").resolved_clean_weight == 0.0
    assert TrainConfig(norm="bn", method="hybrid").resolved_clean_weight == 0.5  # hybrid: clean weight 0.5 on every norm


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("epochs", -1), ("steps", 0), ("val_split", 1.0),
                                         ("norm", "gn"), ("method", "madry"), ("clean_weight", 1.5),
                                         ("method_options", "beta=-1"), ("awp_gamma", 1.0), ("awp_warmup", -1)])
def test_invalid_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field.replace("_", "-") if field in ("batch_size", "val_split", "clean_weight", "awp_gamma", "awp_warmup", "method_options") else field):
        TrainConfig(**{field: value}).validate()


def test_toml_then_flags_override(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('dataset = "fashion-mnist"\neps = "0.1"\nbatch-size = 64\nepochs = 3\n')
    c = resolve_config({"epochs": 5, "norm": None}, str(toml), resume=False)
    assert (c.dataset, c.eps_value, c.batch_size, c.epochs, c.norm) == ("fashion-mnist", 0.1, 64, 5, "sabn")
    toml.write_text('colour = "red"\n')
    with pytest.raises(ConfigError, match="colour"):
        resolve_config({}, str(toml), resume=False)


def test_multistep_schedule_with_reference_warmup():
    c = TrainConfig()
    steps = 352  # 45k / 128
    assert lr_at(0, c, steps) == pytest.approx(0.01)
    assert lr_at(100, c, steps) == pytest.approx(0.01 + 0.09 * 100 / 200)
    assert lr_at(200, c, steps) == pytest.approx(0.1)
    assert lr_at(50 * steps - 1, c, steps) == pytest.approx(0.1)
    assert lr_at(50 * steps, c, steps) == pytest.approx(0.01)
    assert lr_at(150 * steps, c, steps) == pytest.approx(0.001)


def test_cosine_and_onecycle_schedules():
    c = TrainConfig(schedule="cosine", epochs=10, warmup_steps=0)
    assert lr_at(0, c, 100) == pytest.approx(0.1)
    assert lr_at(500, c, 100) == pytest.approx(0.05)
    assert lr_at(999, c, 100) == pytest.approx(0.05 * (1 + math.cos(math.pi * 999 / 1000)))
    c = TrainConfig(schedule="onecycle", epochs=10)
    assert lr_at(0, c, 100) == 0.0
    assert lr_at(400, c, 100) == pytest.approx(0.1)
    assert lr_at(700, c, 100) == pytest.approx(0.05)


def test_field_checks_come_from_the_annotation_and_metadata_so_new_fields_are_covered():
    """A field added later (say by a new dataset or architecture option) is typed and range-checked with no new code."""
    import dataclasses

    @dataclasses.dataclass
    class Extended(TrainConfig):
        depth: int = _f(3, "blocks per stage", min=1)
        label_smoothing: float = _f(0.0, "label smoothing", min=0, below=1)
        teacher: str | None = _f(None, "a teacher checkpoint", kind="path")

    assert Extended(depth=2, label_smoothing=0.1, teacher="t.pt").validate().depth == 2
    for field, value, problem in [("depth", 2.5, "depth must be a whole number"), ("depth", "2", "without quotes"),
                                  ("depth", 0, "depth must be >= 1, got 0"),
                                  ("label_smoothing", float("nan"), "label-smoothing must be a finite number"),
                                  ("label_smoothing", 1, "label-smoothing must be in [0, 1), got 1"),
                                  ("teacher", 5, "teacher must be a path"), ("teacher", "", "teacher is empty")]:
        with pytest.raises(ConfigError, match=re.escape(problem)):
            Extended(**{field: value}).validate()


# ---- recipes applied wherever a config is made, scaled to the eps and epochs given ----------------


def test_a_recipe_given_to_the_constructor_is_applied_as_from_recipe_applies_it():
    made = TrainConfig(recipe="zhang2019", dataset="fashion-mnist")
    assert made == TrainConfig.from_recipe("zhang2019", dataset="fashion-mnist")
    assert (made.method, made.epochs, made.objective_options, made.norm) == ("trades", 76, {"beta": 6.0}, "bn")
    assert (made.dataset, made.step_size, made.milestones) == ("fashion-mnist", "0.007", "74")  # its own eps and epochs


def test_fields_given_with_a_recipe_win_and_a_replace_keeps_them():
    made = TrainConfig(recipe="zhang2019", method="pgd", lr=0.05, step_size="0.01")
    assert (made.method, made.method_options, made.lr, made.step_size) == ("pgd", None, 0.05, "0.01")
    assert dataclasses.replace(made, seed=3) == TrainConfig(recipe="zhang2019", method="pgd", lr=0.05, step_size="0.01",
                                                            seed=3)


@pytest.mark.parametrize("recipe, eps, step", [
    ("zhang2019", "0.1", 0.007 / 0.031 * 0.1),  # 10 steps of 0.0226 reach 0.1 (10 of 0.007 would stop at 0.07)
    ("zhang2019", "0.031", 0.007),
    ("gowal2020", "4/255", 1 / 255),
    ("rice2020", "0.1", 0.025),
    ("madry2018", "8/255", 2 / 255),
])
def test_a_recipes_step_scales_with_the_eps_given(recipe, eps, step):
    config = TrainConfig(recipe=recipe, eps=eps).validate()
    assert config.step_size_value == pytest.approx(step, rel=1e-15)
    assert config.steps * config.step_size_value >= config.eps_value * (1 - 1e-12)


@pytest.mark.parametrize("recipe, epochs, milestones", [
    ("zhang2019", 76, [74]), ("zhang2019", 38, [37]), ("rice2020", 200, [100, 150]), ("rice2020", 20, [10, 15]),
    ("madry2018", 20, [10, 15]),
])
def test_a_recipes_milestones_scale_with_the_epochs_given(recipe, epochs, milestones):
    assert TrainConfig(recipe=recipe, epochs=epochs).validate().milestone_epochs == milestones


def test_an_unknown_recipe_is_refused_where_the_config_is_made():
    with pytest.raises(ConfigError, match="unknown recipe 'zhang'"):
        TrainConfig(recipe="zhang")


# ---- milestones: fractions of the run by default, none past the last epoch ------------------------


@pytest.mark.parametrize("epochs, expected", [(200, [50, 150]), (10, [3, 8]), (4, [1, 3]), (2, [1, 2]), (1, [1, 1])])
def test_default_milestones_are_fractions_of_the_run(epochs, expected):
    config = TrainConfig(epochs=epochs).validate()
    assert config.milestones == "0.25,0.75" and config.milestone_epochs == expected


def test_the_readme_example_lowers_the_lr_within_its_ten_epochs():
    config = TrainConfig(dataset="fashion-mnist", eps="0.1", width=16, epochs=10, warmup_steps=0).validate()
    steps = 10
    lrs = [lr_at(epoch * steps, config, steps) for epoch in range(10)]
    assert lrs == pytest.approx([0.1] * 3 + [0.01] * 5 + [0.001] * 2, rel=1e-12)


@pytest.mark.parametrize("milestones, epochs", [("50,150", 10), ("10", 10), ("3,12", 12)])
def test_a_whole_epoch_milestone_at_or_past_the_end_is_refused(milestones, epochs):
    with pytest.raises(ConfigError, match="is not before the run's end"):
        TrainConfig(milestones=milestones, epochs=epochs).validate()
    TrainConfig(milestones=milestones, epochs=epochs).validate(resuming=True)  # a saved run resumes as it trained


# ---- the help: one default per flag, the methods from the registry -------------------------------


def test_train_help_states_each_default_once_and_every_registered_method():
    helps = {param.name: param.help for param in train_command.params if param.help}
    for name in ("extra_fraction", "method", "attack_bn", "epoch_size", "recipe", "eps", "milestones"):
        assert helps[name].count("[default:") == 1, (name, helps[name])
    assert all(text.count("[default:") <= 1 for text in helps.values())
    text = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    assert f"(--method {', '.join(method_names())})" in text and {"standard", "hybrid"} <= set(method_names())
