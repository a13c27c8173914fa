"""PreAct ResNets and wide ResNets (WRN-D-K) with pluggable (dual-route) norms.

Every model takes inputs in [0, 1] and normalizes them inside (``InputNormalization``), so eps
is in pixel units and any attack library works on it unchanged. Blocks receive ``norm_layer``,
a callable ``f(num_features)`` from :func:`robust.nn.norms.make_norm_layer`.

Each named architecture is a constructor ``f(width, norm_layer, **kwargs)`` registered in :data:`ARCH_SPECS`
(an :class:`ArchSpec`: the constructor, its default width, the summary --help shows); any other WRN-D-K is
built by :func:`arch_spec` from its name.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from robust.attacks.named import Registry, Spec
from robust.errors import ModelError, did_you_mean

NormLayer = Callable[[int], nn.Module]
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "silu": F.silu}


# The reference normalizes CIFAR-10 with ImageNet statistics.
REFERENCE_MEAN = (0.485, 0.456, 0.406)


REFERENCE_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec(Spec):
    """One of our architectures: ``build(width, norm_layer, **kwargs)`` makes it, ``width`` is the first
    stage's channels when --width is not given, ``summary`` the words --help shows."""

    width: int = 64


ARCH_SPECS: Registry[ArchSpec] = Registry("arch", ArchSpec, error=ModelError)


def available_archs() -> list[str]:
    """Our named architectures, in registration order (which is alphabetical)."""
    return list(ARCH_SPECS.names())


WIDE_RESNET_NAME = re.compile(r"^wide_resnet(\d+)_(\d+)$")

WIDE_RESNET_FAMILY = "wide_resnetD_K (any WRN-D-K: depth D = 6n + 4 >= 10, widen factor K, e.g. wide_resnet16_4)"


# Bounds on our architectures' sizes, checked before anything is built: beyond them a model cannot train on any
# machine (a first stage of 4,096 channels is 16x WRN-70-16's 256; WRN-1000 is 14x the deepest WRN of the field's tables).
MAX_WIDTH = 4096
MAX_WRN_DEPTH = 1000


def arch_size_problem(name: str, width: int | None) -> str | None:
    """Why ``name`` (one of our architectures) with first-stage ``width`` is too large to build, or None."""
    match = WIDE_RESNET_NAME.match(str(name))
    if match and name not in ARCH_SPECS:
        depth, factor = int(match[1]), int(match[2])
        if depth > MAX_WRN_DEPTH:
            return f"{name} has depth {depth}, above the {MAX_WRN_DEPTH} we build; pick a depth D = 6n + 4 <= {MAX_WRN_DEPTH}"
        if width is None and 16 * factor > MAX_WIDTH:
            return (f"{name} has widen factor {factor} ({16 * factor} channels in its first group), above the "
                    f"{MAX_WIDTH} we build; pick K <= {MAX_WIDTH // 16}")
    if width is not None and width > MAX_WIDTH:
        return f"width {width} is above the {MAX_WIDTH} channels we build in a first stage; pass a smaller --width"
    return None


def arch_spec(name: str) -> ArchSpec | None:
    """The spec of one of our architectures: a registered name, or ``wide_resnetD_K`` for any WRN-D-K (the
    registered WRNs are members of that family); None for another name."""
    if name in ARCH_SPECS:
        return ARCH_SPECS.get(name)
    match = WIDE_RESNET_NAME.match(str(name))
    if match:
        depth, factor = int(match[1]), int(match[2])
        if depth >= 10 and (depth - 4) % 6 == 0 and factor >= 1:
            return ArchSpec(name, build=functools.partial(wide_resnet, depth), width=16 * factor,
                            summary=f"WRN-{depth}-{factor}")
    return None


def archs_help() -> str:
    """Every name --arch takes, with the specs' summaries, for --help and refusals."""
    return f"{ARCH_SPECS.help()}, {WIDE_RESNET_FAMILY}, torchvision:NAME or timm:NAME"


