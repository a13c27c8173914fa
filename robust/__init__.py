"""robust: PGD adversarial training with dual-route Sandwich Batch Normalization."""

from .models import available_archs, build_model
from .norms import (
    NORMS, ROUTES, DualBatchNorm2d, SandwichBatchNorm2d, SharedBatchNorm2d, convert_norms,
    export_route, is_dual_route, make_norm_layer, split_routes, use_route,
)

__version__ = "0.1.0"
