"""``convert_norms``: every norm of any torch model made dual-route, and what could not be.

One pass over the model tries each converter in turn: BatchNorm2d and SyncBatchNorm
(:mod:`robust.nn.norms`), timm's BatchNormAct2d (:mod:`robust.nn.norm_act`), LayerNorm and GroupNorm
(:mod:`robust.nn.layer_norms`). Frozen batch norms and affine-free LayerNorm/GroupNorm are kept as
they are (nothing in them could differ between routes); any other norm is left for
:func:`unconverted_norms` to name.
"""

from __future__ import annotations

from collections import Counter

import torch.nn as nn

from robust.nn.layer_norms import convert_affine_norm
from robust.nn.norm_act import convert_norm_act, is_frozen_batch_norm
from robust.nn.norms import RoutedNorm, check_norm, convert_batch_norm, replace_modules

CONVERTERS = (convert_norm_act, convert_batch_norm, convert_affine_norm)  # BatchNormAct2d before its base BatchNorm2d


def convert_norms(model: nn.Module, norm: str) -> nn.Module:
    """Turn every convertible norm of ``model`` into the dual-route norm ``norm``, in place (the root may be replaced).

    The model's function is preserved: both routes start from the original statistics, and for sabn the
    original affine becomes the shared affine with identity route affines. Norms that are already routed are
    left as they are, so converting twice changes nothing.
    """
    check_norm(norm)

    def convert(m: nn.Module) -> nn.Module | None:
        if isinstance(m, RoutedNorm):
            return m  # already routed: keep it, and never convert the plain norms inside it
        for converter in CONVERTERS:
            new = converter(m, norm)
            if new is not None:
                return new
        return None

    return replace_modules(model, convert)


def is_norm(m: nn.Module) -> bool:
    """A norm layer by kind or by name; a container of norms (timm's NormMlpClassifierHead, ConvNormAct) is not one."""
    kinds = (RoutedNorm, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    if isinstance(m, kinds):
        return True
    return "Norm" in type(m).__name__ and not any(is_norm(c) for c in m.children())


def kept_as_is(m: nn.Module) -> bool:
    """Norms a converted model keeps unchanged by design: frozen batch norms, and the LayerNorm/GroupNorm left
    after conversion (all of them under bn, the affine-free ones under auxbn and sabn)."""
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or is_frozen_batch_norm(m)


def unconverted_norms(net: nn.Module) -> Counter:
    """Norm layers outside our routed norms that no converter handles, by class name."""
    inside = {id(sub) for m in net.modules() if isinstance(m, RoutedNorm) for sub in m.modules()}
    return Counter(type(m).__name__ for m in net.modules()
                   if id(m) not in inside and is_norm(m) and not kept_as_is(m))