def unknown_arch(name: str) -> str:
    """The refusal of an architecture name that is none of ours and not ``torchvision:``/``timm:``."""
    valid = f"{', '.join(available_archs())}, {WIDE_RESNET_FAMILY}, torchvision:NAME, timm:NAME"
    return f"unknown arch {name!r}; valid: {valid}{did_you_mean(name, available_archs())}"


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel, so the model's public input space is [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], persistent: bool = True) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=persistent)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """norm -> relu -> conv3x3 -> norm -> relu -> conv3x3, shortcut from the first activation."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: NormLayer, activation: str = "relu") -> None:
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.bn1 = norm_layer(cin)
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = norm_layer(cout)
        self.conv2 = conv3x3(cout, cout)
        self.shortcut = None
        self.stride = stride
        if stride != 1 or cin != cout:
            # A strided 1x1 conv equals a 1x1 conv of the subsampled input. We subsample first
            # because torch 2.14's CPU backward of a strided 1x1 channels_last conv with fewer
            # than 8 input channels crashes (segfault); the weights are the same either way.
            self.shortcut = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out[..., ::self.stride, ::self.stride])
        out = self.conv1(out)
        out = self.conv2(self.act(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016) as used by the SaBN reference and Rice et al.

    ``final_norm`` adds a norm + activation before the pooling (fast_adversarial's variant); the
    default matches the SaBN reference (11,171,146 parameters for PreAct-18 with BN on CIFAR-10).
    ``activation`` is ``relu`` (the reference) or ``silu`` (the modern recipes' wide ResNets).
    """

    def __init__(
        self,
        stage_blocks: Sequence[int],
        stage_widths: Sequence[int],
        stem_width: int,
        norm_layer: NormLayer,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] = REFERENCE_MEAN,
        std: Sequence[float] = REFERENCE_STD,
        final_norm: bool = False,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.normalize = InputNormalization(mean, std)
        self.stem = conv3x3(in_channels, stem_width)
        blocks, cin = [], stem_width
        for i, (n, cout) in enumerate(zip(stage_blocks, stage_widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(cin, cout, stride, norm_layer, activation))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        # The SaBN reference ends layer4 -> avg pool -> linear; fast_adversarial's PreAct adds norm + ReLU.
        self.final_norm = norm_layer(cin) if final_norm else None
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(self.normalize(x)))
        return out if self.final_norm is None else ACTIVATIONS[self.activation](self.final_norm(out))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@ARCH_SPECS.register("preact_resnet18", width=64, summary="PreAct ResNet-18, the SaBN reference")
def preact_resnet18(width: int, norm_layer: NormLayer, **kwargs) -> PreActResNet:
    """PreAct ResNet-18; ``width`` is the first stage's channels (64 gives 64-128-256-512)."""
    return PreActResNet([2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], width, norm_layer, **kwargs)


@ARCH_SPECS.register("preact_resnet34", width=64, summary="PreAct ResNet-34")
def preact_resnet34(width: int, norm_layer: NormLayer, **kwargs) -> PreActResNet:
    """PreAct ResNet-34 (3-4-6-3 blocks)."""
    return PreActResNet([3, 4, 6, 3], [width, 2 * width, 4 * width, 8 * width], width, norm_layer, **kwargs)


def wide_resnet(depth: int, width: int, norm_layer: NormLayer, **kwargs) -> PreActResNet:
    """WRN-depth-k: a 16-channel stem, three groups of (depth - 4) / 6 pre-activation blocks of
    ``width``, 2 ``width``, 4 ``width`` channels (width = 16 k), a final norm + activation (as TRADES's,
    DeepMind's and DM-Improves-AT's WideResNet)."""
    kwargs.setdefault("final_norm", True)
    n = (depth - 4) // 6
    return PreActResNet([n, n, n], [width, 2 * width, 4 * width], 16, norm_layer, **kwargs)


@ARCH_SPECS.register("wide_resnet28_10", width=160, summary="WRN-28-10")
def wide_resnet28_10(width: int, norm_layer: NormLayer, **kwargs) -> PreActResNet:
    """WRN-28-10 (Carmon et al. 2019, Wang et al. 2023): three groups of four blocks, 160-320-640 channels."""
    return wide_resnet(28, width, norm_layer, **kwargs)


@ARCH_SPECS.register("wide_resnet34_10", width=160, summary="WRN-34-10")
def wide_resnet34_10(width: int, norm_layer: NormLayer, **kwargs) -> PreActResNet:
    """WRN-34-10 (Zagoruyko & Komodakis; the Madry/TRADES benchmark model).

    A 16-channel stem, three groups of five pre-activation blocks; ``width`` is the first
    group's channels (160 = 16 x widen factor 10 gives 160-320-640).
    """
    return wide_resnet(34, width, norm_layer, **kwargs)


@ARCH_SPECS.register("wide_resnet70_16", width=256, summary="WRN-70-16")
def wide_resnet70_16(width: int, norm_layer: NormLayer, **kwargs) -> PreActResNet:
    """WRN-70-16 (Gowal et al. 2020, Wang et al. 2023): three groups of eleven blocks, 256-512-1024 channels."""
    return wide_resnet(70, width, norm_layer, **kwargs)
