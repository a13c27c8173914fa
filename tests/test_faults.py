"""Faults: SIGINT/SIGTERM, kill -9 at random moments, a non-finite loss, a full or unwritable disk.

Every interrupted run must leave a loadable last.pt from which --resume finishes with exactly the
weights of an uninterrupted run (each step's attack is seeded by (seed, epoch, step, rank), and the
position inside the epoch is saved).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections import namedtuple
from functools import partial
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_config

import robust.outputs as outputs
import robust.train.step as step_module
import robust.train.trainer as trainer_module
from robust.checkpoint import load_checkpoint
from robust.cli.main import cli
from robust.config import TrainConfig
from robust.data.types import ImageData
from robust.errors import ConfigError, NonFiniteLoss, RunExistsError, TrainingInterrupted
from robust.outputs import FolderLock
from robust.train.trainer import Trainer


# two epochs of three steps each (96 images in batches of 32)
_config = partial(tiny_config, epochs=2, limit=96, seed=5)


def _cli_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "fashion-mnist", "--width", "4", "--epochs", "2", "--batch-size", "32",
            "--limit", "96", "--steps", "1", "--eps", "0.1", "--val-split", "0.1", "--val-limit", "32",
            "--val-steps", "1", "--no-channels-last", "--quiet", "--seed", "5", "--precision", "fp32", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def data(fmnist) -> ImageData:
    return ImageData("fashion-mnist", fmnist.train_x[:200], fmnist.train_y[:200], fmnist.test_x[:10], fmnist.test_y[:10])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _signal_at_step(monkeypatch, step: int, signum: int) -> None:
    """Make the process receive ``signum`` while training step ``step`` (1-based, over the run) runs."""
    original, calls = trainer_module.train_step, {"n": 0}

    def stepping(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", stepping)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_saves_and_resume_matches_an_uninterrupted_run(tmp_path, data, monkeypatch, signum):
    Trainer(_config(tmp_path / "straight"), data=data, log=lambda m: None).fit()
    handler_before = signal.getsignal(signum)
    _signal_at_step(monkeypatch, 5, signum)  # epoch 2, step 2 of 3
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(_config(tmp_path / "cut"), data=data, log=lambda m: None).fit()
    monkeypatch.undo()
    assert info.value.exit_code == 128 + signum
    assert "epoch 2, step 2 of 3" in str(info.value) and "--resume" in str(info.value)
    saved = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert saved["position"]["epoch"] == 1 and saved["position"]["batch"] == 2 and saved["scheduler"]["step"] == 5
    assert signal.getsignal(signum) == handler_before  # fit() put the previous handler back
    result = Trainer(_config(tmp_path / "cut"), data=data, resume=True, log=lambda m: None).fit()
    _assert_same_weights(tmp_path / "straight" / "last.pt", tmp_path / "cut" / "last.pt")
    straight = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in cut] == [1, 2]
    assert cut[1]["train_loss"] == pytest.approx(straight[1]["train_loss"], abs=1e-6)  # the tally survived
    assert result["val_adv_robust"] == straight[1]["val_adv_robust"]


def test_cli_exits_130_on_sigint_with_a_resume_hint(tmp_path, monkeypatch):
    _signal_at_step(monkeypatch, 2, signal.SIGINT)
    result = CliRunner().invoke(cli, _cli_args(tmp_path / "run"))
    assert result.exit_code == 130, result.output
    assert "stopped by SIGINT at epoch 1, step 2 of 3" in result.output
    assert f"robust train --out {tmp_path / 'run'} --resume" in result.output
    assert "Traceback" not in result.output
    monkeypatch.undo()
    resumed = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "run"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_sigterm_from_outside_stops_a_real_process_with_143(tmp_path):
    """A real `robust train` process, signalled from outside while it trains."""
    out = tmp_path / "run"
    args = _cli_args(out)
    args[args.index("--epochs") + 1] = "500"
    proc = subprocess.Popen([sys.executable, "-m", "robust.cli", *args, "--save-every", "0"], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        header = proc.stderr.readline()
        while header and not header.startswith("training preact_resnet18"):
            header = proc.stderr.readline()
        assert header, "the trainer never started"
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:  # wait for a finished epoch
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 143, rest
    finally:
        proc.kill()
    assert "stopped by SIGTERM" in rest and "--resume" in rest and "Traceback" not in rest
    saved = load_checkpoint(out / "last.pt")
    assert saved["position"]["epoch"] >= 1  # saved inside the epoch the signal interrupted
    assert not list(out.glob(".*.tmp"))


def _train_in_child(config: TrainConfig, data: ImageData, resume: bool) -> None:
    torch.set_num_threads(1)
    every_step = dataclasses.replace(config, save_every=1e-9)  # last.pt after every step: kill -9 lands anywhere
    Trainer(every_step, data=data, resume=resume, force=not resume, log=lambda m: None).fit()


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _wait_for_saves(path: Path, saves: int, child, timeout: float = 60.0) -> None:
    """Wait until ``path`` has been replaced ``saves`` times (or the child ended)."""
    seen, last, deadline = 0, _mtime(path), time.monotonic() + timeout
    while seen < saves and child.is_alive() and time.monotonic() < deadline:
        now = _mtime(path)
        if now != last:
            seen, last = seen + 1, now
        time.sleep(0.002)


def test_kill_9_at_random_moments_always_leaves_a_loadable_last_pt(tmp_path, data):
    """SIGKILL at random moments (last.pt is rewritten after every step), then resume; the end equals an uninterrupted run."""
    ctx = multiprocessing.get_context("fork")
    config = _config(tmp_path / "killed", epochs=4, limit=192)  # 6 steps per epoch, 24 in all
    last = tmp_path / "killed" / "last.pt"
    reference = ctx.Process(target=_train_in_child, args=(_config(tmp_path / "straight", epochs=4, limit=192), data, False))
    reference.start()
    reference.join(timeout=180)
    assert reference.exitcode == 0
    rng = random.Random(1234)
    progress = []
    for _ in range(3):
        child = ctx.Process(target=_train_in_child, args=(config, data, last.is_file()))
        child.start()
        _wait_for_saves(last, 2, child)
        time.sleep(rng.uniform(0.0, 0.03))  # anywhere in a step or in a checkpoint write
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL
        progress.append(load_checkpoint(last)["scheduler"]["step"])  # never a half-written file
    assert progress == sorted(set(progress)) and 0 < progress[-1] < 24  # kept progress, killed mid-run
    final = ctx.Process(target=_train_in_child, args=(config, data, True))
    final.start()
    final.join(timeout=180)
    assert final.exitcode == 0
    _assert_same_weights(tmp_path / "straight" / "last.pt", last)
    lines = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3, 4]
    assert not list((tmp_path / "killed").glob(".*.tmp"))


def _nan_at_step(monkeypatch, step: int) -> None:
    original, calls = step_module.step_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, logits = original(*args, **kwargs)
        return (loss * float("nan"), logits) if calls["n"] == step else (loss, logits)

    monkeypatch.setattr(step_module, "step_loss", poisoned)


def test_non_finite_loss_names_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    _nan_at_step(monkeypatch, 5)  # epoch 2, step 2 of 3; checked at the end of the epoch (no sync per step)
    trainer = Trainer(_config(tmp_path / "run"), data=data, log=lambda m: None)
    assert trainer.check_every > 3
    with pytest.raises(NonFiniteLoss, match=r"epoch 2, step 2 of 3 \(global step 5\).*end of epoch 1\) is kept"):
        trainer.fit()
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["epoch"] == 0 and saved["position"] is None
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
    assert [json.loads(l)["epoch"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_non_finite_loss_through_the_cli_is_one_line_exit_1(tmp_path, monkeypatch):
    _nan_at_step(monkeypatch, 2)
    result = CliRunner().invoke(cli, _cli_args(tmp_path / "run"))
    assert result.exit_code == 1
    errors = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1 and "non-finite training loss at epoch 1, step 2 of 3" in errors[0]
    assert "Traceback" not in result.output


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_full_disk_is_refused_before_training_and_nothing_is_written(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli, _cli_args(tmp_path / "run"))
    assert result.exit_code == 2
    assert "MB free but the checkpoints need about" in result.output and "--out" in result.output
    assert "Traceback" not in result.output and _tree(tmp_path) == before


def test_unwritable_output_folder_is_refused_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    before = _tree(tmp_path)
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        result = CliRunner().invoke(cli, _cli_args(out))
        assert result.exit_code == 2 and "is a file" in result.output and "Traceback" not in result.output
    assert _tree(tmp_path) == before

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)  # what a read-only folder answers
    result = CliRunner().invoke(cli, _cli_args(tmp_path / "run"))
    assert result.exit_code == 2 and "cannot write to" in result.output and "Permission denied" in result.output
    assert _tree(tmp_path) == before


def test_disk_full_during_training_keeps_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    def save(obj, fh, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # start + epoch 1 (best.pt, last.pt) succeed; epoch 2 finds the disk full
            fh.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    result = CliRunner().invoke(cli, _cli_args(tmp_path / "run"))
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "end of epoch 1) is kept" in result.output
    assert "Traceback" not in result.output
    run = tmp_path / "run"
    assert load_checkpoint(run / "last.pt")["epoch"] == 0
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    resumed = CliRunner().invoke(cli, ["train", "--out", str(run), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_resume_refuses_the_settings_of_another_model(tmp_path, data):
    Trainer(_config(tmp_path / "run", epochs=1), data=data, log=lambda m: None).fit()
    with pytest.raises(ConfigError, match=r"trained with --norm sabn \(given: auxbn\)"):  # the run's settings first
        Trainer(_config(tmp_path / "run", epochs=2, norm="auxbn"), data=data, resume=True).setup()
    with pytest.raises(ConfigError, match=r"--width 4 \(given: 8\)"):
        Trainer(_config(tmp_path / "run", epochs=2, width=8), data=data, resume=True).setup()


# ---- one writer per run folder ------------------------------------------------------------------------


def _hold_lock_in_child(folder: Path, ready) -> None:
    lock = FolderLock(folder).acquire()  # held while the object lives
    ready.set()
    time.sleep(600)
    lock.release()


def test_the_folder_lock_excludes_a_second_writer_and_dies_with_its_process(tmp_path):
    first = FolderLock(tmp_path / "a" / "run").acquire()
    assert (tmp_path / "a" / "run" / ".lock").is_file()
    with pytest.raises(outputs.FolderBusy, match=rf"run folder .*run is in use by another process \(pid {os.getpid()} "):
        FolderLock(tmp_path / "a" / "run").acquire()  # a second open file: flock excludes it in-process too
    first.release()
    assert not (tmp_path / "a").exists()  # the folders the lock created, still empty, are gone again
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_lock_in_child, args=(tmp_path / "run", ready))
    child.start()
    try:
        assert ready.wait(60)
        with pytest.raises(outputs.FolderBusy, match=f"pid {child.pid} "):
            FolderLock(tmp_path / "run").acquire()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
    assert (tmp_path / "run" / ".lock").is_file()  # the file stays after kill -9, but it is no lock any more
    with FolderLock(tmp_path / "run"):
        pass
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.parametrize("extra", [[], ["--force"], ["--resume"]])
def test_train_resume_and_force_are_refused_while_another_process_writes_the_folder(tmp_path, data, extra):
    run = tmp_path / "run"
    if extra:  # --force / --resume on a finished run; a plain run on a folder another run has just started
        Trainer(_config(run, epochs=1), data=data, log=lambda m: None).fit()
    before = _tree(run) if extra else {}
    with FolderLock(run):
        result = CliRunner().invoke(cli, _cli_args(run, *extra))
    assert result.exit_code == 2, result.output
    errors = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1 and "is in use by another process" in errors[0] and "--out NEW" in errors[0]
    assert "Traceback" not in result.output
    assert {k: v for k, v in _tree(run).items() if k != ".lock"} == before
    assert not run.exists() or not (run / ".lock").exists()  # the holder's lock went with it


def test_compare_is_refused_while_another_process_writes_its_folder(tmp_path):
    (tmp_path / "cmp").mkdir()
    with FolderLock(tmp_path / "cmp", what="compare folder"):
        result = CliRunner().invoke(cli, ["compare", "--dataset", "fashion-mnist", "--norms", "bn", "--epochs", "1",
                                          "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2 and "compare folder" in result.output and "in use by another process" in result.output
    assert list((tmp_path / "cmp").iterdir()) == []


def test_a_run_that_finished_while_we_set_up_is_not_overwritten(tmp_path, data):
    late = Trainer(_config(tmp_path / "run", epochs=1), data=data, log=lambda m: None).setup()  # the folder is free
    Trainer(_config(tmp_path / "run", epochs=1, seed=6), data=data, log=lambda m: None).fit()  # another run takes it
    before = _tree(tmp_path / "run")
    with pytest.raises(RunExistsError, match="already exists"):
        late.fit()  # re-checked under the lock
    assert _tree(tmp_path / "run") == before
    assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == 6


def test_a_resume_whose_last_pt_changed_after_setup_is_refused(tmp_path, data):
    Trainer(_config(tmp_path / "run", epochs=1), data=data, log=lambda m: None).fit()
    late = Trainer(_config(tmp_path / "run", epochs=2), data=data, resume=True, log=lambda m: None).setup()
    Trainer(_config(tmp_path / "run", epochs=2), data=data, resume=True, log=lambda m: None).fit()
    before = _tree(tmp_path / "run")
    with pytest.raises(ConfigError, match="changed after this run read it"):
        late.fit()
    assert _tree(tmp_path / "run") == before


def test_constructing_a_trainer_writes_nothing_and_a_finished_run_leaves_no_lock(tmp_path, data):
    trainer = Trainer(_config(tmp_path / "run", epochs=1), data=data, log=lambda m: None)
    assert not (tmp_path / "run").exists()
    trainer.fit()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]


def test_a_left_over_lock_file_does_not_make_a_folder_a_run(tmp_path, data):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("pid 1 (killed with -9)\n")
    Trainer(_config(tmp_path / "run", epochs=1), data=data, log=lambda m: None).fit()
    assert (tmp_path / "run" / "last.pt").is_file()


def test_default_run_folders_differ_by_seed():
    folders = {TrainConfig(dataset="fashion-mnist", seed=s).run_dir for s in (0, 1, 2**63 - 1)}
    assert folders == {Path(f"runs/fashion-mnist-sabn-pgd-s{s}") for s in (0, 1, 2**63 - 1)}


def test_two_real_train_processes_on_one_folder_one_writer_wins_whole(tmp_path):
    """Two runs started at once on one --out, `for s in 0 1; do robust train ... --seed $s & done`."""
    args = ["train", "--dataset", "fashion-mnist", "--limit", "64", "--width", "4", "--epochs", "1", "--val-limit", "16",
            "--val-steps", "1", "--steps", "1", "--batch-size", "32", "--no-channels-last", "--quiet", "--out", "same"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "robust.cli", *args, "--seed", str(s)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for s in (0, 1)]
    same = {s: (p.communicate(timeout=300)[0], p.returncode) for s, p in enumerate(procs)}
    assert sorted(code for _, code in same.values()) == [0, 2], same
    winner = next(s for s, (_, code) in same.items() if code == 0)
    loser_text = same[1 - winner][0]
    assert "Traceback" not in loser_text
    # the loser met the lock, or (if it set up after the winner had finished) the finished run
    assert ("in use by another process" in loser_text) or ("already exists" in loser_text), loser_text
    assert json.loads((tmp_path / "same" / "config.json").read_text())["seed"] == winner  # the winner's run, whole
    assert [json.loads(l)["epoch"] for l in (tmp_path / "same" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert load_checkpoint(tmp_path / "same" / "last.pt")["config"]["seed"] == winner
    assert not (tmp_path / "same" / ".lock").exists()


def test_an_output_that_appeared_during_the_work_is_not_replaced_without_force(tmp_path):
    target = tmp_path / "e.json"
    with pytest.raises(outputs.OutputError, match="appeared while we worked"):
        with outputs.atomic_output(target, overwrite=False) as fh:
            fh.write(b"new")
            target.write_text("someone else's")  # written by another program meanwhile
    assert target.read_text() == "someone else's"
    kept = [p for p in tmp_path.iterdir() if p.name != "e.json"]
    assert len(kept) == 1 and kept[0].read_bytes() == b"new" and not kept[0].name.startswith(".")
