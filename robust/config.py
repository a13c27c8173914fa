"""Training configuration: one dataclass, its typed checks, TOML loading.

Every field of :class:`TrainConfig` is a flag of ``robust train`` (``--field-name``); its
``help`` metadata is the flag's help text, so the CLI and the library cannot drift apart.
Defaults reproduce the SaBN reference recipe on CIFAR-10. A run reads its settings from the
:class:`robust.plan.TrainPlan` a config resolves into once; the ``resolved_*`` properties here
compute the same values for a config being edited.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robust.checks import MAX_SEED, check_fields, split_list
from robust.data import CUSTOM_DATASETS, DATA_MODES, DATASET_SPECS, DATASETS, datasets_help
from robust.data.corruptions import check_corruption_names
from robust.errors import ConfigError, ModelError
from robust.nn import NORMS, archs_help, norms_help
from robust.nn.external import check_arch
from robust.nn.factory import parameter_count
from robust.nn.resnet import ACTIVATIONS, MAX_WIDTH, arch_size_problem, arch_spec, unknown_arch
from robust.objectives import (
    ATTACK_BN_MODES,
    Objective,
    alias_settings,
    all_options,
    get_objective,
    method_names,
    methods_help,
    parse_method_options,
)
from robust.recipes import RECIPES, recipe_names, recipe_values, recipes_help
from robust.runtime import DEVICES, PRECISIONS, THREADS_RANGE
from robust.threat import parse_eps, parse_fraction

# Sizes that allocate memory in proportion, bounded before anything is built or written (each refusal says why):
# a batch and its adversarial copy are held at once; an epoch's shuffles and augmentation draws (~40 bytes per
# example) are made when it starts; a model's parameters are counted on the meta device against the memory.
MAX_BATCH_SIZE = 65_536
MAX_EPOCH_SIZE = 10_000_000
BYTES_PER_PARAMETER = 16  # fp32 weights, their gradients, the optimizer's buffer and a checkpoint's copy

SCHEDULES = ("multistep", "cosine", "onecycle")
SELECT_BY = ("robust", "clean", "corruption")  # best.pt's figure: val_adv_robust, val_adv_clean or val_adv_corruption
OPTIMIZERS = ("sgd", "adamw")


def _f(default: Any, help: str, **extra: Any):
    """A field with its help text and checks: ``choices``, ``min``/``max`` (inclusive), ``above``/``below``
    (exclusive; ``max`` may be a callable), ``kind`` ("path": a path string, "fraction": text like 8/255 or a number)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as config.json with every run."""

    recipe: str | None = _f(None, f"a published recipe's settings, which every other flag overrides: {recipes_help()}; "
                                  "sources and differences in docs/methods.md [default: none, the SaBN reference's "
                                  "defaults]", choices=recipe_names)
    # data
    dataset: str = _f("cifar10", f"dataset: {datasets_help()} (your own data is read from --data-dir)",
                      choices=DATASETS)
    data_dir: str | None = _f(None, "folder with the dataset files (looked up before system folders and download); "
                                    "imagefolder: DIR with train/<class>/ (and test/ or val/); tensors: FILE.npz or .pt", kind="path")
    image_size: int | None = _f(None, "imagefolder: resize images to N x N (shorter side to N, centre crop); needed when the files differ in size", min=1)
    data_mode: str = _f("auto", "imagefolder/tensors: memory (read once), stream (read from disk each epoch by DataLoader workers) or auto (memory when it fits)", choices=DATA_MODES)
    workers: int | None = _f(None, "imagefolder/tensors: processes reading images (0: the training process; default: CPUs, at most 8)", min=0)
    val_split: float = _f(0.1, "fraction of the training set held out for validation (0 disables it)", min=0, below=1)
    limit: int | None = _f(None, "train on the first N examples only (quick runs)", min=1)
    extra_data: str | None = _f(None, "extra training images mixed into every batch: an .npz or .pt file with x (uint8 "
                                      "images of the dataset's shape) and y (integer labels, or per-class probabilities "
                                      "(N, classes)); robust pseudo-label writes one. Memory-mapped unless it fits "
                                      "(--data-mode)", kind="path")
    extra_fraction: float | None = _f(None, "with --extra-data: the share of every batch drawn from it (Carmon et al. "
                                            "2019 use 0.5, Gowal et al. 2021 and Wang et al. 2023 0.7) [default: 0.5]",
                                      min=0, max=1)
    epoch_size: int | None = _f(None, "with --extra-data: examples per epoch, whatever the sizes of the two pools "
                                      "[default: one pass over the labelled set]", min=1)
    # model
    arch: str = _f("preact_resnet18", f"architecture: {archs_help()} (e.g. torchvision:resnet18)")
    norm: str = _f("sabn", f"norm kind: {norms_help()}; a LayerNorm/GroupNorm has no running statistics, so there its "
                           "routes differ in their affines only (bn keeps the model's own layer)", choices=NORMS)
    width: int | None = _f(None, "channels of the first stage (default: the architecture's; 16 is CPU-sized)", min=1,
                           max=MAX_WIDTH, max_note="the most channels we build in a first stage")
    patch_size: int | None = _f(None, "timm ViTs: the patch side (default: the model's own; it must divide the image side, "
                                      "e.g. 4 for 28- or 32-pixel images)", min=1)
    activation: str = _f("relu", "our architectures' activation: relu (the SaBN reference) or silu (the modern recipes' "
                                 "wide ResNets)", choices=tuple(ACTIVATIONS))
    # optimization
    epochs: int = _f(200, "training epochs (with --train-steps or --time-budget: the epochs those steps need)", min=1)
    time_budget: str | None = _f(None, "the whole run's time (data loading, training, validation), e.g. 90s, 10m, 2h, "
                                       "1h30m: the run times its first steps and trains the most steps that fit, "
                                       "recorded as --train-steps (docs/training.md#time-budget)", kind="duration")
    train_steps: int | None = _f(None, "optimizer steps of the whole run, the schedule spread over them (the last epoch "
                                       "stops part-way); --time-budget records the steps it bought here", min=1)
    batch_size: int = _f(128, "training batch size", min=1)
    optimizer: str = _f("sgd", "sgd (the reference's) or adamw (the transformer recipes': Singh et al. 2023, Liu et al. 2023, "
                               "with --weight-decay 0.05 and a smaller --lr)", choices=OPTIMIZERS)
    lr: float = _f(0.1, "peak learning rate", above=0)
    momentum: float = _f(0.9, "SGD momentum; AdamW's beta1", min=0, below=1)
    weight_decay: float = _f(5e-4, "weight decay (decoupled for adamw)", min=0)
    nesterov: bool = _f(False, "SGD with Nesterov momentum (the modern recipes' choice)")
    decay_norms: bool = _f(True, "weight decay on norm affines and biases too (--no-decay-norms: only on conv and linear "
                                 "weights, as DM-Improves-AT)")
    schedule: str = _f("multistep", "learning-rate schedule", choices=SCHEDULES)
    milestones: str = _f("0.25,0.75", "multistep: fractions of the epochs after which lr is multiplied by 0.1 (0.25,0.75: "
                                      "epochs 50 and 150 of 200, as the SaBN reference), or whole epochs (50,150), each "
                                      "before the last epoch")
    warmup_steps: int = _f(200, "steps of linear warm-up from lr/10 in the first epoch (0 disables)", min=0)
    warmup_epochs: float = _f(0.0, "linear warm-up from 0 over this many epochs, then the schedule over the rest "
                                   "(cosine: the modern recipes' 10 epochs; needs --warmup-steps 0)", min=0)
    # adversarial training
    method: str | None = _f(None, f"training method: {methods_help()}; see docs/methods.md [default: pgd]", choices=method_names)
    clean_weight: float | None = _f(None, "w in w*CE(clean route, x) + (1-w)*objective(adv route) [default: 0.5 for auxbn/sabn and hybrid, 0 for bn]", min=0, max=1)
    method_options: str | None = _f(None, "the method's own options as NAME=VALUE[,NAME=VALUE] (trades, mart: beta=6); "
                                          "each method declares its options, defaults and ranges")
    awp_gamma: float = _f(0.0, "adversarial weight perturbation (AWP): per-layer size gamma*||w|| (0 = off; the AWP paper uses 0.005-0.01)", min=0, below=1)
    awp_warmup: int = _f(0, "AWP: epochs before the weight perturbation starts", min=0)
    co_guard: bool | None = _f(None, "catastrophic-overfitting guard: stop when PGD accuracy on a training batch collapses [default: on for fast, nfgsm]")
    eps: str = _f("8/255", "Linf radius in pixel units, e.g. 8/255 or 0.031", kind="fraction")
    step_size: str | None = _f(None, "PGD step size (default eps/4, i.e. 2/255 for eps 8/255)", kind="fraction")
    steps: int = _f(7, "PGD steps for training examples", min=1)
    attack_bn: str | None = _f(None, "BN mode while training attacks run: train (batch statistics, updating the adv route's running "
                                     "ones), eval (running statistics) or frozen (batch statistics, running ones untouched, as "
                                     "DeepMind's and DM-Improves-AT's code) [default: train for pgd/fast/nfgsm as the SaBN "
                                     "reference, eval for trades/mart as their official code]", choices=ATTACK_BN_MODES)
    ema: float = _f(0.0, "weight averaging: the decay tau of a moving average of the weights, with a warm-up (0 = off; the "
                         "modern recipes use 0.995); validation, best.pt and the run's figures use the averaged weights",
                    min=0, below=1)
    label_smoothing: float = _f(0.0, "label smoothing of every cross-entropy on labels in the loss (the clean route's too; "
                                     "not TRADES's or MART's KL, not the attack's own loss); 0.1 in the modern recipes",
                                min=0, below=1)
    val_steps: int = _f(10, "PGD steps of the per-epoch validation attack", min=1)
    val_limit: int | None = _f(None, "score at most N validation examples per epoch", min=1)
    val_corruptions: str | None = _f(None, "also score each epoch's validation images under these generated common "
                                           "corruptions (comma-separated names, or all; made once per run) at "
                                           "--val-severity: the mean accuracy per route joins the epoch's line and "
                                           "metrics.jsonl as val_<route>_corruption")
    val_severity: int = _f(3, "the severity (1-5) of --val-corruptions", min=1, max=5)
    select_by: str | None = _f(None, "the adv-route validation figure best.pt has the best of: robust (PGD-val-steps "
                                     "accuracy), clean (natural accuracy) or corruption (accuracy under --val-corruptions) "
                                     "[default: robust; clean for --method standard]", choices=SELECT_BY)
    keep_epochs: str | None = _f(None, "also keep the checkpoint after these epochs as epoch<N>.pt (comma-separated, e.g. 190; "
                                       "robust compare --select epoch:N sets it)")
    # engine
    device: str = _f("auto", "auto picks CUDA when present", choices=DEVICES)
    precision: str = _f("auto", "autocast precision: auto = bf16 (fp16 without bf16) on CUDA; on a CPU bf16 where it ran the model's step at least 1.2x faster than fp32 (timed once, cached per machine and model), else fp32", choices=PRECISIONS)
    channels_last: bool = _f(True, "channels_last memory format")
    compile: bool = _f(False, "torch.compile the model")
    deterministic: bool = _f(False, "CUDA: deterministic cuDNN kernels, so --resume ends bit-identical to an uninterrupted run "
                                    "(without it cudnn.benchmark picks the fastest kernels and a resume matches up to float "
                                    "rounding); CPU runs are deterministic either way")
    fused: bool = _f(True, "with clean-weight > 0: one forward over the concatenated clean+adv-route batch (split routes)")
    sync_bn: bool = _f(False, "distributed: route-aware SyncBatchNorm, each route's statistics over all processes")
    save_every: float = _f(600.0, "also write last.pt inside an epoch at most every this many seconds (0: epoch ends only)", min=0)
    seed: int = _f(0, "random seed (data split, order, augmentation, attack starts)", min=0, max=MAX_SEED)
    threads: int | None = _f(None, "CPU threads for torch (default: torch's choice)", **THREADS_RANGE)
    # output
    out: str | None = _f(None, "run folder (default runs/<dataset>-<norm>-<method>-s<seed>)", kind="path")
    quiet: bool = _f(False, "no progress bars")
    tensorboard: str | None = _f(None, "also write every epoch's metrics (loss, lr, accuracies, seconds) as TensorBoard "
                                       "scalars into this folder, e.g. runs/x/tb: the run's own folder or a folder of no "
                                       "run, never inside another run's (needs the tensorboard package)", kind="path")

    # ---- derived values -------------------------------------------------------------------
    @property
    def resolved_method(self) -> str:
        """The method as asked (``hybrid`` kept, for the run name and the checkpoint); default ``pgd``."""
        return self.method or "pgd"

    @property
    def objective(self) -> type[Objective]:
        """The objective class that trains (``hybrid`` is :class:`~robust.objectives.pgd.PGD`)."""
        return get_objective(self.resolved_method)

    @property
    def resolved_clean_weight(self) -> float:
        if self.clean_weight is not None:
            return float(self.clean_weight)
        implied = alias_settings(self.resolved_method).get("clean_weight")
        if implied is not None:
            return float(implied)
        return 0.5 if self.norm != "bn" else 0.0

    @property
    def objective_options(self) -> dict[str, Any]:
        """Every option of the method, as given in ``method_options`` or its declared default (checked)."""
        given = parse_method_options(self.method_options)
        try:
            for name, value in given.items():  # a value out of its range is named first, whichever method declares it
                if name in all_options():
                    all_options()[name][0].check(name, value)
            return self.objective.checked_options(given)
        except ConfigError as exc:
            raise ConfigError(f"method-options: {exc}") from None

    @property
    def resolved_attack_bn(self) -> str:
        if self.attack_bn is not None:
            return self.attack_bn
        return self.objective.attack_bn

    @property
    def resolved_select_by(self) -> str:
        return self.select_by or ("robust" if self.objective.adversarial else "clean")

    @property
    def resolved_co_guard(self) -> bool:
        return self.objective.one_step if self.co_guard is None else bool(self.co_guard)

    @property
    def resolved_extra_fraction(self) -> float:
        """The share of every batch drawn from --extra-data (0 without it)."""
        if not self.extra_data:
            return 0.0
        return DEFAULT_EXTRA_FRACTION if self.extra_fraction is None else float(self.extra_fraction)

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
        """The multistep milestones in epochs: integers are epochs (50,150); values with a '.' are
        fractions of the run's epochs (0.25,0.75 -> 50,150 of 200, rounded half up, at least epoch 1),
        each in (0, 1), ascending."""
        parts = split_list("milestones", self.milestones)
        if any("." in m for m in parts):
            try:
                fractions = [float(m) for m in parts]
            except ValueError:
                raise ConfigError(f"milestones {self.milestones!r} must be comma-separated fractions of the epochs, "
                                  "e.g. 0.25,0.75") from None
            for f in fractions:
                if not 0 < f < 1:
                    raise ConfigError(f"milestones {self.milestones!r}: a fraction of the epochs must be > 0 and < 1, "
                                      f"got {f:g}; write epochs as integers (50,150) or fractions (0.25,0.75), not both")
            if fractions != sorted(set(fractions)):
                raise ConfigError(f"milestones {self.milestones!r} must be ascending and distinct, e.g. 0.25,0.75")
            return [max(1, math.floor(f * self.epochs + 0.5)) for f in fractions]
        try:
            return [int(m) for m in parts]
        except ValueError:
            raise ConfigError(f"milestones {self.milestones!r} must be comma-separated epochs, e.g. 50,150, "
                              "or fractions of the epochs, e.g. 0.25,0.75") from None

    @property
    def kept_epochs(self) -> list[int]:
        """--keep-epochs as sorted epoch numbers, each in [1, epochs]."""
        if self.keep_epochs is None:
            return []
        parts = split_list("keep-epochs", self.keep_epochs)
        if any(not p.isdigit() for p in parts):
            raise ConfigError(f"keep-epochs {self.keep_epochs!r} must be comma-separated epoch numbers, e.g. 5 or 50,190")
        epochs = sorted({int(p) for p in parts})
        if epochs[0] < 1 or epochs[-1] > self.epochs:
            raise ConfigError(f"keep-epochs {self.keep_epochs!r}: every epoch must be in [1, {self.epochs}] (the run's epochs)")
        return epochs

    @property
    def run_dir(self) -> Path:
        """``out``, or ``runs/<dataset>-<norm>-<method>-s<seed>`` (runs differing only in seed never share a folder)."""
        return Path(self.out or f"runs/{self.dataset}-{self.norm}-{self.resolved_method}-s{self.seed}")

    def validate(self, resuming: bool = False) -> "TrainConfig":
        """Raise ConfigError naming the first invalid field; return self when all are valid.

        Every field is checked against its annotation and metadata (:func:`check_fields`), so a
        value is typed and in range whether it came from a flag, a TOML file or Python. ``resuming``:
        the config of a run being continued, whose milestones stand as it was trained (a run saved
        with milestones past its last epoch resumes as it was).
        """
        self.derive(resuming)
        return self

    def derive(self, resuming: bool = False) -> dict[str, Any]:
        """Check every field (as :meth:`validate`) and return the values derived from them, each computed once:
        ``eps``, ``step_size`` (numbers), ``options`` (the method's checked options), ``milestones`` and
        ``kept_epochs`` (epochs). :class:`robust.plan.TrainPlan` is built from them."""
        for name, value in check_fields(type(self), self.__dict__).items():
            setattr(self, name, value)
        derived = {"eps": self.eps_value, "step_size": self.step_size_value, "milestones": self.milestone_epochs,
                   "kept_epochs": self.kept_epochs, "options": self.objective_options}
        if not resuming:
            _check_milestones_inside(self, derived["milestones"])
        _check_data_and_arch(self)
        _check_sizes(self)
        _check_model_size(self)
        _check_extra_data(self)
        _check_val_corruptions(self)
        if self.warmup_epochs and self.warmup_steps:
            raise ConfigError("--warmup-epochs and --warmup-steps are two warm-ups; pass --warmup-steps 0 with --warmup-epochs")
        if self.warmup_epochs and self.schedule == "onecycle":
            raise ConfigError("--schedule onecycle has its own warm-up (40% of the steps); drop --warmup-epochs")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs:g} must be below --epochs {self.epochs}")
        if self.nesterov and self.optimizer != "sgd":
            raise ConfigError("--nesterov is SGD's momentum; drop it with --optimizer adamw")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("--nesterov needs a momentum above 0; pass --momentum 0.9 or drop --nesterov")
        return derived

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from field values; a method's option given by name (TOML ``beta = 5``) joins ``method_options``."""
        values = fold_method_options(values)
        check_fields(cls, values, partial=True)
        return cls(**apply_recipe(values))

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> "TrainConfig":
        """The config recipe ``name`` sets, with ``overrides`` (field values) on top; the same as
        ``TrainConfig(recipe=name, **overrides)``."""
        return cls.from_dict({**overrides, "recipe": name})

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config.json (or a checkpoint's config) of any version, with its original meaning."""
        return cls.from_dict(upgrade_saved(values))


def apply_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` over the field values of their ``recipe`` (if any): every given value wins. A method
    given in place of the recipe's drops the recipe's method options (another method's beta would be refused);
    an eps given without a step size scales the recipe's step with it (:func:`recipe_step_for`)."""
    name = values.get("recipe")
    if not name:
        return values
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    base = recipe_values(name, with_extra_data=bool(values.get("extra_data")))
    if values.get("method") not in (None, base.get("method")) and "method_options" not in values:
        base.pop("method_options", None)
    if values.get("eps") is not None and values.get("step_size") is None and "step_size" in base:
        base["step_size"] = recipe_step_for(base, values["eps"])
    if values.get("epochs") is not None and values.get("milestones") is None and "milestones" in base:
        base["milestones"] = recipe_milestones_for(base, values["epochs"])
    return {**base, **values}


def recipe_milestones_for(recipe: dict[str, Any], epochs: Any) -> str:
    """A recipe's milestones for a run of ``epochs``: its epochs as fractions of its own run (TRADES's 74 of 76
    is 0.97368...), so the lr drops at the same point of a shorter or longer run; its own text at its epochs."""
    text = recipe["milestones"]
    if "." in text or epochs == recipe["epochs"] or isinstance(epochs, bool) or not isinstance(epochs, int):
        return text
    return ",".join(repr(int(m) / recipe["epochs"]) for m in text.split(","))


def recipe_step_for(recipe: dict[str, Any], eps: Any) -> str:
    """The attack step of a recipe at another ``eps``: the recipe's step in proportion (0.007 of 0.031 at eps 0.1
    is 0.02258), so its steps reach the eps boundary as they do in the paper; the recipe's own text at its eps."""
    if isinstance(eps, bool) or not isinstance(eps, (str, int, float)):
        return recipe["step_size"]  # refused by the field check, with the field's words
    given, own = parse_eps(eps), parse_eps(recipe["eps"])
    if given == own:
        return recipe["step_size"]
    return repr(parse_fraction(recipe["step_size"], "step_size") / own * given)


def _applies_recipe(cls: type) -> type:
    """Wrap the dataclass's generated ``__init__`` so ``TrainConfig(recipe=NAME, ...)`` is the recipe's config
    with the fields given on top, as :meth:`TrainConfig.from_dict` makes it: a recipe is never only a label."""
    generated = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(generated)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names) or set(names[:len(args)]) & set(kwargs):
            generated(self, *args, **kwargs)  # the dataclass's own TypeError
        given = {**dict(zip(names, args)), **kwargs}
        generated(self, **(apply_recipe(given) if given.get("recipe") else given))

    cls.__init__ = __init__
    return cls


TrainConfig = _applies_recipe(TrainConfig)


def fold_method_options(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every declared method option given by name (``beta``) moved into ``method_options``
    (an option in both places is refused); values that are not options are left as they are."""
    named = {k: v for k, v in values.items() if k in all_options() and v is not None}
    if not named:
        return {k: v for k, v in values.items() if k not in all_options()}
    given = parse_method_options(values.get("method_options")) if isinstance(values.get("method_options"), str) else {}
    twice = sorted(set(named) & set(given))
    if twice:
        raise ConfigError(f"{', '.join(twice)} given both by name and in method-options; give it once")
    text = ",".join([*(f"{k}={v}" for k, v in given.items()), *(f"{k}={v!r}" for k, v in named.items())])
    return {**{k: v for k, v in values.items() if k not in all_options()}, "method_options": text}


def upgrade_saved(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config as this version reads it: the same training as when it was written.

    A ``beta`` field (written before each method declared its own options) becomes
    ``method_options`` for the methods that declare it and is dropped for the others.

    Before the objectives (no ``awp_gamma`` key), ``clean_weight`` was always written (0.5) but
    only the hybrid loss used it: ``pgd`` trained on the adversarial loss alone, and so did
    ``fast`` on bn; the default method was hybrid for auxbn/sabn and pgd for bn. Now every method
    takes clean-weight, so those runs get the weight they actually trained with.
    """
    if not isinstance(values, dict) or ("beta" not in values and "awp_gamma" in values):
        return values
    values = dict(values)
    if "beta" in values and "method_options" not in values:
        beta = values.pop("beta")
        declares = values.get("method") in ("trades", "mart")  # the methods that had beta when it was a field
        values["method_options"] = f"beta={float(beta)!r}" if beta is not None and declares else None
    if "awp_gamma" in values:
        return values
    method, dual = values.get("method"), values.get("norm", "sabn") != "bn"
    hybrid = method == "hybrid" or (method is None and dual) or (method == "fast" and dual)
    values["clean_weight"] = float(values.get("clean_weight", 0.5)) if hybrid else 0.0
    if method is None:
        values["method"] = "hybrid" if dual else "pgd"
    return values


# What a resume may change: how the run is executed, never what it trains. --epochs continues to the new count
# (cosine, one-cycle and fraction milestones are spread over it); --co-guard off trains on past a guard's stop;
# --keep-epochs keeps the epochs still to come. Device, threads, precision, compile, channels-last and
# deterministic kernels change the float rounding, not the run's meaning (precision auto already resolves per
# machine; every checkpoint records the precision it was saved under). Data mode and workers say how the same
# images are read; quiet and save-every, what is shown and how often last.pt is written.
RESUMABLE = ("epochs", "out", "co_guard", "keep_epochs", "device", "threads", "precision", "compile", "channels_last",
             "deterministic", "data_mode", "workers", "quiet", "save_every")


def load_saved_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json of a run to resume, as this version reads it (ConfigError when missing or unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} does not exist; start a new run without --resume")
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot resume: {path} is unreadable ({type(exc).__name__}); "
                          "start a new run with --force, or restore the file") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"cannot resume: {path} is not a config of robust train; start a new run with --force")
    return upgrade_saved(saved)  # an older run resumes with the loss it trained with


def resume_changes(before: TrainConfig, config: TrainConfig) -> list[str]:
    """The fields outside :data:`RESUMABLE` where ``config`` differs from the saved run's config ``before``,
    each as ``--flag SAVED (given: NEW)``; values are compared by meaning (8/255 is 0.0313..., beta=6 is beta=6.0)."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        old, new = getattr(before, f.name), getattr(config, f.name)
        if f.name == "train_steps" and new is None:
            continue  # the steps a --time-budget bought stand: the resume takes them from the run
        if f.name not in RESUMABLE and not _same_value(f, old, new):
            out.append(f"--{f.name.replace('_', '-')} {shown_setting(old)} (given: {shown_setting(new)})")
    return out


def replan_milestones(config: TrainConfig, saved_epochs: int, epoch: int, batch: int) -> TrainConfig:
    """``config`` resumed at (``epoch``, ``batch``) of a run planned for ``saved_epochs``: fractional milestones
    still to come move with the new --epochs, those the run has passed stay at the epochs they were (an lr
    already lowered stays lowered); then the milestones are written as those whole epochs."""
    if config.schedule != "multistep" or "." not in str(config.milestones) or config.epochs == saved_epochs:
        return config
    planned = dataclasses.replace(config, epochs=saved_epochs).milestone_epochs
    position = epoch + (0.5 if batch else 0.0)
    passed = [m < position for m in planned]
    if not any(m != n for m, n, done in zip(planned, config.milestone_epochs, passed) if done):
        return config  # nothing passed moves: the fractions stand
    merged = sorted(m if done else n for m, n, done in zip(planned, config.milestone_epochs, passed))
    return dataclasses.replace(config, milestones=",".join(map(str, merged)))


def check_resume(saved: dict[str, Any], config: TrainConfig, run_dir: str | os.PathLike[str]) -> TrainConfig:
    """``config`` with the saved run's own values (and spelling: 8/255 stays 8/255) in every field outside
    :data:`RESUMABLE`; ConfigError naming every such field ``config`` changes, with its saved and given value:
    a resumed run goes on with the settings it was trained with."""
    before = TrainConfig.from_saved(saved)
    changed = resume_changes(before, config)
    if changed:
        allowed = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE if name != "out")
        raise ConfigError(f"cannot resume {run_dir} with other settings: it was trained with {'; '.join(changed)}; "
                          f"resume without those flags (a resume may change only {allowed}), or start a new run "
                          "with --out NEW")
    return dataclasses.replace(config, **{f.name: getattr(before, f.name) for f in dataclasses.fields(TrainConfig)
                                          if f.name not in RESUMABLE})


def _same_value(f: dataclasses.Field, old: Any, new: Any) -> bool:
    if old is None or new is None or old == new:
        return old == new
    try:
        if f.metadata.get("kind") == "fraction":
            return parse_fraction(old, f.name) == parse_fraction(new, f.name)
        if f.metadata.get("kind") == "path":
            return Path(old).resolve() == Path(new).resolve()
        if f.name == "method_options":
            return parse_method_options(old) == parse_method_options(new)
        if f.name == "milestones":
            return [float(m) for m in split_list(f.name, old)] == [float(m) for m in split_list(f.name, new)]
    except (ConfigError, ValueError):
        return False
    return False


def shown_setting(value: Any) -> str:
    """A saved or given setting as a refusal quotes it: None as the default, booleans as the flags write them."""
    if value is None:
        return "unset (the default)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _check_milestones_inside(c: TrainConfig, milestones: list[int]) -> None:
    """A multistep milestone after the last epoch would never lower the lr: refused, not silently flat."""
    if c.schedule != "multistep":
        return
    late = [m for m in milestones if m >= c.epochs]
    fractions = "." in str(c.milestones)
    if late and not fractions:
        raise ConfigError(f"milestones {c.milestones!r}: epoch {late[0]} is not before the run's end (--epochs "
                          f"{c.epochs}), so the lr would never drop there; give epochs below {c.epochs}, or "
                          "fractions of the run (0.25,0.75)")


def _check_sizes(c: TrainConfig) -> None:
    """Sizes that allocate in proportion, refused before anything is built or written (image size and workers
    are bounded where the data is read, also before anything is written)."""
    if c.batch_size > MAX_BATCH_SIZE:
        raise ConfigError(f"batch-size {c.batch_size} is above {MAX_BATCH_SIZE:,} (64x the largest recipe's 1,024; a "
                          "batch and its adversarial copy are held at once); pass a smaller --batch-size")
    if c.epoch_size is not None and c.epoch_size > MAX_EPOCH_SIZE:
        raise ConfigError(f"epoch-size {c.epoch_size} is above {MAX_EPOCH_SIZE:,}: an epoch's shuffles and augmentation "
                          "draws are made when it starts (about 40 bytes per example); pass a smaller --epoch-size "
                          "and more --epochs")


def _memory_bytes(device: str) -> int:
    """The memory a model trains in: the first GPU's when it trains on one, else this machine's RAM (also where the
    GPU cannot be asked yet, e.g. its driver is not loaded: the run's own start then reports the GPU)."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if device == "cpu" or not torch.cuda.is_available():
        return ram
    try:
        return int(torch.cuda.get_device_properties(0).total_memory)
    except (RuntimeError, AssertionError):  # torch's words for "no driver" / "not compiled with CUDA"
        return ram


def _check_model_size(c: TrainConfig) -> None:
    """Our architectures' sizes, refused before anything is built or written: a width or depth beyond what we
    build, or a model whose weights, gradients and optimizer state alone exceed the memory it would train in."""
    if ":" in str(c.arch):
        return  # torchvision/timm models come in their published sizes
    problem = arch_size_problem(c.arch, c.width)
    if problem:
        raise ConfigError(problem)
    params = parameter_count(c.arch, c.norm, 10, 3, c.width, c.activation)
    need, have = params * BYTES_PER_PARAMETER, _memory_bytes(c.device)
    if need > have:
        raise ConfigError(f"{c.arch} (width {c.width or 'default'}) has {params / 1e9:.3g} billion parameters: at "
                          f"least {need / 2**30:.3g} GiB for its weights, gradients and optimizer state, more than "
                          f"the {have / 2**30:.3g} GiB it would train in; choose a smaller --width or architecture")


DEFAULT_EXTRA_FRACTION = 0.5


def _check_extra_data(c: TrainConfig) -> None:
    """--extra-fraction and --epoch-size belong to --extra-data."""
    for name in ("extra_fraction", "epoch_size"):
        if getattr(c, name) is not None and not c.extra_data:
            raise ConfigError(f"--{name.replace('_', '-')} applies to --extra-data FILE; pass the extra data or drop it")


def _check_val_corruptions(c: TrainConfig) -> None:
    """--val-corruptions names known corruptions and needs validation images; --select-by corruption needs it."""
    if c.val_corruptions is not None:
        try:
            check_corruption_names(c.val_corruptions)
        except ConfigError as exc:
            raise ConfigError(f"val-corruptions: {exc}".replace("--corruptions", "--val-corruptions")) from None
        if not c.val_split:
            raise ConfigError("--val-corruptions scores the validation images, and --val-split 0 holds none out; "
                              "pass --val-split 0.1 or drop --val-corruptions")
    if c.select_by == "corruption" and c.val_corruptions is None:
        raise ConfigError("--select-by corruption picks best.pt on the validation accuracy under --val-corruptions; "
                          "pass --val-corruptions NAME,... (or all), or --select-by robust")


def _check_data_and_arch(c: TrainConfig) -> None:
    """The architecture name (ours, torchvision:NAME, timm:NAME) and the custom-data fields."""
    if ":" in str(c.arch):

        try:
            check_arch(c.arch)
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
        if c.width is not None:
            raise ConfigError(f"--width applies to our own architectures, not to {c.arch}; drop --width")
        if c.activation != "relu":
            raise ConfigError(f"--activation applies to our own architectures, not to {c.arch}; drop --activation")
    elif arch_spec(c.arch) is None:
        raise ConfigError(unknown_arch(c.arch))
    elif c.patch_size is not None:
        raise ConfigError(f"--patch-size applies to timm ViTs (timm:NAME), not to {c.arch}; drop --patch-size")
    if c.dataset in CUSTOM_DATASETS and not c.data_dir:
        raise ConfigError(f"--dataset {c.dataset} needs --data-dir {DATASET_SPECS.get(c.dataset).expected_files}")
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
        raise ConfigError(f"config file {path} does not exist; pass the path of a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc.strerror or exc}); pass a readable TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}; fix that line") from None
    return {k.replace("-", "_"): v for k, v in data.items()}
