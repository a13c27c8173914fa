"""DDP training on the CPU (gloo, 2 processes through torchrun) and the route-aware SyncBatchNorm.

One torchrun job (the WORKER source below) trains several tiny runs; the test then checks
that both ranks end with bitwise identical weights, buffers and momentum, that exactly one
checkpoint set is written, that resume works under DDP, and that a DDP step with --sync-bn equals
a single-process step over the same global batch.

Tolerances, stated honestly: one step agrees to 1e-5 (float summation order only). Over several
steps this width-4 model amplifies float noise quickly (a single-process run changes by ~3e-4 in
4 steps when only its thread count changes), so multi-step runs are compared on their epoch
losses (to 0.02), not weight by weight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_config_dict

from robust.checkpoint import load_checkpoint
from robust.cli.main import cli
from robust.config import TrainConfig
from robust.data.types import ImageData
from robust.nn.factory import build_model
from robust.nn.norms import DualBatchNorm2d, SandwichBatchNorm2d, split_routes, use_route
from robust.nn.syncbn import SyncBatchNorm2d, SyncSharedBatchNorm2d, convert_sync_batchnorm
from robust.train.distributed import DistContext, shard_rows
from robust.train.trainer import Trainer

WORKER = '''
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from robust.train import distributed
from robust.config import TrainConfig
from robust.data import ImageData, load_dataset
from robust import Trainer

out = Path(sys.argv[1])
configs = json.loads(Path(sys.argv[2]).read_text())
d = load_dataset("fashion-mnist", download=False)
data = ImageData("fashion-mnist", d.train_x[:256], d.train_y[:256], d.test_x[:10], d.test_y[:10])
rank = None
for job in configs:
    trainer = Trainer(TrainConfig(**job["config"]), data=data, resume=job["resume"], sync_bn=job["sync_bn"],
                      log=None if job["log"] else (lambda m: None))
    trainer.fit()
    rank = dist.get_rank()
    state = {"model": trainer.model.state_dict(),
             "momentum": [s["momentum_buffer"] for s in trainer.optimizer.state.values()],
             "ema": trainer.ema.average.state_dict() if trainer.ema is not None else None}
    torch.save(state, out / f"{job['name']}.rank{rank}.pt")
distributed.shutdown()
'''


# a dict, not a TrainConfig: the jobs travel to the torchrun workers as JSON
_config = partial(tiny_config_dict, limit=32, steps=2, eps="1e-6", val_split=0.25, seed=3)


def _data(fmnist) -> ImageData:
    return ImageData("fashion-mnist", fmnist.train_x[:256], fmnist.train_y[:256], fmnist.test_x[:10], fmnist.test_y[:10])


def _jobs(tmp_path: Path) -> list[dict]:
    runs = tmp_path / "runs"
    return [
        # one step with route-aware SyncBN: compared weight by weight with one process
        dict(name="one", config=_config(runs / "one"), resume=False, sync_bn=True, log=False),
        # three steps, then resumed for a second epoch under DDP; logs from rank 0 only
        dict(name="run1", config=_config(runs / "run", limit=96), resume=False, sync_bn=True, log=True),
        dict(name="run2", config=_config(runs / "run", limit=96, epochs=2), resume=True, sync_bn=None, log=True),
        # clean-weight 0 on a dual-route model leaves the clean route unused (find_unused_parameters), no SyncBN
        dict(name="pgd", config=_config(runs / "pgd", norm="auxbn", method="pgd", clean_weight=0.0), resume=False,
             sync_bn=False, log=False),
        # the non-fused hybrid step: two DDP forwards before one backward
        dict(name="twofwd", config=_config(runs / "twofwd", fused=False, norm="bn", method="hybrid"), resume=False,
             sync_bn=True, log=False),
        # one AWP step: the ascent gradient is averaged over ranks, so it is the global batch's
        dict(name="awp", config=_config(runs / "awp", awp_gamma=0.01), resume=False, sync_bn=True, log=False),
        # weight averaging: every rank keeps the same average
        dict(name="ema", config=_config(runs / "ema", ema=0.5, limit=96), resume=False, sync_bn=True, log=False),
    ]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Run every job of _jobs in one 2-process torchrun (gloo); return the folder and stderr."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "jobs.json").write_text(json.dumps(_jobs(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(tmp_path / "worker.py"), str(tmp_path), str(tmp_path / "jobs.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path, proc.stderr


def _rank_states(folder: Path, name: str):
    return [torch.load(folder / f"{name}.rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("name", ["one", "run2", "pgd", "twofwd", "awp"])
def test_both_ranks_end_with_identical_weights(ddp_run, name):
    folder, _ = ddp_run
    a, b = _rank_states(folder, name)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert len(a["momentum"]) == len(b["momentum"]) > 0
    for ma, mb in zip(a["momentum"], b["momentum"]):
        assert torch.equal(ma, mb)


def test_exactly_one_checkpoint_set_and_ddp_resume(ddp_run):
    folder, stderr = ddp_run
    run = folder / "runs" / "run"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["awp", "ema", "one", "pgd", "run", "twofwd"]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 1 and last["position"] is None
    assert last["distributed"] == {"world_size": 2, "sync_bn": True}  # resume kept the run's SyncBN
    # rank 1 is silent: each line of the run's log appears once
    assert stderr.count("epoch 1 | lr") == 1 and stderr.count("epoch 2 | lr") == 1
    assert stderr.count("resumed ") == 1 and stderr.count("x 2 ranks (DDP, sync-bn)") == 2
    # the saved checkpoint is rank 0's model, which equals both ranks' final weights
    a, _ = _rank_states(folder, "run2")
    for key, tensor in last["model"].items():
        assert torch.equal(tensor, a["model"][key]), key


@pytest.mark.parametrize("name", ["one", "awp"])
@pytest.mark.precision
def test_one_sync_bn_ddp_step_equals_one_process_on_the_global_batch(ddp_run, fmnist, tmp_path, name):
    folder, _ = ddp_run
    job = next(j for j in _jobs(folder) if j["name"] == name)
    single = Trainer(TrainConfig(**{**job["config"], "out": str(tmp_path / "single")}), data=_data(fmnist),
                     log=lambda m: None)
    single.fit()
    ddp, _ = _rank_states(folder, name)
    reference = single.model.state_dict()
    if name == "awp":
        _check_awp_step(ddp["model"], reference, job, fmnist, tmp_path)
        return
    for key, tensor in reference.items():
        if tensor.is_floating_point():
            assert torch.allclose(ddp["model"][key], tensor, atol=1e-5, rtol=1e-4), key
        else:
            assert torch.equal(ddp["model"][key], tensor), key
    torch.manual_seed(job["config"]["seed"])  # the trainer's initial weights
    initial = build_model(norm="sabn", width=4, in_channels=1).state_dict()
    assert (reference["fc.weight"] - initial["fc.weight"]).abs().max() > 1e-3  # the step moved far beyond the tolerance


def _check_awp_step(ddp: dict, reference: dict, job: dict, fmnist, tmp_path: Path) -> None:
    """AWP under DDP against one process on the global batch, relative to the step's size.

    Measured: a plain DDP+SyncBN step already differs from one process by about 5e-4 of the step
    in the first three stages (float effects of the synced statistics, within the 1e-5 weight
    tolerance above because lr scales it down); AWP's ascent direction is normalized per layer,
    which carries that into a 0.3% difference of the whole step. Without the perturbation the step
    differs by 45%, so the 1% bound checks that both ranks perturb as one process would.
    """
    torch.manual_seed(job["config"]["seed"])
    initial = build_model(norm="sabn", width=4, in_channels=1).state_dict()
    plain = Trainer(TrainConfig(**{**job["config"], "awp_gamma": 0.0, "out": str(tmp_path / "plain")}),
                    data=_data(fmnist), log=lambda m: None)
    plain.fit()
    keys = [k for k, t in initial.items() if t.is_floating_point() and "running" not in k]
    flat = lambda sd: torch.cat([sd[k].flatten() for k in keys])  # noqa: E731
    step = (flat(reference) - flat(initial)).norm()
    assert (flat(ddp) - flat(reference)).norm() / step < 0.01
    assert (flat(plain.model.state_dict()) - flat(reference)).norm() / step > 0.1  # AWP changed the step


@pytest.mark.precision
def test_multi_epoch_ddp_losses_match_one_process(ddp_run, fmnist, tmp_path):
    folder, _ = ddp_run
    for job in _jobs(folder)[1:3]:  # the same sequence in one process: one epoch, then resumed to two
        Trainer(TrainConfig(**{**job["config"], "out": str(tmp_path / "single")}), data=_data(fmnist),
                resume=job["resume"], log=lambda m: None).fit()
    single = [json.loads(l) for l in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    ddp = [json.loads(l) for l in (folder / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    for s, d in zip(single, ddp):
        assert d["train_loss"] == pytest.approx(s["train_loss"], abs=0.02)
        assert d["lr"] == pytest.approx(s["lr"], rel=1e-9)


# ---- route-aware SyncBN without a process group (structure, state, fallback) ----------------------


@pytest.mark.parametrize("norm", ["bn", "auxbn", "sabn"])
@pytest.mark.precision
def test_sync_conversion_swaps_only_inner_norms_and_keeps_the_state(norm):
    torch.manual_seed(0)
    model = build_model(norm=norm, width=4, in_channels=1)
    x = torch.rand(6, 1, 12, 12)
    model.train()
    with split_routes(model, 3):
        model(x)  # move the running statistics away from their init
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = build_model(norm=norm, width=4, in_channels=1)
    reference.load_state_dict(plain_state)
    convert_sync_batchnorm(model)
    assert model.state_dict().keys() == plain_state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, plain_state[key]), key
    if norm == "auxbn":
        dual = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
        assert dual and all(isinstance(m.bns[r], SyncBatchNorm2d) for m in dual for r in ("clean", "adv"))
    elif norm == "sabn":
        sandwich = [m for m in model.modules() if isinstance(m, SandwichBatchNorm2d)]
        assert sandwich and all(isinstance(m.stats[r], SyncBatchNorm2d) for m in sandwich for r in ("clean", "adv"))
    else:
        assert sum(isinstance(m, SyncSharedBatchNorm2d) for m in model.modules()) == 16
    # without a process group the synced norms are plain BN: same outputs in split mode and per route
    for mode in (True, False):
        model.train(mode), reference.train(mode)
        with split_routes(model, 3), split_routes(reference, 3):
            assert torch.allclose(model(x), reference(x), atol=1e-6)
        with use_route(model, "clean"), use_route(reference, "clean"):
            assert torch.allclose(model(x), reference(x), atol=1e-6)
    # a checkpoint of the converted model loads into an unconverted one
    build_model(norm=norm, width=4, in_channels=1).load_state_dict(model.state_dict())


def test_shard_rows_cover_the_batch_once():
    for n in (7, 8, 33):
        for world in (2, 3):
            parts = [shard_rows(n, DistContext(rank=r, world_size=world)) for r in range(world)]
            rows = [i for p in parts for i in range(p.start, p.stop)]
            assert rows == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_nproc_launcher_stops_every_rank_on_sigterm_and_a_single_process_resumes(tmp_path):
    """`robust train --nproc 2` (torch.distributed.run underneath), SIGTERM to the launcher while training."""
    out = tmp_path / "run"
    args = ["train", "--nproc", "2", "--dataset", "fashion-mnist", "--width", "4", "--epochs", "500",
            "--batch-size", "32", "--limit", "64", "--steps", "1", "--eps", "0.1", "--val-split", "0.01",
            "--val-limit", "16", "--val-steps", "1", "--no-channels-last", "--quiet", "--precision", "fp32",
            "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "robust.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 143, output
    assert output.count("training preact_resnet18") == 1 and output.count("epoch 1 | lr") == 1  # rank 0 only
    stops = [l for l in output.splitlines() if l.startswith("stopped by SIGTERM")]
    assert len(stops) == 1 and stops[0].endswith(f"robust train --out {out} --resume --nproc 2")
    assert "Traceback" not in output
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]
    saved = load_checkpoint(out / "last.pt")
    assert saved["distributed"]["world_size"] == 2 and saved["position"]["epoch"] >= 1
    # the DDP checkpoint resumes in one process (the global batch, so the schedule, is unchanged)
    finish = str(saved["position"]["epoch"] + 1)
    result = CliRunner().invoke(cli, ["train", "--out", str(out), "--resume", "--epochs", finish])
    assert result.exit_code == 0, result.output
    done = load_checkpoint(out / "last.pt")
    assert done["position"] is None and done["epoch"] + 1 == int(finish)
    assert done["distributed"]["world_size"] == 1


def test_every_rank_keeps_the_same_weight_average(ddp_run):
    folder, _ = ddp_run
    a, b = _rank_states(folder, "ema")
    assert a["ema"] is not None and a["ema"].keys() == a["model"].keys()
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["model"] if k.endswith("weight"))
