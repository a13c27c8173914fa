"""robust: PGD adversarial training with dual-route Sandwich Batch Normalization.

Layout: the attacks (``attacks/``) and the command line (``cli/``) sit at the top of the source
tree but are subpackages of ``robust``: installed, they are ``robust/attacks`` and ``robust/cli``
(pyproject's package-dir), so ``pip install`` claims no generic top-level name. In a source
checkout the two lines below let ``robust.attacks`` and ``robust.cli`` resolve to those folders.
"""

import os as _os

if not _os.path.isdir(_os.path.join(__path__[0], "attacks")):  # a source checkout, not an installed wheel
    __path__.append(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

from .analysis import analyze_checkpoint, gradient_analysis
from .checkpoint import load_checkpoint, save_checkpoint
from .compare import CompareSettings, run_compare
from .config import TrainConfig, parse_eps
from .evaluate import evaluate, load_model
from .models import available_archs, build_model
from .objectives import OBJECTIVES, Objective, get_objective
from .norms import (
    NORMS, ROUTES, DualBatchNorm2d, SandwichBatchNorm2d, SharedBatchNorm2d, convert_norms,
    export_route, is_dual_route, make_norm_layer, split_routes, use_route,
)
from .trainer import Trainer

__version__ = "0.1.0"
