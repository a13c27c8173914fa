"""Models and their layers: dual-route norms, the PreAct/Wide ResNets, torchvision/timm models, route-aware SyncBN."""

from robust.nn.factory import build_model, unwrap
from robust.nn.norms import (
    NORMS,
    ROUTES,
    DualBatchNorm2d,
    SandwichBatchNorm2d,
    SharedBatchNorm2d,
    bn_mode,
    convert_norms,
    export_route,
    is_dual_route,
    make_norm_layer,
    split_routes,
    use_route,
)
from robust.nn.resnet import available_archs

__all__ = [
    "NORMS", "ROUTES", "DualBatchNorm2d", "SandwichBatchNorm2d", "SharedBatchNorm2d", "available_archs", "bn_mode",
    "build_model", "convert_norms", "export_route", "is_dual_route", "make_norm_layer", "split_routes", "unwrap",
    "use_route",
]
