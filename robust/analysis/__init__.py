"""``robust analyze``: per-layer gradient analysis of dual-route norms, and its figures."""

from robust.analysis.gradients import analyze_checkpoint, gradient_analysis
from robust.analysis.plots import plot_gradient_analysis

__all__ = ["analyze_checkpoint", "gradient_analysis", "plot_gradient_analysis"]
