"""timm's fused batch norm + activation layers (``BatchNormAct2d``, ``SyncBatchNormAct``) as dual-route norms.

Most of timm's efficient CNNs (EfficientNet, MobileNetV3, RegNet, ...) use ``BatchNormAct2d``: a
BatchNorm2d subclass that applies its drop path and activation after normalizing.
:class:`RoutedBatchNormAct` splits it into the dual-route batch norm of the chosen kind
(:func:`robust.nn.norms.convert_batch_norm`, so statistics, split mode and route-aware SyncBN work
as for a BatchNorm2d) and a *shell* of the original layer, its statistics and affine removed, that
keeps its drop path and activation. A route exports back to the layer's own class with that
route's statistics and folded affine, so it loads into ``timm.create_model(...)``.

timm's frozen variants (``FrozenBatchNorm2d``, ``FrozenBatchNormAct2d``) hold fixed statistics and
a fixed affine as buffers: nothing in them trains, so both routes would stay equal; a model keeps
them as they are under every norm kind.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from robust.nn.layer_norms import shell_of
from robust.nn.norms import RoutedNorm, check_route, convert_batch_norm, plain_batch_norm

BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
NORM_ACT_CLASSES = ("BatchNormAct2d", "SyncBatchNormAct")  # timm.layers' names
FROZEN_CLASSES = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")


def _from_timm(m: nn.Module, names: tuple[str, ...]) -> bool:
    """True when ``m``'s class (or a base class) is one of timm's classes ``names`` (timm stays optional)."""
    return any(c.__module__.startswith("timm.") and c.__name__ in names for c in type(m).__mro__)


def is_norm_act(m: nn.Module) -> bool:
    """True for timm's BatchNormAct2d and SyncBatchNormAct (and subclasses)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and _from_timm(m, NORM_ACT_CLASSES)


def is_frozen_batch_norm(m: nn.Module) -> bool:
    """True for timm's (and torchvision's) frozen batch norms, which a model keeps as they are."""
    frozen_tv = type(m).__name__ == "FrozenBatchNorm2d" and type(m).__module__.startswith("torchvision.")
    return frozen_tv or _from_timm(m, FROZEN_CLASSES)


class RoutedBatchNormAct(RoutedNorm):
    """A BatchNormAct2d with dual-route statistics: ``act(drop(norm_r(x)))``.

    ``norm`` is the routed batch norm (SharedBatchNorm2d, DualBatchNorm2d or SandwichBatchNorm2d)
    made from the layer's statistics and affine; ``shell`` is the original layer without them,
    holding its ``drop`` and ``act``. Split mode normalizes each part with its own statistics and
    applies the drop path and activation to each part, as two separate forwards would.
    """

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm, norm: str) -> None:
        super().__init__()
        self._init_route_state()
        self.norm = convert_batch_norm(plain_batch_norm(layer), norm).train(layer.training)
        self.shell = shell_of(layer, BN_TENSORS)
        # Without statistics to track: a BatchNorm's loader would otherwise add a num_batches_tracked to the
        # checkpoint it loads (an unexpected key). The export sets the layer's own value back.
        self.shell.track_running_stats = False
        self.register_state_dict_post_hook(_flatten)
        self.register_load_state_dict_pre_hook(_nest)

    @property
    def dual(self) -> bool:
        return self.norm.dual

    def normalize(self, x: torch.Tensor, route: str) -> torch.Tensor:
        x = self.norm.normalize(x, route)
        for name in ("drop", "act"):  # SyncBatchNormAct may lack them (timm checks with hasattr)
            layer = getattr(self.shell, name, None)
            if layer is not None:
                x = layer(x)
        return x

    def export_route(self, route: str) -> nn.Module:
        """The layer's own class (BatchNormAct2d, ...) with ``route``'s statistics and folded affine."""
        plain = self.norm.export_route(check_route(route))
        exported = copy.deepcopy(self.shell)
        exported.track_running_stats = plain.track_running_stats
        for name in BN_TENSORS:
            value = getattr(plain, name, None)
            if name in exported._parameters:
                exported._parameters[name] = value
            elif name in exported._buffers:
                exported._buffers[name] = value
        return exported


def _flatten(module: RoutedBatchNormAct, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: ``norm.x`` and ``shell.x`` -> ``x``, so under bn the keys are the timm layer's own
    (``weight``, ``running_mean``, ``act.*``) and an export loads back into a bn model; auxbn/sabn keys read
    ``bns.adv.running_mean``, ``stats.adv.running_mean``, as for our batch norms."""
    for child in ("norm.", "shell."):
        inner = prefix + child
        for key in [k for k in state_dict if k.startswith(inner)]:
            state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _nest(module: RoutedBatchNormAct, state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook, the inverse of :func:`_flatten`: the shell's keys are its submodules' (act, drop)."""
    shell_children = tuple(f"{prefix}{name}." for name, _ in module.shell.named_children())
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith((prefix + "norm.", prefix + "shell."))]:
        child = "shell." if key.startswith(shell_children) else "norm."
        state_dict[prefix + child + key[len(prefix):]] = state_dict.pop(key)


def convert_norm_act(m: nn.Module, norm: str) -> RoutedBatchNormAct | None:
    """The dual-route ``norm`` equal to ``m`` when ``m`` is timm's BatchNormAct2d/SyncBatchNormAct; else None."""
    return RoutedBatchNormAct(m, norm) if is_norm_act(m) else None
