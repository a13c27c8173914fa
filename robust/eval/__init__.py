"""Evaluation: the one definition of robust accuracy, its plan (``EvalPlan``), ``evaluate`` per route, eps sweeps
and the sanity checks."""

from robust.eval.accuracy import correct_under_attack
from robust.eval.evaluation import eps_sweep, evaluate, evaluate_plan
from robust.eval.plan import EvalPlan
from robust.eval.sanity import sanity_checks

__all__ = ["EvalPlan", "correct_under_attack", "eps_sweep", "evaluate", "evaluate_plan", "sanity_checks"]
