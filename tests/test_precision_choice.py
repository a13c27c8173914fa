"""Precision ``auto`` on the CPU follows a measurement of the model's own step, cached per machine and
model shape. The measurements here are faked (a function returning a ratio): what is tested is the
decision, the cache and what the run says, never this machine's speed."""

from __future__ import annotations

import json

import pytest
import torch

import robust.precision as P
from robust import evaluate
from robust.config import TrainConfig
from robust.nn.factory import build_model
from robust.train.trainer import Trainer

CPU = torch.device("cpu")


@pytest.fixture
def native_bf16(monkeypatch, tmp_path):
    """A CPU with native bf16 (whatever this one has), no override, the cache in a folder of the test's own."""
    monkeypatch.delenv("ROBUST_CPU_BF16", raising=False)
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv("ROBUST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision.json"


def counting(ratio: float):
    calls = []

    def measure(step, device):
        calls.append(device)
        return ratio

    return measure, calls


def test_auto_follows_the_measurement_both_ways(native_bf16):
    fast, _ = counting(1.5)
    slow, _ = counting(1.1)
    chosen = P.choose_precision("auto", CPU, "model-a", lambda: None, measure=fast)
    assert chosen.dtype == torch.bfloat16 and chosen.speedup == 1.5 and "1.50x" in chosen.why
    chosen = P.choose_precision("auto", CPU, "model-b", lambda: None, measure=slow)
    assert chosen.dtype is None and chosen.speedup == 1.1 and chosen.name == "fp32"
    assert P.MIN_SPEEDUP == 1.2  # 1.1 stays below the bar, 1.5 clears it


def test_the_measurement_is_cached_and_reused(native_bf16):
    measure, calls = counting(1.4)
    first = P.choose_precision("auto", CPU, "model-a", lambda: None, measure=measure)
    again = P.choose_precision("auto", CPU, "model-a", lambda: None, measure=measure)
    assert len(calls) == 1 and first.dtype == again.dtype == torch.bfloat16
    assert "just measured" in first.why and "cached" in again.why
    saved = json.loads(native_bf16.read_text())
    assert [e["speedup"] for e in saved.values()] == [1.4] and [e["model"] for e in saved.values()] == ["model-a"]


def test_the_cache_is_ignored_when_torch_the_cpu_the_model_or_the_age_changes(native_bf16, monkeypatch):
    measure, calls = counting(1.4)
    P.choose_precision("auto", CPU, "model-a", lambda: None, measure=measure)
    P.choose_precision("auto", CPU, "model-b", lambda: None, measure=measure)  # another model shape
    assert len(calls) == 2
    monkeypatch.setattr(P, "describe_machine", lambda device=None: "another CPU")
    P.choose_precision("auto", CPU, "model-a", lambda: None, measure=measure)
    assert len(calls) == 3
    monkeypatch.setattr(P.torch, "__version__", "0.0.0-other")
    P.choose_precision("auto", CPU, "model-a", lambda: None, measure=measure)
    assert len(calls) == 4
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # kernels held to a lower kind's
    P.choose_precision("auto", CPU, "model-a", lambda: None, measure=measure)
    assert len(calls) == 5
    key = P.machine_key("model-a")
    later = P.time.time() + (P.MAX_AGE_DAYS + 1) * 86400
    assert P.cached_speedup(key) == 1.4 and P.cached_speedup(key, now=later) is None


def test_an_unwritable_or_broken_cache_only_means_measuring_again(native_bf16, tmp_path):
    native_bf16.parent.mkdir(parents=True)
    native_bf16.write_text("not json")
    measure, calls = counting(0.8)
    assert P.choose_precision("auto", CPU, "m", lambda: None, measure=measure).dtype is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    chosen = P.choose_precision("auto", CPU, "m", lambda: None, measure=measure, path=blocked / "precision.json")
    assert chosen.dtype is None and len(calls) == 2


def test_no_measurement_where_it_cannot_pay_or_is_overridden(native_bf16, monkeypatch):
    measure, calls = counting(9.0)
    assert P.choose_precision("fp32", CPU, "m", lambda: None, measure=measure).dtype is None
    assert P.choose_precision("bf16", CPU, "m", lambda: None, measure=measure).dtype == torch.bfloat16
    monkeypatch.setenv("ROBUST_CPU_BF16", "0")
    assert P.choose_precision("auto", CPU, "m", lambda: None, measure=measure).why == "ROBUST_CPU_BF16=0"
    monkeypatch.delenv("ROBUST_CPU_BF16")
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)  # bf16 emulated: never worth timing
    assert P.choose_precision("auto", CPU, "m", lambda: None, measure=measure).dtype is None
    assert calls == []


