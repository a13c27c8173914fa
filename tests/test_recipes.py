"""Recipes: each resolves to its documented values, every flag overrides them, the resolved values are
what config.json records, and the warm-up of the modern recipes follows its formula."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from helpers import assert_refused, invoke_in

from robust.cli.main import cli
from robust.config import TrainConfig
from robust.recipes import RECIPES
from robust.train.schedule import lr_at

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_resolves_to_its_values_and_every_value_can_be_overridden(name):
    config = TrainConfig.from_recipe(name).validate()
    recipe = RECIPES[name]
    for field, value in recipe.values.items():
        assert getattr(config, field) == value, field
    assert config.recipe == name and config.extra_fraction is None  # extra-data values wait for --extra-data
    for field, value in recipe.values.items():  # a given value always wins
        other = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2 if v else 0.25}.get(type(value))
        if other is None:
            continue
        overridden = TrainConfig.from_dict({"recipe": name, field: other(value)})
        assert getattr(overridden, field) == other(value), field


def test_extra_data_values_apply_with_extra_data_only():
    assert TrainConfig.from_recipe("wang2023", extra_data="x.npz").extra_fraction == 0.7
    assert TrainConfig.from_recipe("wang2023", extra_data="x.npz", extra_fraction=0.5).extra_fraction == 0.5
    assert TrainConfig.from_recipe("wang2023", extra_data="x.npz").epoch_size == 50_000


def test_another_method_drops_the_recipes_method_options():
    config = TrainConfig.from_recipe("zhang2019", method="pgd").validate()
    assert config.method == "pgd" and config.method_options is None
    assert TrainConfig.from_recipe("zhang2019", beta=3.0).objective_options == {"beta": 3.0}


def test_the_recipe_help_and_the_docs_name_every_recipe_with_its_source():
    help_text = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    page = (ROOT / "docs" / "methods.md").read_text()
    for name, recipe in RECIPES.items():
        assert f"{name} ({recipe.summary}; {recipe.source.split()[0]})" in help_text
        assert f"`{name}`" in page and recipe.source.split(":")[0] in page, name


def test_config_json_records_the_resolved_recipe_and_the_flags_over_it(tmp_path):
    result = invoke_in(tmp_path, ["train", "--recipe", "zhang2019", "--dataset", "fashion-mnist", "--arch",
                                  "preact_resnet18", "--width", "4", "--epochs", "1", "--limit", "64", "--eps", "0.1",
                                  "--batch-size", "32", "--weight-decay", "0.001", "--val-limit", "16", "--quiet",
                                  "--precision", "fp32", "--out", "run"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["recipe"] == "zhang2019" and saved["method"] == "trades" and saved["method_options"] == "beta=6.0"
    assert saved["weight_decay"] == 0.001 and saved["eps"] == "0.1" and saved["attack_bn"] == "eval"
    # the recipe's step (0.007 of eps 0.031) scales with --eps, its milestone (74 of 76 epochs) with --epochs
    assert float(saved["step_size"]) == pytest.approx(0.007 / 0.031 * 0.1, rel=1e-15)
    assert float(saved["milestones"]) == pytest.approx(74 / 76, rel=1e-15) and saved["val_split"] == 0.02
    assert "step 0.02258" in result.output  # the run's first line shows the step size


def test_warmup_epochs_ramp_linearly_from_zero_then_cosine_over_the_rest():
    config = TrainConfig(epochs=10, lr=0.4, schedule="cosine", warmup_steps=0, warmup_epochs=2.0)
    steps = 5  # per epoch: warm-up is 10 steps, the cosine the other 40
    assert [lr_at(s, config, steps) for s in (0, 5)] == [0.0, pytest.approx(0.2)]
    assert lr_at(10, config, steps) == pytest.approx(0.4)
    assert lr_at(30, config, steps) == pytest.approx(0.2 * (1 + math.cos(math.pi * 20 / 40)))
    assert lr_at(49, config, steps) == pytest.approx(0.2 * (1 + math.cos(math.pi * 39 / 40)))


def test_bad_recipe_settings_are_refused(tmp_path):
    base = ["train", "--dataset", "fashion-mnist", "--epochs", "1", "--out", "run"]
    assert_refused(tmp_path, [*base, "--recipe", "madry2017"], "madry2017")
    assert_refused(tmp_path, [*base, "--warmup-epochs", "2", "--schedule", "cosine"], "--warmup-steps 0")
    assert_refused(tmp_path, [*base, "--warmup-epochs", "2", "--warmup-steps", "0", "--schedule", "onecycle"],
                   "onecycle")
    assert_refused(tmp_path, [*base, "--warmup-epochs", "1", "--warmup-steps", "0", "--schedule", "cosine"],
                   "below --epochs 1")
