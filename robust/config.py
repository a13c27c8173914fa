"""Training configuration: one dataclass, one eps parser, TOML loading.

Every field of :class:`TrainConfig` is a flag of ``robust train`` (``--field-name``); its
``help`` metadata is the flag's help text, so the CLI and the library cannot drift apart.
Defaults reproduce the SaBN reference recipe on CIFAR-10.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from .models import available_archs
from .norms import NORMS

METHODS = ("pgd", "hybrid", "fast")
SCHEDULES = ("multistep", "cosine", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
ATTACK_BN_MODES = ("train", "eval")
DATASETS = ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "imagefolder", "tensors")
DATA_MODES = ("auto", "memory", "stream")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def parse_fraction(text: str | float | int, name: str = "value") -> float:
    """Parse ``"8/255"``, ``"0.031"`` or a number exactly (fractions, never eval)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{name} {text!r} is not a number; write it like 8/255 or 0.031") from None


def parse_eps(text: str | float | int, name: str = "eps", allow_zero: bool = False) -> float:
    """Parse an eps in pixel units; it must lie in (0, 1] (or [0, 1] with ``allow_zero``)."""
    eps = parse_fraction(text, name)
    low_ok = eps >= 0 if allow_zero else eps > 0
    if not (low_ok and eps <= 1):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"{name} {text!r} is outside {bound}; pixels are in [0, 1], e.g. 8/255")
    return eps


