"""The eps parser, the config dataclass (reference defaults, validation, TOML) and the lr schedules."""

from __future__ import annotations

import math
import re

import pytest

from robust.cli.train import resolve_config
from robust.config import TrainConfig, _f
from robust.errors import ConfigError
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
