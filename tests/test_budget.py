"""--time-budget: the duration parser, the steps a measured step time buys, the steps recorded and trained
exactly (also after a resume), the schedule ending on the last step, the CLI's refusals."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from helpers import assert_refused, tiny_config
from robust.checkpoint import load_checkpoint
from robust.checks import format_duration, parse_duration
from robust.data.types import ImageData
from robust.errors import ConfigError
from robust.plan import TrainPlan
from robust.train.budget import MARGIN, Costs, Probe, buy_steps, epochs_for, steps_in_epoch
from robust.train.schedule import lr_at
from robust.train.trainer import Trainer


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400),
                                           ("1.5h", 5400), (" 10M ", 600), ("2m30s", 150), ("168h", 604800)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, words", [
    ("0m", "no time at all"), ("0h0m0s", "no time at all"), ("-5m", "negative"), ("10", "no unit"),
    (600, "no unit"), ("1.5", "no unit"), ("1000h", "more than a week"), ("169h", "more than a week"),
    ("10x", "not a duration"), ("m", "not a duration"), ("1h2h", "not a duration"), ("10 m", "not a duration"),
    ("", "not a duration"), (True, "must be a duration"), ("١٠m", "not ASCII"),
])
def test_bad_durations_are_refused_in_one_line(text, words):
    with pytest.raises(ConfigError) as caught:
        parse_duration(text)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_config_checks_the_budget_where_it_checks_every_field(tmp_path):
    with pytest.raises(ConfigError, match="time-budget '10' has no unit"):
        TrainPlan.of(tiny_config(tmp_path, time_budget="10"))
    assert TrainPlan.of(tiny_config(tmp_path, time_budget="1h30m")).time_budget == "1h30m"
    assert format_duration(5400) == "1h30m" and format_duration(571) == "9m31s" and format_duration(45) == "45s"


def test_a_step_time_buys_the_steps_the_arithmetic_gives():
    # 100 s less the 10% margin and 10 s spent leave 80 s; an epoch of 10 steps of 0.5 s and a 2 s validation is
    # 7 s: 11 epochs (77 s), then 3 s left, 2 s of them the part-epoch's validation: 2 more steps of 0.5 s.
    bought = buy_steps(100.0, Costs(step_s=0.5, val_s=2.0, spent_s=10.0), batches_per_epoch=10, batch_size=64)
    assert MARGIN == 0.10
    assert (bought.steps, bought.epochs) == (112, 12)
    assert bought.predicted_s == pytest.approx(10 + 112 * 0.5 + 12 * 2.0) and bought.predicted_s <= 90
    line = bought.describe()
    assert "112 steps of batch 64" in line and "11.20 epochs" in line and "7,168 images" in line
    assert "--train-steps 112" in line
    assert [steps_in_epoch(e, 10, 112) for e in (0, 10, 11, 12)] == [10, 10, 2, 0]
    assert steps_in_epoch(3, 10, None) == 10 and epochs_for(112, 10) == 12 and epochs_for(110, 10) == 11


def test_a_budget_below_one_epoch_is_refused_naming_what_one_costs():
    with pytest.raises(ConfigError) as caught:
        buy_steps(30.0, Costs(step_s=0.5, val_s=2.0, spent_s=10.0), batches_per_epoch=40, batch_size=64)
    message = str(caught.value)
    assert "cannot buy one epoch" in message and "40 steps" in message and "\n" not in message
    assert "give at least 36s" in message  # (10 + 40 * 0.5 + 2) / 0.9 = 35.6 s


class TickingClock:
    """A fake clock: every reading is ``tick`` seconds after the last, whatever the work between."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now - self.tick


