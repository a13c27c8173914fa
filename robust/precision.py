"""Precision ``auto`` on the CPU, decided by measurement: the model's own step timed in fp32 and in bf16.

CPU flags do not predict bf16 speed (an AMD EPYC with AVX512-BF16 runs bf16 convolutions ~2.3x fp32, an
Intel Xeon with the same flags ~0.8x), so ``auto`` times one forward and backward of the model at the
run's batch size in both precisions, interleaved, and picks bf16 where it is at least
:data:`MIN_SPEEDUP` times faster. The ratio is cached per machine, software and model shape under the
user's cache folder, so later runs reuse it instead of timing again; an entry whose torch version, CPU,
kernel limits, thread count or model shape differ is never read, and one older than
:data:`MAX_AGE_DAYS` is measured again. ``ROBUST_CPU_BF16=0|1`` overrides the choice; CPUs without
native bf16 (emulated, ~8x slower) get fp32 without a measurement.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from robust.outputs import write_output
from robust.runtime import _cpu_flags, _onednn_cap, autocast, autocast_dtype, cpu_has_native_bf16, describe_machine

MIN_SPEEDUP = 1.2  # bf16 must save at least this much time to be worth its rounding
MAX_AGE_DAYS = 90
ROUNDS = 3  # timed steps per precision, after one warm-up each; the median is kept
PROBE_SECONDS = 10.0  # after the first alternated pair, no further pair starts once this much has gone
CACHE_VERSION = 1

Step = Callable[[], None]


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` (or the user) chose, and why, in words for the run's first line."""

    dtype: torch.dtype | None  # None: plain fp32
    why: str
    speedup: float | None = None  # measured bf16 speed over fp32, when measured

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def describe(self) -> str:
        return f"{self.name} ({self.why})"


def cache_file() -> Path:
    """``$ROBUST_CACHE/precision.json``, else under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    root = os.environ.get("ROBUST_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "robust"
    return Path(root) / "precision.json"


def machine_key(signature: str) -> str:
    """The key of one measurement: everything that changes bf16's speed against fp32."""
    flags = next((line for line in _cpu_flags().splitlines() if line.startswith("flags")), "")
    parts = [str(CACHE_VERSION), torch.__version__, describe_machine("cpu"), flags, _onednn_cap(),
             os.environ.get("ATEN_CPU_CAPABILITY", ""), str(torch.get_num_threads()), signature]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_speedup(key: str, path: Path | None = None, now: float | None = None) -> float | None:
    """The ratio measured earlier under ``key``, or None when there is none or it is older than MAX_AGE_DAYS."""
    entry = _read_cache(path or cache_file()).get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("speedup"), (int, float)):
        return None
    age_days = ((now or time.time()) - float(entry.get("measured_at", 0))) / 86400
    return float(entry["speedup"]) if 0 <= age_days <= MAX_AGE_DAYS else None


def remember_speedup(key: str, speedup: float, signature: str, path: Path | None = None) -> None:
    """Store a measurement; a cache that cannot be written (read-only home) only means measuring again."""
    path = path or cache_file()
    data = _read_cache(path)
    data[key] = {"speedup": round(speedup, 4), "measured_at": time.time(), "model": signature, "torch": torch.__version__}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_output(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def time_step(step: Step, device: torch.device, dtype: torch.dtype | None) -> float:
    """Seconds of one call of ``step`` under autocast to ``dtype``."""
    with autocast(device, dtype):
        start = time.perf_counter()
        step()
        return time.perf_counter() - start


def measure_speedup(step: Step, device: torch.device, rounds: int = ROUNDS, budget_s: float = PROBE_SECONDS) -> float:
    """fp32 seconds over bf16 seconds of ``step``: one warm-up each (kernel set-up, not timed), then up
    to ``rounds`` alternated pairs (at least one; none starts after ``budget_s``), medians."""
    start = time.perf_counter()
    for dtype in (None, torch.bfloat16):
        time_step(step, device, dtype)
    fp32, bf16 = [], []
    while len(fp32) < rounds and (not fp32 or time.perf_counter() - start < budget_s):
        fp32.append(time_step(step, device, None))
        bf16.append(time_step(step, device, torch.bfloat16))
    return statistics.median(fp32) / max(statistics.median(bf16), 1e-9)


def choose_precision(asked: str, device: torch.device, signature: str, step: Step | None,
                     measure: Callable[[Step, torch.device], float] | None = None,
                     path: Path | None = None) -> PrecisionChoice:
    """The precision ``asked`` (auto, fp32, bf16, fp16) resolves to on ``device``.

    ``auto`` on a CPU with native bf16 uses the ratio cached for ``signature`` (the model's shape and
    the step's batch), or measures ``step`` with ``measure`` and caches it; bf16 where the ratio is
    at least MIN_SPEEDUP (``measure`` defaults to :func:`measure_speedup`). ``step`` None (a caller that cannot run the model, e.g. several ranks that
    must agree) falls back to the flag rule (bf16 with AMX).
    """
    if asked != "auto":
        return PrecisionChoice(autocast_dtype(asked, device), "asked")
    if device.type != "cpu":
        return PrecisionChoice(autocast_dtype("auto", device), "auto on CUDA")
    forced = os.environ.get("ROBUST_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return PrecisionChoice(torch.bfloat16 if forced == "1" else None, f"ROBUST_CPU_BF16={forced}")
    if not cpu_has_native_bf16():
        return PrecisionChoice(None, "auto: bf16 would be emulated on this CPU")
    if step is None:
        dtype = autocast_dtype("auto", device)
        return PrecisionChoice(dtype, "auto by CPU flags: " + ("AMX" if dtype is not None else "no AMX") + ", not measured")
    key = machine_key(signature)
    speedup = cached_speedup(key, path)
    source = "cached"
    if speedup is None:
        speedup = (measure or measure_speedup)(step, device)
        remember_speedup(key, speedup, signature, path)
        source = "just measured"
    chosen = speedup >= MIN_SPEEDUP
    why = f"auto: bf16 ran this model's step {speedup:.2f}x fp32's speed ({source}; bf16 from {MIN_SPEEDUP:g}x)"
    return PrecisionChoice(torch.bfloat16 if chosen else None, why, speedup)


def model_signature(model: torch.nn.Module, input_shape: tuple[int, ...], purpose: str) -> str:
    """The shape of what is timed: the model's class, its parameter shapes and the batch's shape."""
    shapes = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    digest = hashlib.sha256(shapes.encode()).hexdigest()[:16]
    return f"{purpose}:{type(model).__name__}:{digest}:{'x'.join(map(str, input_shape))}"


def training_step_probe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """One forward and backward of ``model`` (train mode) on ``x``: the unit a training step repeats."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    return step


def input_gradient_probe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """One forward and input gradient of ``model`` as it is: the unit an attack iteration repeats.

    ``torch.autograd.grad`` leaves the parameters' ``.grad`` untouched."""

    def step() -> None:
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(model(xr).float(), y), xr)

    return step


def probe_inputs(input_shape: tuple[int, ...], classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [0, 1] and labels, drawn from a generator of their own (the run's RNG is untouched)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(input_shape, generator=gen).to(device)
    y = torch.randint(0, max(classes, 1), (input_shape[0],), generator=gen).to(device)
    return x, y
