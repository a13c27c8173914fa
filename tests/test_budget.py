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
    # 100 s less the 15% margin and 10 s spent leave 75 s; an epoch of 10 steps of 0.5 s and a 2 s validation is
    # 7 s: 10 epochs (70 s), then 5 s left, 2 s of them the part-epoch's validation: 6 more steps of 0.5 s.
    bought = buy_steps(100.0, Costs(step_s=0.5, val_s=2.0, spent_s=10.0), batches_per_epoch=10, batch_size=64)
    assert MARGIN == 0.15
    assert (bought.steps, bought.epochs) == (106, 11)
    assert bought.predicted_s == pytest.approx(10 + 106 * 0.5 + 11 * 2.0) and bought.predicted_s <= 85
    line = bought.describe()
    assert "106 steps of batch 64" in line and "10.60 epochs" in line and "6,784 images" in line
    assert "--train-steps 106" in line
    assert [steps_in_epoch(e, 10, 106) for e in (0, 9, 10, 11)] == [10, 10, 6, 0]
    assert steps_in_epoch(3, 10, None) == 10 and epochs_for(106, 10) == 11 and epochs_for(110, 10) == 11


def test_the_guards_check_costs_every_epoch_as_validation_does():
    # as above, with a 1 s guard check per epoch: an epoch is 8 s, 75 s buy 9 epochs (72 s) and 3 s too few for a
    # part-epoch's validation and check
    bought = buy_steps(100.0, Costs(step_s=0.5, val_s=2.0, spent_s=10.0, checks_s=1.0), batches_per_epoch=10,
                       batch_size=64)
    assert (bought.steps, bought.epochs) == (90, 9)
    assert bought.predicted_s == pytest.approx(10 + 90 * 0.5 + 9 * 3.0) and bought.predicted_s <= 85
    assert "1s a guard check" in bought.describe()


def test_a_budget_below_one_epoch_is_refused_naming_what_one_costs():
    with pytest.raises(ConfigError) as caught:
        buy_steps(30.0, Costs(step_s=0.5, val_s=2.0, spent_s=10.0), batches_per_epoch=40, batch_size=64)
    message = str(caught.value)
    assert "cannot buy one epoch" in message and "40 steps" in message and "\n" not in message
    assert "give at least 38s" in message  # (10 + 40 * 0.5 + 2) / 0.85 = 37.6 s


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

    calls.clear()
    clock = TickingClock(3.0)  # as above, then 12 and 15 around the guard's check, 18
    costs = Probe(clock, [model, optimizer]).measure(train_once, lambda: calls.append("val"), val_parts=2.5,
                                                     started=clock(), per_epoch=lambda: calls.append("check"))
    assert calls == ["step"] * 7 + ["val", "check"]
    assert costs == Costs(step_s=0.6, val_s=7.5, spent_s=18.0, checks_s=3.0)


# 57 training images in batches of 32 (2 steps an epoch), 7 validation images, a cosine schedule
_config = partial(tiny_config, epochs=1, schedule="cosine")


def _data(fmnist_small) -> ImageData:
    d = fmnist_small
    return ImageData(d.name, d.train_x[:64], d.train_y[:64], d.test_x[:16], d.test_y[:16])


def _budget_run(out, data, budget="95s", **kw):
    lines: list[str] = []
    # Clock readings 10 s apart: started 0; the probe reads 10, 20 (5 steps: 2 s each), 30 (the whole
    # validation set in one batch: 10 s), 40 (spent). 95 s less 15% and 40 s spent leave 40.75 s: 2 epochs of
    # 2 steps and a validation (14 s each) and 1 step (2 s) with its validation (10 s): 5 steps, 3 epochs.
    trainer = Trainer(_config(out, time_budget=budget, **kw), data=data, log=lines.append, clock=TickingClock(10.0))
    return trainer, trainer.fit(), lines


def test_the_budget_buys_records_and_trains_exactly_those_steps(tmp_path, fmnist_small):
    data = _data(fmnist_small)
    trainer, result, lines = _budget_run(tmp_path / "a", data)
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (saved["time_budget"], saved["train_steps"], saved["epochs"]) == ("95s", 5, 3)
    assert lines[0].startswith("time budget 1m35s buys 5 steps of batch 32 (2.50 epochs, 160 images)")
    assert lines[-1].startswith("trained 5 steps; took ") and lines[-1].endswith("of the 1m35s time budget")
    assert result["epoch"] == 3 and result["time_budget"] == "95s" and result["took_s"] > 0
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


def test_the_probe_reads_the_loops_own_batches_and_changes_nothing_the_run_trains(tmp_path, fmnist_small):
    """The probe trains on the loop's augmented batches and puts everything back: the budget run's weights are
    those of a run told the same steps with --train-steps."""
    data = _data(fmnist_small)
    _budget_run(tmp_path / "a", data)
    Trainer(_config(tmp_path / "b", train_steps=5), data=data, log=lambda m: None).fit()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["scheduler"]["step"] == b["scheduler"]["step"] == 5
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items())


def test_a_resume_trains_the_recorded_steps_not_a_new_budget(tmp_path, fmnist_small):
    data = _data(fmnist_small)
    _budget_run(tmp_path / "a", data)

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1 "):
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(_config(tmp_path / "b", time_budget="95s"), data=data, log=stop_after_first_epoch,
                clock=TickingClock(10.0)).fit()
    # resumed on a "machine" 100x faster: it would buy far more steps, and trains the 5 recorded
    resumed = Trainer(_config(tmp_path / "b", time_budget="95s"), data=data, resume=True, log=lambda m: None,
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