def test_the_probe_times_with_its_clock_and_restores_what_it_trained():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def train_once():
        calls.append("step")
        optimizer.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        optimizer.step()

    clock = TickingClock(3.0)  # readings 0 (start), 3 (after the warm-up), 6 (5 steps), 9 (one val batch), 12
    costs = Probe(clock, [model, optimizer]).measure(train_once, lambda: calls.append("val"), val_parts=2.5,
                                                     started=clock())
    assert calls == ["step"] * 7 + ["val"]
    assert costs == Costs(step_s=0.6, val_s=7.5, spent_s=12.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {}


# 57 training images in batches of 32 (2 steps an epoch), 7 validation images, a cosine schedule
_config = partial(tiny_config, epochs=1, schedule="cosine")


def _data(fmnist_small) -> ImageData:
    d = fmnist_small
    return ImageData(d.name, d.train_x[:64], d.train_y[:64], d.test_x[:16], d.test_y[:16])


def _budget_run(out, data, budget="90s", **kw):
    lines: list[str] = []
    # Clock readings 10 s apart: started 0; the probe reads 10, 20 (5 steps: 2 s each), 30 (the whole
    # validation set in one batch: 10 s), 40 (spent). 90 s less 10% and 40 s spent leave 41 s: 2 epochs of
    # 2 steps and a validation (14 s each) and 1 step (2 s) with its validation (10 s): 5 steps, 3 epochs.
    trainer = Trainer(_config(out, time_budget=budget, **kw), data=data, log=lines.append, clock=TickingClock(10.0))
    return trainer, trainer.fit(), lines


def test_the_budget_buys_records_and_trains_exactly_those_steps(tmp_path, fmnist_small):
    data = _data(fmnist_small)
    trainer, result, lines = _budget_run(tmp_path / "a", data)
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (saved["time_budget"], saved["train_steps"], saved["epochs"]) == ("90s", 5, 3)
    assert lines[0].startswith("time budget 1m30s buys 5 steps of batch 32 (2.50 epochs, 160 images)")
    assert lines[-1].startswith("trained 5 steps; took ") and lines[-1].endswith("of the 1m30s time budget")
    assert result["epoch"] == 3 and result["time_budget"] == "90s" and result["took_s"] > 0
    assert load_checkpoint(tmp_path / "a" / "last.pt")["scheduler"]["step"] == 5
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    # the last epoch's lr is the schedule's at the last step (step 4 of 5); after it the schedule is at its end
    plan = trainer.plan
    assert metrics[-1]["lr"] == pytest.approx(lr_at(4, plan, 2)) and lr_at(5, plan, 2) == pytest.approx(0.0, abs=1e-12)
    # the same steps given by hand train the same weights: the probe trained nothing
    Trainer(_config(tmp_path / "b", train_steps=5), data=data, log=lambda m: None).fit()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items())


class _Stop(Exception):
    pass


def test_a_resume_trains_the_recorded_steps_not_a_new_budget(tmp_path, fmnist_small):
    data = _data(fmnist_small)
    _budget_run(tmp_path / "a", data)

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1 "):
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(_config(tmp_path / "b", time_budget="90s"), data=data, log=stop_after_first_epoch,
                clock=TickingClock(10.0)).fit()
    # resumed on a "machine" 100x faster: it would buy far more steps, and trains the 5 recorded
    resumed = Trainer(_config(tmp_path / "b", time_budget="90s"), data=data, resume=True, log=lambda m: None,
                      clock=TickingClock(0.1))
    result = resumed.fit()
    assert resumed.bought is None and resumed.plan.train_steps == 5 and result["epoch"] == 3
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert b["scheduler"]["step"] == 5
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items())


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "multistep"])
def test_the_schedule_reaches_its_final_value_on_the_last_step(tmp_path, schedule):
    plan = TrainPlan.of(tiny_config(tmp_path, schedule=schedule, train_steps=23, epochs=3, milestones="0.5",
                                    warmup_steps=0))
    lrs = [lr_at(step, plan, 10) for step in range(24)]
    final = {"cosine": 0.0, "onecycle": 0.0, "multistep": plan.lr * 0.1}[schedule]
    assert lrs[23] == pytest.approx(final, abs=1e-12)  # after step 23 of 23: the end of the schedule
    assert min(lrs) == pytest.approx(final, abs=1e-12)


def test_a_budget_that_buys_less_than_an_epoch_is_refused_before_anything_is_written(tmp_path, fmnist_small):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="cannot buy one epoch"):
        Trainer(_config(out, time_budget="30s"), data=_data(fmnist_small), log=lambda m: None,
                clock=TickingClock(10.0)).fit()
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("budget, words", [("0m", "no time at all"), ("-1m", "negative"), ("10", "no unit"),
                                           ("1000h", "more than a week")])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_the_cli_refuses_a_bad_budget_with_exit_2_and_nothing_written(tmp_path, command, budget, words):
    assert_refused(tmp_path, [command, "--dataset", "fashion-mnist", "--time-budget", budget, "--out", "r"],
                   "time-budget", words)
