"""robust: adversarial training with dual-route Sandwich Batch Normalization, and honest evaluation.

The package is built in layers; each imports only from the layers above it in this list:

0. ``errors``, ``runtime`` (device, precision, CPUs), ``threat`` (eps parsing), ``outputs`` (atomic writes, the folder lock)
1. ``nn`` (dual-route norms, models, the ``build_model`` factory) and ``data`` (datasets, loaders)
2. ``checkpoint``, ``objectives`` (the training methods), ``eval`` (robust accuracy, evaluation, sanity checks)
3. ``config`` (``TrainConfig``: reads the registries of the layers above)
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

import importlib as _importlib  # noqa: E402

from robust.version import __version__  # noqa: E402

# The public API, one line per name: the module that defines it is imported on first use
# (``from robust import TrainConfig``, ``robust.evaluate``), so ``import robust`` and `robust --help` load no torch.
_PUBLIC = {
    "CompareSettings": "robust.lab.compare",
    "DualBatchNorm2d": "robust.nn",
    "NORMS": "robust.nn",
    "OBJECTIVES": "robust.objectives",
    "Objective": "robust.objectives",
    "ROUTES": "robust.nn",
    "SandwichBatchNorm2d": "robust.nn",
    "SharedBatchNorm2d": "robust.nn",
    "TrainConfig": "robust.config",
    "Trainer": "robust.train",
    "analyze_checkpoint": "robust.lab.analysis",
    "available_archs": "robust.nn",
    "build_model": "robust.nn",
    "convert_norms": "robust.nn",
    "evaluate": "robust.eval",
    "export_route": "robust.nn",
    "get_objective": "robust.objectives",
    "gradient_analysis": "robust.lab.analysis",
    "is_dual_route": "robust.nn",
    "load_checkpoint": "robust.checkpoint",
    "load_model": "robust.checkpoint",
    "make_norm_layer": "robust.nn",
    "parse_eps": "robust.threat",
    "run_compare": "robust.lab.compare",
    "save_checkpoint": "robust.checkpoint",
    "split_routes": "robust.nn",
    "use_route": "robust.nn",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    """A public name, imported from its module on first use (then kept here); or a subpackage not yet imported
    (``robust.nn`` after a bare ``import robust``)."""
    if name in _PUBLIC:
        value = globals()[name] = getattr(_importlib.import_module(_PUBLIC[name]), name)
        return value
    if not name.startswith("__"):
        try:
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as missing:
            if missing.name != f"{__name__}.{name}":
                raise  # the subpackage exists but a module it needs does not
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
