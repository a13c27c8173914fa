"""Building a training run from its plan and in-memory data: no file is read or written here.

:func:`build_training` returns the data loader, the validation split, the model (weights from a
checkpoint when resuming), the optimizer and the gradient scaler: everything
:class:`robust.train.trainer.Trainer` trains and ``robust bench`` times. The step's own settings come
from the plan directly (:meth:`robust.train.step.StepSettings.from_plan`), where the step is run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from robust.plan import TrainPlan
from robust.data.extra import ExtraData
from robust.data.loader import BatchLoader, augmentation_for, split_train_val
from robust.data.mixed import MixedBatchLoader
from robust.data.types import ImageData
from robust.errors import CheckpointError, DataError
from robust.nn.factory import build_model
from robust.nn.syncbn import convert_sync_batchnorm
from robust.outputs import RunFiles
from robust.precision import PrecisionChoice, choose_precision, model_signature, probe_inputs, training_step_probe


@dataclass
class TrainingParts:
    """What a run trains with. ``attack_model`` is ``model`` (or its torch.compile wrapper): attacks run on it."""

    loader: BatchLoader
    val: tuple[torch.Tensor, torch.Tensor] | None
    model: nn.Module
    attack_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    sync_bn: bool


def build_training(plan: TrainPlan, data: ImageData, device: torch.device, amp: torch.dtype | None,
                   state: dict[str, Any] | None = None, sync_bn: bool | None = None,
                   source: Path | None = None, extra: ExtraData | None = None) -> TrainingParts:
    """The run's parts on ``device``. ``state`` is a last.pt to take the weights from (``source`` names it in errors);
    ``extra`` the --extra-data pool (already read), mixed into every batch."""
    c, d = plan, data
    (train_x, train_y), val = split_train_val(d, c.data.val_split, c.seed, c.data.limit, c.data.val_limit)
    # Every rank iterates the same global batches; the trainer takes this rank's rows.
    # In-memory images move to the device once; streamed ones are read batch by batch.
    train_x = train_x.to(device) if isinstance(train_x, torch.Tensor) else train_x
    loader = make_loader(c, d, train_x, train_y.to(device), device, extra)
    torch.manual_seed(c.seed)
    model = new_model(c, d, tuple(train_x.shape[-2:])).to(device)
    if state is not None:
        load_weights(model, state, c, source or Path(RunFiles.LAST))
    saved_sync = bool((state or {}).get("distributed", {}).get("sync_bn", False))
    sync = bool(sync_bn) if sync_bn is not None else saved_sync or bool(c.sync_bn)
    if sync:
        convert_sync_batchnorm(model)
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(c, parameter_groups(model, c.weight_decay, c.decay_norms), device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    attack_model = torch.compile(model) if c.compile else model
    return TrainingParts(loader, val, model, attack_model, optimizer, scaler, sync)


def new_model(c: TrainPlan, d: ImageData, image_size: tuple[int, ...]) -> nn.Module:
    """A freshly initialised model of the run's architecture for ``d``'s images (drawn from the global RNG)."""
    return build_model(c.arch, c.norm, d.num_classes, d.channels, c.width, d.mean, d.std, activation=c.activation,
                       image_size=image_size, patch_size=c.patch_size)


PROBE_BATCH = 128  # the largest batch the precision probe times: enough to show the kernels' speed, seconds at most


def training_precision(c: TrainPlan, d: ImageData, device: torch.device, ranks: int = 1) -> PrecisionChoice:
    """``--precision`` resolved; ``auto`` on a CPU times a copy of the run's model (see robust.precision).

    Several ranks must agree on one precision without timing each other's contention, so they keep the
    flag rule. The probe model and its inputs come from RNGs of their own: the run draws what it would have."""
    if c.precision != "auto" or device.type != "cpu" or ranks > 1:
        return choose_precision(c.precision, device, "", None)
    shape = (min(c.batch_size, PROBE_BATCH), *tuple(d.train_x.shape[1:]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        model = new_model(c, d, shape[-2:]).to(device).train()
    x, y = probe_inputs(shape, d.num_classes, device)
    if c.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return choose_precision("auto", device, model_signature(model, shape, "train"), training_step_probe(model, x, y))


def make_loader(c: TrainPlan, d: ImageData, train_x, train_y: torch.Tensor, device: torch.device,
                extra: ExtraData | None) -> BatchLoader:
    """The training batches: the labelled set alone, or mixed with ``extra`` at --extra-fraction."""
    common = dict(augment=True, flip=d.flip, seed=c.seed, channels_last=c.channels_last, device=device,
                  **augmentation_for(*train_x.shape[-2:]))
    if extra is None:
        return BatchLoader(train_x, train_y, c.batch_size, workers=getattr(train_x, "workers", 0), **common)
    if not isinstance(train_x, torch.Tensor):
        raise DataError("--extra-data needs the labelled set in memory; pass --data-mode memory")
    return MixedBatchLoader(train_x, train_y, extra, c.batch_size, extra_fraction=c.data.extra_fraction,
                            num_classes=d.num_classes, epoch_size=c.data.epoch_size, **common)


def make_optimizer(c: TrainPlan, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW (beta1 = --momentum, beta2 0.999), fused on a GPU."""
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}  # one kernel for the update on a GPU
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=c.lr, betas=(c.momentum, 0.999), **fused)
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, **fused)


def parameter_groups(model: nn.Module, weight_decay: float, decay_norms: bool) -> list[dict[str, Any]]:
    """The optimizer's groups: every parameter with ``weight_decay``, or, without ``decay_norms``, only the
    conv and linear weights (more than one dimension) with it and norm affines and biases without, nor the
    parameters a timm model names in its ``no_weight_decay()`` (a ViT's position embedding and class token)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_norms:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    exempt = _no_weight_decay_names(model)
    decayed = [p for n, p in named if p.dim() > 1 and n not in exempt]
    return [{"params": decayed, "weight_decay": weight_decay},
            {"params": [p for n, p in named if p.dim() <= 1 or n in exempt], "weight_decay": 0.0}]


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that a submodule exempts from weight decay through timm's ``no_weight_decay()``."""
    names = set()
    for prefix, module in model.named_modules():
        exempt = getattr(module, "no_weight_decay", None)
        if callable(exempt):
            names |= {f"{prefix}.{n}" if prefix else n for n in exempt()}
    return names


def load_weights(model: nn.Module, state: dict[str, Any], plan: TrainPlan, path: Path) -> None:
    """Load a checkpoint's weights, refusing one of another model (arch, norm, width)."""
    c = plan
    saved = state.get("model_args", {})
    asked = {"arch": c.arch, "norm": c.norm, "activation": c.activation}
    saved = {**saved, "activation": saved.get("activation", "relu")}  # checkpoints without the key are ReLU models
    differ = [f"{k} {saved.get(k)!r} (asked: {v!r})" for k, v in asked.items() if saved.get(k) != v]
    if c.width is not None and saved.get("width") not in (None, c.width):
        differ.append(f"width {saved.get('width')} (asked: {c.width})")
    if differ:
        raise CheckpointError(f"{path} holds another model: {', '.join(differ)}; drop those flags to resume it, or start a new run with --out NEW")
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} does not fit the configured model ({first}); resume with the run's own settings or start a new run") from None
