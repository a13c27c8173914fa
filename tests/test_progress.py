"""Progress on long work: heartbeat lines without a terminal, the route-image count and ensemble stages of
eval's progress, the estimate before an expensive attack, the whole run's estimate in training."""

from __future__ import annotations

import io

import torch
from helpers import tiny_config

from robust.attacks.registry import Attack
from robust.eval import estimate
from robust.eval.evaluation import Bars, evaluate, work_text
from robust.nn.factory import build_model
from robust.nn.norms import use_route
from robust.progress import Progress, format_duration, has_terminal, heartbeat_interval, run_estimate
from robust.train.trainer import Trainer


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_a_heartbeat_line_comes_at_the_interval(monkeypatch):
    monkeypatch.setenv("ROBUST_HEARTBEAT_S", "30")
    clock, out = Clock(), io.StringIO()
    assert not has_terminal(out)
    progress = Progress(100, "autoattack (50 images x 2 routes)", unit="img", stream=out, clock=clock)
    assert progress.bar is None
    clock.now = 29.0
    progress.update(10)
    assert out.getvalue() == ""  # not yet 30 s
    clock.now = 30.0
    progress.doing("APGD-T on 7 images, adv route")
    clock.now = 60.0
    progress.update(15)  # 25 of 100 in 60 s: 180 s left
    lines = out.getvalue().splitlines()
    assert lines == ["autoattack (50 images x 2 routes) [APGD-T on 7 images, adv route]: 10/100 img, 30 s so far, "
                     "about 4 min left",  # 90 images to go at 3 s each
                     "autoattack (50 images x 2 routes) [APGD-T on 7 images, adv route]: 25/100 img, 60 s so far, "
                     "about 3 min left"]


def test_the_heartbeat_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("ROBUST_HEARTBEAT_S", "2.5")
    assert heartbeat_interval() == 2.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("ROBUST_HEARTBEAT_S", bad)
        assert heartbeat_interval() == 30.0
    disabled = Progress(10, "x", enabled=False, stream=io.StringIO(), clock=Clock())
    disabled.clock.now = 100.0
    disabled.update()
    assert disabled.stream.getvalue() == ""


def test_durations_read_as_people_say_them():
    assert [format_duration(s) for s in (45, 600, 3 * 3600, 30 * 86400)] == ["45 s", "10 min", "3.0 h", "30.0 days"]


def test_a_run_of_days_says_so_and_names_a_quick_setting():
    line = run_estimate(1.0, 200 * 13_000, "--epochs 10")  # ~1 s a step, 200 epochs of 13,000 steps
    assert "30.1 days" in line and "--epochs 10" in line and "2600000 steps" in line
    assert "days" not in run_estimate(0.5, 100, "--epochs 10")


def test_training_prints_the_whole_runs_estimate_after_its_first_steps(tmp_path):
    lines: list[str] = []
    Trainer(tiny_config(tmp_path / "run", quiet=False, epochs=3), log=lines.append).fit()
    estimates = [l for l in lines if l.startswith("estimated training time")]
    assert len(estimates) == 1  # once, after the first epoch's 2 steps (64 images x 0.9 / batch 32)
    assert "for 4 steps" in estimates[0]  # 3 epochs x 2 steps, 2 done


def test_eval_counts_route_images_and_beats_without_a_terminal(monkeypatch, capsys, fmnist):
    monkeypatch.setenv("ROBUST_HEARTBEAT_S", "1e-9")  # every update
    torch.manual_seed(0)
    model = build_model(norm="sabn", width=4, in_channels=1)
    x, y = fmnist.test_x[:20], fmnist.test_y[:20]
    evaluate(model, (x, y), attacks=["pgd1"], eps=0.1, batch_size=8, progress=True)
    err = capsys.readouterr().err.splitlines()
    pgd = [l for l in err if l.startswith("pgd1 (20 images x 2 routes)")]
    assert pgd[-1].startswith("pgd1 (20 images x 2 routes): 40/40 img")
    assert len(pgd) == 6  # 3 chunks x 2 routes
    assert work_text([("adv", 0)], ["adv"], 20, [(0, 8), (8, 16), (16, 20)]) == "8 images, adv route"


def test_an_ensembles_stage_and_route_are_named_as_they_start():
    model = build_model(norm="sabn", width=4, in_channels=1)
    out = io.StringIO()
    bars = Bars(["clean", "autoattack"], 100, "50 images x 2 routes", enabled=False)
    attack = Attack("autoattack", lambda x, y: x)
    bars.watch([attack], model)
    with use_route(model, "clean"):
        attack.on_stage("apgd-t", 7)
    assert bars.bars["autoattack"].note == "APGD-T on 7 images, clean route"
    assert out.getvalue() == ""


def test_an_estimate_of_hours_says_so_with_a_limit_that_fits(monkeypatch, fmnist):
    model = build_model(norm="sabn", width=4, in_channels=1)
    x, y = fmnist.test_x[:50], fmnist.test_y[:50]
    monkeypatch.setattr(estimate, "probe_seconds", lambda *a, **k: 60.0)  # a minute per image and route
    lines = estimate.estimate_lines(model, x, y, ["pgd20", "autoattack"], ["clean", "adv"], {"eps": 0.1})
    assert len(lines) == 1  # pgd20 is not announced
    assert lines[0].startswith("estimate: autoattack on 50 images x 2 routes takes about 1.7 h here")
    assert "that is HOURS (1.7 h)" in lines[0] and "--limit 5 for about 10 min" in lines[0]
    monkeypatch.setattr(estimate, "probe_seconds", lambda *a, **k: 1.0)
    assert "HOURS" not in estimate.estimate_lines(model, x, y, ["autoattack"], ["adv"], {"eps": 0.1})[0]


def test_the_probe_times_the_attack_and_leaves_the_rng_alone(fmnist):
    model = build_model(norm="sabn", width=4, in_channels=1)
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    seconds = estimate.probe_seconds(model, fmnist.test_x[:4], fmnist.test_y[:4], "square", "adv",
                                     {"eps": 0.1, "queries": 5})
    assert seconds > 0
    assert torch.equal(torch.random.get_rng_state(), before)
