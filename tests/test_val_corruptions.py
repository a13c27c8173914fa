"""Validation under common corruptions (--val-corruptions): the per-epoch figure, best.pt chosen on it
(--select-by corruption), refusals, and configs written before the fields existed."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from helpers import assert_refused, tiny_config

import robust
from robust.checkpoint import load_checkpoint, load_model
from robust.config import TrainConfig
from robust.data.loader import split_train_val
from robust.data.types import ImageData
from robust.errors import ConfigError
from robust.plan import load_config, saved_plan
from robust.train import trainer as trainer_module
from robust.train.trainer import Trainer, format_epoch

NEW_FIELDS = ("val_corruptions", "val_severity", "select_by")
_config = partial(tiny_config, limit=160, val_limit=None)  # 16 validation images


def _data(fmnist_small) -> ImageData:
    d = fmnist_small
    return ImageData(d.name, d.train_x[:160], d.train_y[:160], d.test_x[:50], d.test_y[:50])


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_figure_equals_evaluate_on_the_validation_images(tmp_path, fmnist_small, monkeypatch):
    data, out = _data(fmnist_small), tmp_path / "run"
    made = []
    real_copy = trainer_module.corrupted_copy
    monkeypatch.setattr(trainer_module, "corrupted_copy", lambda *a, **k: made.append(a[1]) or real_copy(*a, **k))
    Trainer(_config(out, epochs=2, val_corruptions="fog,contrast", val_severity=4, keep_epochs="2"), data=data,
            log=lambda m: None).fit()
    assert made == ["fog", "contrast"]  # generated once for the run, not once per epoch
    last = _metrics(out)[-1]
    _, (xv, yv) = split_train_val(data, 0.1, 0, 160)
    result = robust.evaluate(load_model(out / "epoch2.pt"), (xv, yv), attacks="clean", eps=0.1, route="both",
                             corruptions=["fog", "contrast"], severities=[4], seed=0)
    assert result["corruption_n"] == len(yv) == 16
    for route in ("clean", "adv"):
        # the same fp32 forwards on the same uint8 images: the same counts, each k/16, averaged the same way
        assert last[f"val_{route}_corruption"] == result["corruption_mean"][route]
        cells = [result["corruptions"][name]["4"][route] for name in ("fog", "contrast")]
        assert all(round(c * 16 / 100) == pytest.approx(c * 16 / 100, abs=1e-9) for c in cells)
    assert "corrupted" in format_epoch(last)


def test_select_by_corruption_keeps_the_epoch_with_the_best_figure(tmp_path, fmnist_small, monkeypatch):
    figures = iter([10.0, 30.0, 20.0])  # the adv route's corruption figure per epoch: epoch 2 is the best

    def scripted(self, model, routes, rows):
        value = next(figures)
        return {f"val_{r}_corruption": value for r in routes}

    monkeypatch.setattr(Trainer, "corruption_metrics", scripted)
    out = tmp_path / "run"
    result = Trainer(_config(out, epochs=3, val_corruptions="fog", select_by="corruption", keep_epochs="2"),
                     data=_data(fmnist_small), log=lambda m: None).fit()
    assert result["best"] == {"epoch": 2, "metric": "val_adv_corruption", "value": 30.0}
    assert [m["val_adv_corruption"] for m in _metrics(out)] == [10.0, 30.0, 20.0]
    best, kept = load_checkpoint(out / "best.pt"), load_checkpoint(out / "epoch2.pt")
    assert best["best"]["epoch"] == 2
    assert all(torch.equal(best["model"][k], kept["model"][k]) for k in kept["model"])


def test_select_by_robust_stays_the_default(tmp_path, fmnist_small):
    out = tmp_path / "run"
    result = Trainer(_config(out, epochs=2, val_corruptions="brightness"), data=_data(fmnist_small),
                     log=lambda m: None).fit()
    lines = _metrics(out)
    assert result["best"]["metric"] == "val_adv_robust"
    first_best = max(range(2), key=lambda i: (lines[i]["val_adv_robust"], -i))
    assert result["best"]["epoch"] == first_best + 1
    assert all(0 <= m["val_adv_corruption"] <= 100 and "val_clean_corruption" in m for m in lines)


@pytest.mark.parametrize("args, words", [
    (["--val-corruptions", "fog,snoww"], ("snoww", "did you mean snow", "val-corruptions")),
    (["--val-corruptions", "fog,"], ("empty corruption name", "--val-corruptions")),
    (["--select-by", "corruption"], ("--select-by corruption", "--val-corruptions")),
    (["--val-corruptions", "fog", "--val-split", "0"], ("--val-split",)),
    (["--val-corruptions", "fog", "--val-severity", "6"], ("val-severity", "[1, 5]")),
])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, args, words, command):
    assert_refused(tmp_path, [command, "--dataset", "fashion-mnist", "--out", "run", *args], *words)


def test_toml_and_flags_layer_the_fields(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('val-corruptions = "fog,snow"\nselect-by = "corruption"\nval-severity = 2\n')
    plan = load_config({"out": str(tmp_path / "r")}, str(toml))
    assert (plan.val_corruptions, plan.select_by, plan.val_severity) == ("fog,snow", "corruption", 2)
    assert plan.to_dict()["val_corruptions"] == "fog,snow"  # what config.json stores
    plan = load_config({"val_severity": 5, "val_corruptions": "all"}, str(toml))
    assert (plan.val_corruptions, plan.val_severity) == ("all", 5)
    with pytest.raises(ConfigError, match="did you mean fog"):
        TrainConfig(val_corruptions="fgo").validate()


def test_a_config_written_before_the_fields_loads_and_resumes(tmp_path, fmnist_small):
    out, data = tmp_path / "run", _data(fmnist_small)
    Trainer(_config(out, epochs=1), data=data, log=lambda m: None).fit()
    path = out / "config.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in NEW_FIELDS}
    path.write_text(json.dumps(old))
    plan = saved_plan(old)
    assert (plan.val_corruptions, plan.val_severity, plan.select_by) == (None, 3, "robust")
    result = Trainer(_config(out, epochs=2), data=data, resume=True, log=lambda m: None).fit()
    assert result["epoch"] == 2 and "val_adv_corruption" not in result


def test_a_standard_run_keeps_its_most_accurate_epoch_not_its_most_robust(tmp_path, fmnist_small):
    out = tmp_path / "std"
    result = Trainer(_config(out, epochs=3, method="standard", keep_epochs="1,2,3"), data=_data(fmnist_small),
                     log=lambda m: None).fit()
    lines = _metrics(out)
    assert result["best"]["metric"] == "val_adv_clean"
    first_best = max(range(3), key=lambda i: (lines[i]["val_adv_clean"], -i))
    assert result["best"]["epoch"] == first_best + 1
    best, kept = load_checkpoint(out / "best.pt"), load_checkpoint(out / f"epoch{first_best + 1}.pt")
    assert all(torch.equal(best["model"][k], kept["model"][k]) for k in kept["model"])
    assert load_config({"method": "standard"}).select_by == "clean"
    assert load_config({"method": "standard", "select_by": "robust"}).select_by == "robust"
    assert load_config({"method": "trades"}).select_by == "robust"
