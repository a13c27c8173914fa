"""robust: adversarial training with dual-route Sandwich Batch Normalization, and honest evaluation.

The package is built in layers; each imports only from the layers above it in this list:

0. ``errors``, ``runtime`` (device, precision, CPUs), ``threat`` (eps parsing), ``outputs`` (atomic writes, the folder lock)
1. ``nn`` (dual-route norms, models, the ``build_model`` factory) and ``data`` (datasets, loaders)
2. ``checkpoint``, ``objectives`` (the training methods), ``eval`` (robust accuracy, evaluation, sanity checks)
3. ``config`` (``TrainConfig``: reads the registries of the layers above), then ``plan`` (``load_config`` and
   the ``TrainPlan`` it resolves a run's settings into, once)
4. ``train`` (the step, the run folder, faults, distributed, the ``Trainer`` loop)
5. ``lab`` (compare grids, statistics, gradient analysis, bench, plots)

The attacks (``attacks/``) and the command line (``cli/``) sit at the top of the source tree but
are subpackages of ``robust``: installed, they are ``robust/attacks`` and ``robust/cli``
(pyproject's package-dir), so ``pip install`` claims no generic top-level name. In a source
checkout the two lines below let ``robust.attacks`` and ``robust.cli`` resolve to those folders.
"""

import os as _os

if not _os.path.isdir(_os.path.join(__path__[0], "attacks")):  # a source checkout, not an installed wheel
    __path__.append(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

from robust.checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from robust.config import TrainConfig  # noqa: E402
from robust.eval import evaluate  # noqa: E402
from robust.lab.analysis import analyze_checkpoint, gradient_analysis  # noqa: E402
from robust.lab.compare import CompareSettings, run_compare  # noqa: E402
from robust.nn import (  # noqa: E402
    NORMS,
    ROUTES,
    DualBatchNorm2d,
    SandwichBatchNorm2d,
    SharedBatchNorm2d,
    available_archs,
    build_model,
    convert_norms,
    export_route,
    is_dual_route,
    make_norm_layer,
    split_routes,
    use_route,
)
from robust.objectives import OBJECTIVES, Objective, get_objective  # noqa: E402
from robust.plan import TrainPlan, load_config  # noqa: E402
from robust.runtime import __version__  # noqa: E402
from robust.threat import parse_eps  # noqa: E402
from robust.train import Trainer  # noqa: E402

__all__ = [
    "NORMS", "OBJECTIVES", "ROUTES", "CompareSettings", "DualBatchNorm2d", "Objective", "SandwichBatchNorm2d",
    "SharedBatchNorm2d", "TrainConfig", "TrainPlan", "Trainer", "__version__", "analyze_checkpoint", "available_archs",
    "build_model", "convert_norms", "evaluate", "export_route", "get_objective", "gradient_analysis",
    "is_dual_route", "load_checkpoint", "load_config", "load_model", "make_norm_layer", "parse_eps", "run_compare",
    "save_checkpoint", "split_routes", "use_route",
]
