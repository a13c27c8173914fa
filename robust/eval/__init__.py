"""Evaluation: the one definition of robust accuracy, ``evaluate`` per route, eps sweeps and the sanity checks."""

from robust.eval.accuracy import correct_under_attack
from robust.eval.evaluation import eps_sweep, evaluate
from robust.eval.sanity import sanity_checks

__all__ = ["correct_under_attack", "eps_sweep", "evaluate", "sanity_checks"]
