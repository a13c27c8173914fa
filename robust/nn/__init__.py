"""Models and their layers: dual-route norms (batch norms, LayerNorm/GroupNorm, timm's BatchNormAct2d), the
PreAct/Wide ResNets, torchvision/timm models, route-aware SyncBN."""

from robust.nn.convert import convert_norms
from robust.nn.factory import build_model, unwrap
from robust.nn.layer_norms import DualAffineNorm, SandwichAffineNorm
from robust.nn.norm_act import RoutedBatchNormAct
from robust.nn.norms import (
    NORM_SPECS,
    NORMS,
    NormSpec,
    ROUTES,
    DualBatchNorm2d,
    SandwichBatchNorm2d,
    SharedBatchNorm2d,
    bn_mode,
    export_route,
    is_dual_route,
    make_norm_layer,
    norms_help,
    split_routes,
    use_route,
)
from robust.nn.resnet import ARCH_SPECS, ArchSpec, archs_help, available_archs

__all__ = [
    "ARCH_SPECS", "ArchSpec", "NORMS", "NORM_SPECS", "NormSpec", "ROUTES", "DualAffineNorm", "DualBatchNorm2d",
    "RoutedBatchNormAct", "SandwichAffineNorm", "SandwichBatchNorm2d", "SharedBatchNorm2d", "archs_help",
    "available_archs", "bn_mode", "build_model", "convert_norms", "export_route", "is_dual_route", "make_norm_layer",
    "norms_help", "split_routes", "unwrap", "use_route",
]
