"""Experiments on top of training: compare grids, their statistics, gradient analysis, bench, plots."""
