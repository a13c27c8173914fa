"""`robust eval` of a model from outside robust: its options and the loading branch (model, its facts, test data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import torch.nn as nn

from robust.cli.common import BadInput

from robust.plain_model import (
    check_logits,
    is_robust_checkpoint,
    is_torchscript,
    parse_channel_values,
    read_plain_model,
)
from robust.data.types import CUSTOM_DATASETS, DATASET_INFO, DATASET_SPECS
from robust.eval.evaluation import eval_dataset, first_images, to_model_input
from robust.eval.plan import ModelFacts
from robust.export.robustbench import eps_beside

PLAIN_OPTIONS = ("arch", "mean", "std", "dataset")


def plain_model_options(command):
    """The options that describe a plain model (a TorchScript file, or a state dict with --arch)."""
    options = [
        click.option("--dataset", "dataset", default=None,
                     help=f"a plain model's test data: {', '.join(DATASET_SPECS.names())} "
                          f"({', '.join(CUSTOM_DATASETS)} with --data-dir); robust checkpoints know theirs"),
        click.option("--std", "std", default=None, help="with --mean: the std per channel, e.g. 0.2470,0.2435,0.2616"),
        click.option("--mean", "mean", default=None,
                     help="a plain model's input normalization: (x - mean) / std is applied before it, mean per channel "
                          "comma-separated; leave both out when the model normalizes itself"),
        click.option("--arch", "arch", default=None,
                     help="evaluate a plain state dict (.pt/.pth with weights only, or .safetensors) of this architecture: "
                          "torchvision:NAME, timm:NAME or one of ours (plain BatchNorm); a TorchScript file needs none"),
    ]
    for option in options:
        command = option(command)
    return command


def wants_plain_model(path: Path, plain: dict[str, Any]) -> bool:
    """True when CHECKPOINT is to be read as a plain model: --arch given or a TorchScript file. The options
    of a plain model given for a robust checkpoint are refused (it knows its own)."""
    if plain.get("arch") is not None or is_torchscript(path):
        return True
    given = [f"--{k}" for k in PLAIN_OPTIONS if plain.get(k) is not None]
    if given and path.is_file() and not is_robust_checkpoint(path):
        raise BadInput(f"{path} is no robust checkpoint, so it is read as plain weights, which need their "
                       "architecture: add --arch torchvision:NAME, timm:NAME or one of ours (a TorchScript file needs none)")
    if given:
        raise BadInput(f"{', '.join(given)} describe(s) a plain model (with --arch, or a TorchScript file); "
                       f"a robust checkpoint knows its own: drop {', '.join(given)}")
    return False


def load_plain_model(path: Path, plain: dict[str, Any], data_dir: str | None, limit: int | None,
                     weights: str | None, eps_wanted: bool = True) -> tuple[nn.Module, ModelFacts, tuple]:
    """(model, facts, test split) of a plain model: the test data of --dataset, the model built for its classes
    and channels, its output checked to be (N, classes) logits on the first test images. Its facts are the
    dataset and, with ``eps_wanted``, the eps and threat of a RobustBench entry's model_info beside it."""
    if weights is not None:
        raise BadInput("--weights applies to robust checkpoints of runs trained with --ema; drop it for a plain model")
    dataset = plain.get("dataset")
    if dataset is None:
        raise BadInput(f"{path} is a plain model, which records no dataset; pass --dataset, e.g. --dataset cifar10")
    if dataset not in DATASET_INFO and dataset not in CUSTOM_DATASETS:
        raise BadInput(f"unknown --dataset {dataset!r}; valid: {', '.join([*DATASET_INFO, *CUSTOM_DATASETS])}")
    x, y = first_images(eval_dataset(dataset, data_dir), limit)
    channels = int(x.shape[1])
    classes = DATASET_INFO[dataset].num_classes if dataset in DATASET_INFO else int(y.max()) + 1
    mean = parse_channel_values(plain.get("mean"), "--mean", channels)
    std = parse_channel_values(plain.get("std"), "--std", channels)
    model = read_plain_model(path, plain.get("arch"), classes, channels, mean, std)
    check_logits(model, to_model_input(x[:2], x.device), classes, path)
    beside = eps_beside(path) if eps_wanted else None  # a RobustBench entry: its model_info names the eps
    facts = ModelFacts(dataset) if beside is None else ModelFacts(dataset, beside[0], beside[1], eps_from=str(beside[2]))
    return model, facts, (x, y)
