"""CUDA paths: fp16 with GradScaler, bf16, channels_last, torch.compile, nccl, CUDA-event timing.

Every test here is marked ``gpu`` and skips without CUDA (tests/conftest.py). They are written to
run on a lent GPU machine; a CPU-only run proves nothing about them.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from helpers import tiny_config

from robust.checkpoint import load_checkpoint
from robust.data.types import ImageData
from robust.bench.training import BenchConfig, run_bench
from robust.nn.factory import build_model
from robust.nn.norms import use_route
from robust.train.trainer import Trainer

pytestmark = pytest.mark.gpu


def _data(fmnist) -> ImageData:
    return ImageData("fashion-mnist", fmnist.train_x[:512], fmnist.train_y[:512], fmnist.test_x[:64], fmnist.test_y[:64])


# GPU-sized: a wider model, more images and larger batches, CUDA with its own precision and memory format
_config = partial(tiny_config, width=8, batch_size=64, limit=512, steps=2, val_limit=None, val_steps=2, lr=0.1,
                  channels_last=True, precision="auto", device="cuda")


def test_fp16_trains_with_a_grad_scaler_and_resumes_it(tmp_path, fmnist):
    trainer = Trainer(_config(tmp_path / "r", precision="fp16"), data=_data(fmnist), log=lambda m: None).setup()
    assert trainer.scaler is not None and trainer.amp == torch.float16
    result = trainer.fit()
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    saved = load_checkpoint(tmp_path / "r" / "last.pt")
    assert saved["scaler"] and saved["scaler"]["scale"] > 0
    resumed = Trainer(_config(tmp_path / "r", precision="fp16", epochs=2), data=_data(fmnist), resume=True,
                      log=lambda m: None).setup()
    assert resumed.scaler.get_scale() == pytest.approx(saved["scaler"]["scale"])


def test_bf16_on_cuda_tracks_fp32(tmp_path, fmnist):
    losses = {}
    for precision in ("fp32", "bf16"):
        losses[precision] = Trainer(_config(tmp_path / precision, precision=precision), data=_data(fmnist),
                                    log=lambda m: None).fit()["train_loss"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_channels_last_gives_the_same_logits_as_nchw(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = build_model(norm="sabn", width=8, in_channels=1).cuda().eval()
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.rand(8, 1, 28, 28, device="cuda")
    with use_route(model, "adv"), use_route(fast, "adv"), torch.no_grad():
        assert torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)), model(x), atol=1e-4)


def test_compiled_training_runs_and_matches_eager_logits(tmp_path, fmnist):
    trainer = Trainer(_config(tmp_path / "c", compile=True, precision="fp32"), data=_data(fmnist), log=lambda m: None)
    trainer.fit()
    x = torch.rand(8, 1, 28, 28, device="cuda")
    trainer.model.eval()
    with use_route(trainer.model, "adv"), torch.no_grad():
        assert torch.allclose(trainer.attack_model(x), trainer.model(x), atol=1e-4)


NCCL_ONE_PROCESS = """
import torch, torch.distributed as dist
from robust import build_model, split_routes
from robust.nn.syncbn import convert_sync_batchnorm
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29561", rank=0, world_size=1)
torch.manual_seed(0)
plain = build_model(norm="sabn", width=8, in_channels=1).cuda().train()
synced = build_model(norm="sabn", width=8, in_channels=1).cuda().train()
synced.load_state_dict(plain.state_dict())
convert_sync_batchnorm(synced)
x = torch.rand(8, 1, 28, 28, device="cuda")
with split_routes(plain, 4), split_routes(synced, 4):
    a, b = plain(x), synced(x)
assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
for (k, v), (_, w) in zip(plain.state_dict().items(), synced.state_dict().items()):
    if v.is_floating_point():
        assert torch.allclose(v, w, atol=1e-5), k
dist.destroy_process_group()
print("ok")
"""


def test_route_aware_sync_bn_over_nccl_with_one_process_equals_plain_bn(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NCCL_ONE_PROCESS], cwd=tmp_path, env={**os.environ},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_bench_on_cuda_is_timed_with_cuda_events(monkeypatch):
    created = []
    real_event = torch.cuda.Event

    def counting_event(*args, **kwargs):
        created.append(kwargs)
        return real_event(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "Event", counting_event)
    r = run_bench(BenchConfig(device="cuda", width=8, batch_size=16, steps=1, iters=2, repeats=1, images=64,
                              memory=True, precision="bf16"))
    assert r["device"].startswith("cuda") and created and all(k.get("enable_timing") for k in created)
    assert r["variants"]["project"]["median_images_per_s"] > 0
    assert r["variants"]["project"]["memory"]["kind"] == "cuda max_memory_allocated"
    assert set(r["matmul_peak_gflops"]) == {"fp32", "bf16"}
