"""Device, precision, learning-rate schedule and the BN-mode context: the engine's small parts."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import torch
import torch.nn as nn

from .config import ConfigError, TrainConfig


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda") from None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return fh.read()
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX): bf16 runs there, not emulated."""
    return any(f in _cpu_flags() for f in ("avx512_bf16", "amx_bf16"))


def cpu_supports_bf16() -> bool:
    """Whether precision ``auto`` picks bf16 on the CPU: only where it is measured to pay, with AMX.

    Measured (robust bench, 2-core Intel Xeon with AVX512-BF16 but no AMX, torch 2.14.1): a bf16
    matmul ran at 0.53x the fp32 rate and our training step at 0.78x, so AVX512-BF16 alone gets
    fp32; AVX2-only CPUs emulate bf16 (about 8x slower) and get fp32 too. ``ROBUST_CPU_BF16=0`` or
    ``=1`` overrides the detection (the test suite sets 0, so its verdicts are the same everywhere).
    """
    forced = os.environ.get("ROBUST_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_has_amx()


def cpu_has_amx() -> bool:
    """True on CPUs with AMX bf16 matrix units (Intel Sapphire Rapids and later)."""
    return "amx_bf16" in _cpu_flags()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def precision_name(dtype: torch.dtype | None) -> str:
    """The --precision name of an autocast dtype (None: plain fp32)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` (a no-op context when dtype is None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def bn_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Temporarily put ``model`` in train or eval mode; restore every module's mode on exit."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        yield model
    finally:
        for m, mode in saved:
            m.training = mode


def lr_at(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """The learning rate before optimizer step ``step`` (0-based, counted over the whole run)."""
    total = config.epochs * steps_per_epoch
    epoch = step / steps_per_epoch
    base = config.lr
    if config.schedule == "multistep":
        passed = sum(epoch >= m for m in config.milestone_epochs)
        lr = base * (0.1 ** passed)
    elif config.schedule == "cosine":
        lr = 0.5 * base * (1 + math.cos(math.pi * step / total))
    else:  # onecycle: linear up over the first 40% of steps, then linear down to 0
        peak = 0.4 * total
        lr = base * (step / peak if step < peak else max(0.0, (total - step) / (total - peak)))
    if config.warmup_steps and step < min(config.warmup_steps, steps_per_epoch) and config.schedule != "onecycle":
        # The reference warms from lr/10 to lr linearly over its first 200 steps (first epoch).
        warm = min(config.warmup_steps, steps_per_epoch)
        lr = base * (0.1 + 0.9 * step / warm)
    return lr
