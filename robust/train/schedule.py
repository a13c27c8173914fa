"""The learning-rate schedules: multistep (with the reference's warm-up), cosine, one-cycle."""

from __future__ import annotations

import math

from robust.config import TrainConfig
from robust.plan import TrainPlan


def lr_at(step: int, config: TrainPlan | TrainConfig, batches_per_epoch: int) -> float:
    """The learning rate before optimizer step ``step`` (0-based, counted over the whole run) of a plan or a config."""
    total = config.train_steps or config.epochs * batches_per_epoch
    epoch = step / batches_per_epoch
    base = config.lr
    warm = config.warmup_epochs * batches_per_epoch
    if warm and step < warm:  # DeepMind's warm-up: linear from 0, then the schedule over the remaining steps
        return base * step / warm
    if config.schedule == "multistep":
        passed = sum(epoch >= m for m in config.milestone_epochs)
        lr = base * (0.1 ** passed)
    elif config.schedule == "cosine":
        lr = 0.5 * base * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
    else:  # onecycle: linear up over the first 40% of steps, then linear down to 0
        peak = 0.4 * total
        lr = base * (step / peak if step < peak else max(0.0, (total - step) / (total - peak)))
    if config.warmup_steps and step < min(config.warmup_steps, batches_per_epoch) and config.schedule != "onecycle":
        # The reference warms from lr/10 to lr linearly over its first 200 steps (first epoch).
        warm = min(config.warmup_steps, batches_per_epoch)
        lr = base * (0.1 + 0.9 * step / warm)
    return lr
