"""``build_model``: the one factory for every architecture (ours by name, ``torchvision:NAME``, ``timm:NAME``)
with the chosen norm kind, and ``unwrap`` (the model inside DDP / torch.compile wrappers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
import torch.nn as nn

from robust.errors import ModelError
from robust.nn.external import build_external
from robust.nn.norms import make_norm_layer
from robust.nn.resnet import REFERENCE_MEAN, REFERENCE_STD, arch_spec, unknown_arch


def unwrap(model: nn.Module, keep_compiled: bool = False) -> nn.Module:
    """The plain model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers; with
    ``keep_compiled`` only DDP's wrapper goes (the training attack runs through the compiled model)."""
    while True:
        if hasattr(model, "_orig_mod") and not keep_compiled:
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@functools.lru_cache(maxsize=64)
def parameter_count(arch: str, norm: str, num_classes: int, in_channels: int, width: int | None,
                    activation: str = "relu") -> int:
    """The parameters one of our architectures has, counted on the meta device (no memory is allocated), so a
    size can be refused before the model is built. Call it with sizes :func:`robust.nn.resnet.arch_size_problem`
    accepts."""
    with torch.device("meta"):
        model = build_model(arch, norm, num_classes, in_channels, width, activation=activation)
    return sum(p.numel() for p in model.parameters())


def default_mean_std(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The reference's ImageNet statistics for RGB inputs, (0.5, 0.5) otherwise."""
    if in_channels == 3:
        return REFERENCE_MEAN, REFERENCE_STD
    return (0.5,) * in_channels, (0.5,) * in_channels


def _side(image_size: int | Sequence[int] | None) -> int | tuple[int, int] | None:
    """An image size as one side (square images) or (H, W); checkpoints hold it as JSON (a list)."""
    if image_size is None or isinstance(image_size, int):
        return image_size
    h, w = (int(v) for v in image_size)
    return h if h == w else (h, w)


@dataclass(frozen=True)
class ModelOptions:
    """The keyword options of :func:`build_model` beyond the architecture, its norm, its sizes and its input
    normalization: settings that apply to some architectures only."""

    final_norm: bool | None = None  # ours: a norm + activation before the pooling (None: the architecture's choice)
    activation: str = "relu"  # ours: the activation function
    image_size: int | Sequence[int] | None = None  # external: the input a constructor fixes (a ViT), a side or (H, W)
    patch_size: int | None = None  # a timm ViT's patch side

    @classmethod
    def of(cls, options: dict[str, Any]) -> "ModelOptions":
        """The options ``options`` names; TypeError, as for any unknown keyword, on one build_model does not take."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise TypeError(f"build_model() got an unexpected keyword argument {unknown[0]!r}; "
                            f"its options beyond arch, norm, num_classes, in_channels, width, mean, std: {', '.join(names)}")
        return cls(**options)


def build_model(
    arch: str = "preact_resnet18",
    norm: str = "sabn",
    num_classes: int = 10,
    in_channels: int = 3,
    width: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **options: Any,
) -> nn.Module:
    """Build a model by name. The arguments are kept as ``model.build_args`` for checkpoints.

    ``options`` are the keywords of :class:`ModelOptions`: ``final_norm``, ``activation``, ``image_size``,
    ``patch_size`` (any other keyword is a TypeError).
    ``final_norm`` adds a norm + ReLU before the pooling; None takes the architecture's own choice
    (PreAct ResNets: none, as the SaBN reference; WRN-34-10: one, as TRADES's WideResNet).
    ``arch`` is one of :func:`available_archs` or ``torchvision:NAME`` / ``timm:NAME`` (see
    :mod:`robust.nn.external`; ``width``, ``final_norm`` and ``activation`` do not apply to those).
    ``image_size`` (a side or (H, W)) is the input an external model whose constructor fixes one (a ViT) is
    built for, and ``patch_size`` a timm ViT's patch side; our architectures take any input size.
    """
    chosen = ModelOptions.of(options)
    final_norm, activation, image_size, patch_size = (chosen.final_norm, chosen.activation, chosen.image_size,
                                                      chosen.patch_size)
    external = ":" in str(arch)
    ours = None if external else arch_spec(arch)
    if not external and ours is None:
        raise ModelError(unknown_arch(arch))
    norm_layer = make_norm_layer(norm)
    if external and width is not None:
        raise ValueError(f"width applies to our own architectures, not to {arch}; drop --width")
    if external and activation != "relu":
        raise ValueError(f"activation applies to our own architectures, not to {arch}; drop --activation")
    if not external and patch_size is not None:
        raise ValueError(f"patch size applies to ViT-style timm models, not to {arch}; drop --patch-size")
    width = None if external else ours.width if width is None else int(width)
    if (width is not None and width < 1) or num_classes < 2 or in_channels < 1:
        raise ValueError(f"need width >= 1, num_classes >= 2, in_channels >= 1 (got {width}, {num_classes}, {in_channels})")
    default_mean, default_std = default_mean_std(in_channels)
    mean = tuple(float(m) for m in (mean if mean is not None else default_mean))
    std = tuple(float(s) for s in (std if std is not None else default_std))
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values each, got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {list(std)}")
    if external:

        model = build_external(arch, norm, num_classes, in_channels, mean, std, _side(image_size), patch_size)
    else:
        options = ({} if final_norm is None else {"final_norm": bool(final_norm)}) | {"activation": activation}
        model = ours.build(width, norm_layer, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
                        **options)
    model.build_args = dict(
        arch=arch, norm=norm, num_classes=num_classes, in_channels=in_channels,
        width=width, mean=list(mean), std=list(std),
    )
    if external:  # the input size and patch a ViT was built for, so a checkpoint rebuilds the same model
        model.build_args.update(model.input_args)
    else:
        model.build_args["final_norm"] = model.final_norm is not None
        if activation != "relu":  # checkpoints without the key are ReLU models
            model.build_args["activation"] = activation
    return model
