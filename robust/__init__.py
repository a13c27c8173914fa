"""robust: PGD adversarial training with dual-route Sandwich Batch Normalization."""

from .analysis import analyze_checkpoint, gradient_analysis
from .checkpoint import load_checkpoint, save_checkpoint
from .compare import CompareSettings, run_compare
from .config import TrainConfig, parse_eps
from .evaluate import evaluate, load_model
from .models import available_archs, build_model
from .norms import (
    NORMS, ROUTES, DualBatchNorm2d, SandwichBatchNorm2d, SharedBatchNorm2d, convert_norms,
    export_route, is_dual_route, make_norm_layer, split_routes, use_route,
)
from .trainer import Trainer

__version__ = "0.1.0"
