"""Adversarial training: the step, AWP, the catastrophic-overfitting guard, the run folder, faults, DDP, the loop."""

from robust.train.trainer import Trainer

__all__ = ["Trainer"]