def test_the_real_measurement_times_both_precisions_alternately(monkeypatch):
    seen = []

    def step():
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    ratio = P.measure_speedup(step, CPU, rounds=2, budget_s=60)
    assert ratio > 0 and seen == [None, torch.bfloat16] * 3  # warm-ups, then alternated pairs


def test_the_probes_leave_the_model_and_the_rng_as_they_were(fmnist_small):
    model = build_model("preact_resnet18", "sabn", 10, 1, 4, (0.5,), (0.5,), image_size=(28, 28))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = P.probe_inputs((8, 1, 28, 28), 10, CPU)
    rng = torch.get_rng_state()
    P.input_gradient_probe(model.eval(), x, y)()
    assert all(p.grad is None for p in model.parameters())  # an attack's unit touches no weight gradient
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_says_what_auto_chose_and_why(native_bf16, monkeypatch, tmp_path, fmnist_small):
    monkeypatch.setattr(P, "measure_speedup", lambda step, device: 0.9)
    lines: list[str] = []
    config = TrainConfig(dataset="fashion-mnist", width=4, epochs=1, limit=64, batch_size=32, steps=1, eps="0.1",
                         val_split=0, precision="auto", channels_last=False, quiet=True, out=str(tmp_path / "r"))
    Trainer(config, data=fmnist_small, log=lines.append).fit()
    assert "precision fp32 (auto: bf16 ran this model's step 0.90x fp32's speed (just measured" in lines[0]
    saved = json.loads(native_bf16.read_text())
    assert [e["model"].split(":")[:2] for e in saved.values()] == [["train", "PreActResNet"]]


def test_the_probe_does_not_change_what_a_run_trains(native_bf16, monkeypatch, tmp_path, fmnist_small):
    """auto that measures fp32 trains the same weights as fp32 asked for: the probe draws from RNGs of its own."""
    monkeypatch.setattr(P, "measure_speedup", lambda step, device: 0.5)
    weights = {}
    for precision in ("auto", "fp32"):
        config = TrainConfig(dataset="fashion-mnist", width=4, epochs=1, limit=64, batch_size=32, steps=1, eps="0.1",
                             val_split=0, precision=precision, channels_last=False, quiet=True,
                             out=str(tmp_path / precision))
        trainer = Trainer(config, data=fmnist_small, log=lambda line: None)
        trainer.fit()
        weights[precision] = trainer.model.state_dict()
    assert all(torch.equal(weights["auto"][k], weights["fp32"][k]) for k in weights["fp32"])


def test_evaluation_records_what_auto_chose(native_bf16, monkeypatch, fmnist_small):
    monkeypatch.setattr(P, "measure_speedup", lambda step, device: 1.3)
    model = build_model("preact_resnet18", "bn", 10, 1, 4, (0.5,), (0.5,), image_size=(28, 28))
    result = evaluate(model, (fmnist_small.test_x[:8], fmnist_small.test_y[:8]), attacks="pgd2", eps=0.1)
    assert result["attack_precision"] == "bf16" and "1.30x" in result["attack_precision_why"]
    saved = json.loads(native_bf16.read_text())
    assert [e["model"].split(":")[0] for e in saved.values()] == ["attack"]