def _f(default: Any, help: str, **extra: Any):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as config.json with every run."""

    # data
    dataset: str = _f("cifar10", "dataset name; imagefolder and tensors read your own data from --data-dir", choices=DATASETS)
    data_dir: str | None = _f(None, "folder with the dataset files (looked up before system folders and download); "
                                    "imagefolder: DIR with train/<class>/ (and test/ or val/); tensors: FILE.npz or .pt")
    image_size: int | None = _f(None, "imagefolder: resize images to N x N (shorter side to N, centre crop); needed when the files differ in size")
    data_mode: str = _f("auto", "imagefolder/tensors: memory (read once), stream (read from disk each epoch by DataLoader workers) or auto (memory when it fits)", choices=DATA_MODES)
    workers: int | None = _f(None, "imagefolder/tensors: processes reading images (0: the training process; default: CPUs, at most 8)")
    val_split: float = _f(0.1, "fraction of the training set held out for validation (0 disables it)")
    limit: int | None = _f(None, "train on the first N examples only (quick runs)")
    # model
    arch: str = _f("preact_resnet18", f"architecture: {', '.join(available_archs())}, torchvision:NAME or timm:NAME (e.g. torchvision:resnet18)")
    norm: str = _f("sabn", "norm kind: bn (shared), auxbn (dual BN), sabn (sandwich BN)", choices=NORMS)
    width: int | None = _f(None, "channels of the first stage (default: the architecture's; 16 is CPU-sized)")
    # optimization
    epochs: int = _f(200, "training epochs")
    batch_size: int = _f(128, "training batch size")
    lr: float = _f(0.1, "peak learning rate (SGD)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "SGD weight decay")
    schedule: str = _f("multistep", "learning-rate schedule", choices=SCHEDULES)
    milestones: str = _f("50,150", "multistep: epochs at which lr is multiplied by 0.1")
    warmup_steps: int = _f(200, "steps of linear warm-up from lr/10 in the first epoch (0 disables)")
    # adversarial training
    method: str | None = _f(None, "pgd (adversarial loss only), hybrid (clean + adv routes), fast (FGSM-RS); default hybrid for auxbn/sabn, pgd for bn", choices=METHODS)
    clean_weight: float = _f(0.5, "hybrid: weight w of the clean-route loss, (1-w) for the adv route")
    eps: str = _f("8/255", "Linf radius in pixel units, e.g. 8/255 or 0.031")
    step_size: str | None = _f(None, "PGD step size (default eps/4, i.e. 2/255 for eps 8/255)")
    steps: int = _f(7, "PGD steps for training examples")
    attack_bn: str = _f("train", "BN mode while training attacks run: train (reference; updates adv-route statistics) or eval", choices=ATTACK_BN_MODES)
    val_steps: int = _f(10, "PGD steps of the per-epoch validation attack")
    val_limit: int | None = _f(None, "score at most N validation examples per epoch")
    # engine
    device: str = _f("auto", "auto picks CUDA when present", choices=DEVICES)
    precision: str = _f("auto", "autocast precision: auto = bf16 where supported, else fp32", choices=PRECISIONS)
    channels_last: bool = _f(True, "channels_last memory format")
    compile: bool = _f(False, "torch.compile the model")
    fused: bool = _f(True, "hybrid/fast: one forward over the concatenated clean+adv batch (split routes)")
    sync_bn: bool = _f(False, "distributed: route-aware SyncBatchNorm, each route's statistics over all processes")
    save_every: float = _f(600.0, "also write last.pt inside an epoch at most every this many seconds (0: epoch ends only)")
    seed: int = _f(0, "random seed (data split, order, augmentation, attack starts)")
    threads: int | None = _f(None, "CPU threads for torch (default: torch's choice)")
    # output
    out: str | None = _f(None, "run folder (default runs/<dataset>-<norm>-<method>)")
    quiet: bool = _f(False, "no progress bars")

    # ---- derived values -------------------------------------------------------------------
    @property
    def resolved_method(self) -> str:
        return self.method or ("pgd" if self.norm == "bn" else "hybrid")

    @property
    def eps_value(self) -> float:
        return parse_eps(self.eps)

    @property
    def step_size_value(self) -> float:
        if self.step_size is None:
            return self.eps_value / 4
        step = parse_fraction(self.step_size, "step_size")
        if step <= 0:
            raise ConfigError(f"step_size {self.step_size!r} must be > 0")
        return step

    @property
    def milestone_epochs(self) -> list[int]:
        try:
            return [int(m) for m in str(self.milestones).split(",") if m.strip()]
        except ValueError:
            raise ConfigError(f"milestones {self.milestones!r} must be comma-separated epochs, e.g. 50,150") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.dataset}-{self.norm}-{self.resolved_method}")

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first invalid field; return self when all are valid."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"unknown {f.name} {value!r}; valid: {', '.join(choices)}")
        positive = ("epochs", "batch_size", "steps", "val_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("limit", "val_limit", "width", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {value}")
        if self.save_every < 0:
            raise ConfigError(f"save-every must be >= 0 seconds, got {self.save_every:g}")
        if not 0 <= self.val_split < 1:
            raise ConfigError(f"val-split must be in [0, 1), got {self.val_split}")
        if not 0 <= self.clean_weight <= 1:
            raise ConfigError(f"clean-weight must be in [0, 1], got {self.clean_weight}")
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("lr must be > 0; momentum, weight-decay and warmup-steps >= 0")
        self.eps_value, self.step_size_value, self.milestone_epochs  # noqa: B018 (parse to validate)
        _check_data_and_arch(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}; see `robust train --help`")
        return cls(**values)


def _check_data_and_arch(c: TrainConfig) -> None:
    """The architecture name (ours, torchvision:NAME, timm:NAME) and the custom-data fields."""
    if ":" in str(c.arch):
        from .external import ModelError, check_arch

        try:
            check_arch(c.arch)
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
        if c.width is not None:
            raise ConfigError(f"--width applies to our own architectures, not to {c.arch}; drop --width")
    elif c.arch not in available_archs():
        raise ConfigError(f"unknown arch {c.arch!r}; valid: {', '.join(available_archs())}, torchvision:NAME, timm:NAME")
    if c.dataset in ("imagefolder", "tensors") and not c.data_dir:
        what = "DIR with train/<class>/ images" if c.dataset == "imagefolder" else "FILE.npz (or .pt) with arrays x and y"
        raise ConfigError(f"--dataset {c.dataset} needs --data-dir {what}")
    if c.image_size is not None and c.image_size < 1:
        raise ConfigError(f"image-size must be >= 1, got {c.image_size}")
    if c.workers is not None and c.workers < 0:
        raise ConfigError(f"workers must be >= 0 (0 reads in the training process), got {c.workers}")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Config fields from a TOML file (keys may use '-' or '_')."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}
