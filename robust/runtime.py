"""The machine a run meets: device, precision (autocast), CPU count and kind, and the versions that shape the numbers."""

from __future__ import annotations

import contextlib
import os
import platform

import torch
import torchattacks

from robust.errors import ConfigError
from robust.version import __version__

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# The range of a torch thread count, for every command that takes one (train's --threads, eval's, the
# benchmark's): more threads than CPUs only make them wait for each other.
THREADS_RANGE = {"min": 1, "max": available_cpus, "max_note": "the CPUs available here"}


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


# oneDNN's ISA names below which it has no bf16 instructions, and below which it has no AMX.
_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
_BELOW_AMX = (*_BELOW_BF16, "AVX512_CORE_BF16", "AVX512_CORE_FP16")


def _onednn_cap() -> str:
    """``ONEDNN_MAX_CPU_ISA`` as set (it holds oneDNN to a lower CPU kind's kernels), upper-case; "" when unset."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX) that oneDNN may use: bf16 runs there, not emulated."""
    if _onednn_cap() in _BELOW_BF16:
        return False
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
    """True on CPUs with AMX bf16 matrix units (Intel Sapphire Rapids and later) that oneDNN may use."""
    return "amx_bf16" in _cpu_flags() and _onednn_cap() not in _BELOW_AMX


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


def configure_kernels(device: torch.device, deterministic: bool) -> None:
    """cuDNN's choice of kernels: deterministic ones (exact resume), or the fastest found by benchmarking."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


def precision_name(dtype: torch.dtype | None) -> str:
    """The --precision name of an autocast dtype (None: plain fp32)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` (a no-op context when dtype is None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def versions() -> dict[str, str]:
    """Versions of everything that shapes the numbers, stored next to them."""

    return {"robust": __version__, "torch": torch.__version__, "torchattacks": torchattacks.__version__,
            "python": platform.python_version()}


def describe_machine(device: torch.device | str | None = None) -> str:
    """This machine's CPU with its kind (AMX, AVX512-BF16, or neither), and the GPU when ``device`` is CUDA
    (or, without a device, when one is present): recorded with every run and printed by the report."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    kind = "with AMX" if cpu_has_amx() else "with AVX512-BF16" if cpu_has_native_bf16() else "without bf16 units"
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if cuda and torch.cuda.is_available() else ""
    return f"{model} ({kind}){gpu}"
