"""Precision: what ``auto`` resolves to on each CPU kind, and the bf16 path against fp32.

The suite runs with ``auto`` = fp32 (tests/conftest.py), so its verdicts do not depend on the CPU
kind; the bf16 tests below run only where bf16 is native (AMX/AVX512-BF16 CPUs, or CUDA), with
tolerances measured for bf16 and stated beside each.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robust.config import TrainConfig
from robust.data.loader import to_float
from robust.errors import ConfigError
from robust.lab.bench import BenchConfig, run_bench
from robust.nn.factory import build_model
from robust.nn.norms import use_route
from robust.runtime import autocast, autocast_dtype, cpu_has_amx
from robust.train.step import StepSettings, train_step
from robust.train.trainer import Trainer

CPU = torch.device("cpu")


def test_auto_is_bf16_exactly_where_the_cpu_has_amx(monkeypatch):
    monkeypatch.setenv("ROBUST_CPU_BF16", "1")  # as on an Intel Xeon with AMX
    assert autocast_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setenv("ROBUST_CPU_BF16", "0")  # as on an AMD EPYC (AVX2) or a Xeon with AVX512-BF16 only
    assert autocast_dtype("auto", CPU) is None
    monkeypatch.delenv("ROBUST_CPU_BF16")  # this machine's own flags decide
    assert autocast_dtype("auto", CPU) == (torch.bfloat16 if cpu_has_amx() else None)
    for setting in ("1", "0"):  # explicit precisions never depend on the machine
        monkeypatch.setenv("ROBUST_CPU_BF16", setting)
        assert autocast_dtype("fp32", CPU) is None and autocast_dtype("bf16", CPU) == torch.bfloat16
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            autocast_dtype("fp16", CPU)


def test_the_run_says_its_precision_and_validation_size(tmp_path, fmnist_small):
    lines: list[str] = []
    config = TrainConfig(dataset="fashion-mnist", width=4, epochs=1, limit=200, steps=1, eps="0.1", val_split=0.1,
                         val_steps=1, precision="fp32", channels_last=False, quiet=True, out=str(tmp_path / "r"))
    Trainer(config, data=fmnist_small, log=lines.append).fit()
    assert "[180 training, 20 validation examples, 1x28x28]" in lines[0] and "precision fp32" in lines[0]


def _one_step(model, x, y, amp):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    s = StepSettings.of("hybrid", eps=0.1, alpha=0.025, steps=3, clean_weight=0.5, attack_bn="train", fused=True,
                        amp=amp, device=CPU)
    torch.manual_seed(100)
    loss, _ = train_step(model, opt, None, x, y, s)
    return loss.item()


@pytest.mark.bf16
def test_a_bf16_training_step_tracks_the_fp32_step(fmnist_small):
    """Measured on an Intel Xeon (AVX512-BF16, no AMX), seeds 0-2: loss within 0.15% of fp32, the weight update's
    cosine with fp32's 0.88-0.93 and its norm within 1.5% (PGD's sign steps flip where bf16 rounds
    the input gradient differently, so the adversarial examples differ slightly)."""
    x, y = to_float(fmnist_small.train_x[:64]), fmnist_small.train_y[:64]
    for seed in range(3):
        torch.manual_seed(seed)
        start = build_model(norm="sabn", width=8, in_channels=1)
        runs = {}
        for amp in (None, torch.bfloat16):
            model = copy.deepcopy(start)
            loss = _one_step(model, x, y, amp)
            update = torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), start.parameters())])
            runs[amp] = (loss, update)
        (loss32, up32), (loss16, up16) = runs[None], runs[torch.bfloat16]
        assert loss16 == pytest.approx(loss32, rel=1e-2)
        assert F.cosine_similarity(up32, up16, dim=0).item() > 0.8
        assert (up16.norm() / up32.norm()).item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.bf16
@pytest.mark.parametrize("norm", ["bn", "auxbn", "sabn"])
def test_bf16_logits_stay_within_bf16_rounding_of_fp32(norm):
    """bf16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4%); through 16 conv layers of a
    width-8 model the logits moved by at most ~1% of their scale when measured."""
    torch.manual_seed(0)
    model = build_model(norm=norm, width=8, in_channels=1).eval()
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with use_route(model, "adv"):
        exact = model(x)
        with autocast(CPU, torch.bfloat16):
            low = model(x).float()
    scale = exact.abs().max().item()
    assert (low - exact).abs().max().item() <= 0.05 * scale
    assert (low.argmax(1) == exact.argmax(1)).float().mean().item() >= 0.9


@pytest.mark.bf16
def test_bench_in_bf16_divides_by_the_bf16_peak():
    r = run_bench(BenchConfig(width=8, batch_size=8, steps=1, iters=1, repeats=1, images=32, memory=False,
                              precision="bf16"))
    proj, book = r["variants"]["project"], r["variants"]["textbook"]
    assert set(r["matmul_peak_gflops"]) == {"fp32", "bf16"}
    assert (proj["precision"], book["precision"]) == ("bf16", "fp32")
    assert proj["peak_fraction"] == pytest.approx(proj["achieved_gflops"] / r["matmul_peak_gflops"]["bf16"])
    assert book["peak_fraction"] == pytest.approx(book["achieved_gflops"] / r["matmul_peak_gflops"]["fp32"])
