"""Models from outside robust, for ``robust eval``: a TorchScript file, or a state dict (``.pt`` read with
``weights_only=True``, or ``.safetensors``) with an architecture name, wrapped to take images in [0, 1]
(``--mean/--std`` in front when the model does not normalize itself) and checked to give logits.
Nothing beyond tensors is unpickled; TorchScript runs its own program, not Python.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from robust.checkpoint import FORMAT, LOAD_ERRORS, SAFETENSORS, weight_mismatch
from robust.errors import CheckpointError, ConfigError, ModelError, unreadable_file
from robust.nn.external import check_arch, is_external
from robust.nn.factory import build_model
from robust.nn.resnet import InputNormalization


PLAIN_ROUTE = "adv"  # a plain model has one route; eval scores and names it as an export's


class PlainModel(nn.Module):
    """A classifier from outside robust as eval takes it: images in [0, 1], ``(x - mean) / std`` in front
    when given, logits out, one route."""

    def __init__(self, inner: nn.Module, build_args: dict[str, Any], mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.normalize = InputNormalization(mean, std, persistent=False) if mean is not None else nn.Identity()
        self.build_args = build_args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.normalize(x))


def is_torchscript(path: str | Path) -> bool:
    """True for a ``torch.jit.save`` file: a zip with TorchScript code (``torch.save`` files have none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def is_robust_checkpoint(path: str | Path) -> bool:
    """True when ``path`` reads (safely) as a checkpoint of robust: it knows its architecture and data. False for
    plain weights and for files that do not read at all."""
    path = Path(path)
    try:
        if path.suffix == SAFETENSORS:
            with safetensors.safe_open(str(path), framework="pt") as fh:
                return "robust" in (fh.metadata() or {})
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (*LOAD_ERRORS, safetensors.SafetensorError):
        return False
    return isinstance(loaded, dict) and loaded.get("format") == FORMAT


def parse_channel_values(text: str | None, flag: str, channels: int) -> list[float] | None:
    """``--mean 0.49,0.48,0.45`` as floats, one per channel (None stays None); ConfigError otherwise."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not comma-separated numbers, e.g. {flag} 0.4914,0.4822,0.4465") from None
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{flag} needs {channels} finite value(s), one per image channel; got {text!r}")
    if flag == "--std" and min(values) <= 0:
        raise ConfigError(f"--std values must be positive, got {text!r}")
    return values


def plain_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a plain state-dict file (.safetensors, or .pt/.pth read with weights_only=True: no code
    runs); a ``state_dict`` entry (RobustBench's files) and DataParallel's ``module.`` prefix are unwrapped."""
    if path.suffix == SAFETENSORS:
        try:
            state: Any = safetensors.torch.load_file(str(path))
        except (OSError, ValueError, safetensors.SafetensorError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
    else:
        state = _torch_load(path)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        raise ConfigError(f"{path} is a robust checkpoint: it knows its architecture; drop --arch, --mean and --std")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict (a mapping of names to tensors); save one with "
                              "torch.save(model.state_dict(), FILE) or safetensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with every failure as a CheckpointError naming the reason."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as exc:
        raise CheckpointError(unreadable_file(path, exc, "a model file", "save the weights alone "
                                              "(torch.save(model.state_dict(), FILE)), a .safetensors file or a "
                                              "TorchScript file (torch.jit.save)")) from None


def _fit(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Load ``state`` strictly; CheckpointError naming missing, unexpected or mis-shaped weights."""
    what = weight_mismatch(model, state)
    if what:
        raise CheckpointError(f"{path} does not fit --arch {arch} ({what}); pass the architecture it was saved from")
    model.load_state_dict(state)


def read_plain_model(path: str | Path, arch: str | None, num_classes: int, in_channels: int,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """A model from outside robust, in eval mode on the CPU: a TorchScript file (it carries its architecture),
    or a state dict with ``arch`` (torchvision:NAME, timm:NAME or one of ours, built with plain BatchNorm).

    ``mean``/``std``: the normalization the model expects in front, None when it normalizes itself (our
    architectures keep theirs in their weights). Nothing in the file is unpickled beyond tensors.
    """
    path = Path(path)
    if (mean is None) != (std is None):
        raise ConfigError("--mean and --std go together; pass both, or neither when the model normalizes itself")
    base = {"norm": "bn", "num_classes": int(num_classes), "in_channels": int(in_channels), "exported_route": PLAIN_ROUTE}
    if is_torchscript(path):
        if arch is not None:
            raise ConfigError(f"{path} is TorchScript, which carries its architecture; drop --arch")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated in torch; the file is still what the user has
                warnings.simplefilter("ignore", FutureWarning)
                inner = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a loadable TorchScript file ({str(exc).splitlines()[0][:120]})") from None
        return PlainModel(inner, {**base, "arch": "torchscript", "norm": "its own norms"}, mean, std).eval()
    if arch is None:
        raise ConfigError(f"{path} is a plain weights file; pass --arch torchvision:NAME, timm:NAME or one of ours")
    state = plain_state_dict(path)
    if is_external(arch):
        check_arch(arch)
        channels = [0.0] * in_channels, [1.0] * in_channels
        model = build_model(arch, norm="bn", num_classes=num_classes, in_channels=in_channels,
                            mean=mean if mean is not None else channels[0], std=std if std is not None else channels[1])
    else:
        if mean is not None:
            raise ConfigError(f"our architectures keep their normalization in their weights; drop --mean and --std for {arch}")
        stem = next((v for k, v in state.items() if k.endswith("weight") and v.dim() == 4), None)
        try:
            model = build_model(arch, norm="bn", num_classes=num_classes, in_channels=in_channels,
                                width=int(stem.shape[0]) if stem is not None and arch.startswith("preact") else None,
                                final_norm=any(k.startswith("final_norm.") for k in state))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--arch {arch}: {exc}") from None
    _fit(model, state, path, arch)
    model.build_args = {**model.build_args, "exported_route": PLAIN_ROUTE}
    return model.eval()


def check_logits(model: nn.Module, x: torch.Tensor, num_classes: int, path: str | Path) -> None:
    """ModelError unless ``model(x)`` is a (N, num_classes) tensor of logits (eval mode, no gradients)."""
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ModelError(f"{path} fails on the test images {tuple(x.shape)}: {str(exc).splitlines()[0][:160]}") from None
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if not isinstance(out, torch.Tensor) or shape != (len(x), num_classes):
        raise ModelError(f"{path} gives outputs of shape {shape} for {len(x)} images; eval needs logits of shape "
                         f"(N, {num_classes}), one per class of the dataset")
