"""robust: adversarial training with dual-route Sandwich Batch Normalization, and honest evaluation.

The package is built in layers; each imports only from the layers listed before it (rooms of one
layer never import each other); the numbers are the ones ``tests/test_layers.py`` checks:

0. ``attacks`` (standalone: knows nothing of robust)
1. ``errors``, ``version`` (the version string alone: imports nothing)
1.5. ``run`` (a run folder's files, named and read: ``Run``)
2. ``runtime`` (device, CPUs), ``torchrun`` (rank and world size from the environment, no torch), ``progress``, ``threat`` (eps parsing), ``checks``, ``recipes``,
   ``outputs`` (atomic writes, the folder lock)
2.5. ``precision`` (auto by measurement: reads runtime's flags, cached by the outputs' writer)
3. ``nn`` (dual-route norms, models, the ``build_model`` factory) and ``data`` (datasets, loaders)
4. ``checkpoint``, ``objectives`` (the training methods), ``eval`` (robust accuracy, evaluation, sanity checks)
4.5. ``plain_model`` (models from outside robust: refuses to misread the checkpoint format)
5. ``config`` (``TrainConfig``: reads the registries of the layers above)
5.5. ``plan`` (``load_config`` and the frozen ``TrainPlan`` it resolves a run's settings into, once)
6. ``train`` (the step, the run folder, faults, distributed, the ``Trainer`` loop)
7. the features, one room each: ``stats`` (means, t intervals), ``curves`` (learning curves, eps
   sweeps), ``export`` (RobustBench), ``pseudo_label``, ``bench`` (developer benchmarks)
7.5. the features that share ``stats`` and ``curves``: ``compare``, ``report``, ``analysis``
   (gradient analysis)
8. ``cli`` (click commands only)

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
    "CompareSettings": "robust.compare",
    "DualBatchNorm2d": "robust.nn",
    "EvalPlan": "robust.eval.plan",
    "MixedClassifier": "robust.nn.mixed",
    "NORMS": "robust.nn",
    "OBJECTIVES": "robust.objectives",
    "Objective": "robust.objectives",
    "Run": "robust.run",
    "ROUTES": "robust.nn",
    "SandwichBatchNorm2d": "robust.nn",
    "SharedBatchNorm2d": "robust.nn",
    "TrainConfig": "robust.config",
    "TrainPlan": "robust.plan",
    "Trainer": "robust.train",
    "analyze_checkpoint": "robust.analysis",
    "available_archs": "robust.nn",
    "build_model": "robust.nn",
    "convert_norms": "robust.nn",
    "evaluate": "robust.eval",
    "export_route": "robust.nn",
    "get_objective": "robust.objectives",
    "gradient_analysis": "robust.analysis",
    "is_dual_route": "robust.nn",
    "load_checkpoint": "robust.checkpoint",
    "load_config": "robust.plan",
    "load_model": "robust.checkpoint",
    "make_norm_layer": "robust.nn",
    "parse_eps": "robust.threat",
    "read_checkpoint": "robust.checkpoint",
    "run_compare": "robust.compare",
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
