"""Training recipes of the field (``--recipe NAME``): the settings of a paper's official code, as
TrainConfig field values that any flag overrides.

Each recipe names its source and says where ``robust`` differs from it. The values are CIFAR-10's
(eps 8/255); on another dataset pass ``--eps`` and expect the budget (epochs, batch) to want
tuning. ``extra_fraction`` and ``epoch_size`` apply only when ``--extra-data`` is given. Every
recipe holds 2% of the training set out for validation (1,000 CIFAR-10 images, as Rice et al.'s
``--val`` and DM-Improves-AT's 1,024), where ``best.pt`` is chosen. Pure data: this module imports
nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    source: str
    values: dict[str, Any]
    differences: str = ""
    extra_data: dict[str, Any] = field(default_factory=dict)  # applied only with --extra-data


_PGD_AT = dict(method="pgd", norm="bn", eps="8/255", step_size="2/255", steps=10, batch_size=128, lr=0.1,
               momentum=0.9, schedule="multistep", warmup_steps=0, val_split=0.02)

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        "madry2018", "PGD-AT, Madry et al. 2018",
        "MadryLab/cifar10_challenge config.json: 80,000 steps of batch 128 (205 epochs), lr 0.1 -> 0.01 -> 0.001 at "
        "steps 40,000 and 60,000, momentum 0.9, weight decay 2e-4 on conv and linear weights, PGD-10 of 2/255 "
        "from a uniform start with BN in train mode",
        {**_PGD_AT, "arch": "wide_resnet34_10", "epochs": 205, "milestones": "0.5,0.75", "weight_decay": 2e-4,
         "decay_norms": False, "attack_bn": "train"},
        "the code's model is a WRN-32-10 with leaky ReLU 0.1 and parameter-free shortcuts (WRN-34-10 with ReLU "
        "here, the PGD-AT baseline of later papers); the code keeps the last checkpoint (robust eval RUN/last.pt) "
        "and trains on all 50,000 images",
    ),
    Recipe(
        "rice2020", "PGD-AT with early stopping, Rice et al. 2020",
        "locuslab/robust_overfitting train_cifar.py: PreAct ResNet-18, 200 epochs of batch 128, lr 0.1 x0.1 at "
        "epochs 100 and 150, momentum 0.9, weight decay 5e-4 on every parameter, PGD-10 of 2/255 with BN in train "
        "mode; the checkpoint with the best PGD-10 validation accuracy (--val: 1,000 held-out images)",
        {**_PGD_AT, "arch": "preact_resnet18", "epochs": 200, "milestones": "100,150", "weight_decay": 5e-4,
         "decay_norms": True, "attack_bn": "train", "val_steps": 10},
        "none in the settings; the official code selects on the test set unless --val is given",
    ),
    Recipe(
        "zhang2019", "TRADES, Zhang et al. 2019",
        "yaodongyu/TRADES train_trades_cifar10.py: WRN-34-10, 76 epochs of batch 128, lr 0.1 (x0.1 from epoch 75; "
        "the later steps at 90 and 100 fall after the end), momentum 0.9, weight decay 2e-4 on every parameter, "
        "beta 6, PGD-10 of 0.007 on the KL from x + 0.001 N(0, 1) with BN in eval mode, eps 0.031",
        {"method": "trades", "method_options": "beta=6.0", "norm": "bn", "arch": "wide_resnet34_10", "epochs": 76,
         "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4, "decay_norms": True,
         "schedule": "multistep", "milestones": "74", "warmup_steps": 0, "eps": "0.031", "step_size": "0.007",
         "steps": 10, "attack_bn": "eval", "val_split": 0.02},
        "the code saves every epoch and names no selection rule (best.pt here is the best validation epoch)",
    ),
    Recipe(
        "gowal2020", "TRADES, SiLU WRN, weight averaging, extra data: Gowal et al. 2020",
        "google-deepmind/deepmind-research adversarial_robustness/jax/experiment.py (the configuration its comments "
        "give for Gowal et al. 2020 and Rebuffi et al. 2021): WRN-28-10 with Swish (SiLU), 400 epochs of 50,000 "
        "examples in batches of 1024, SGD with Nesterov momentum 0.9, lr 0.4 (0.1 x batch / 256) after a linear "
        "warm-up of 10 epochs, cosine to 0, weight decay 5e-4 without BN, TRADES beta 6 with the attack's BN on "
        "batch statistics without updating them (10 steps), weight average decay 0.995 with the warm-up "
        "min(0.995, (1 + t) / (10 + t)), 70% of every batch extra data",
        {"method": "trades", "method_options": "beta=6.0", "norm": "bn", "arch": "wide_resnet28_10",
         "activation": "silu", "epochs": 400, "batch_size": 1024, "optimizer": "sgd", "lr": 0.4, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "decay_norms": False, "schedule": "cosine", "warmup_steps": 0,
         "warmup_epochs": 10.0, "eps": "8/255", "step_size": "2/255", "steps": 10, "attack_bn": "frozen",
         "ema": 0.995, "val_split": 0.02},
        "the code's attack takes Adam steps of 0.1 on the KL (signed PGD steps of 2/255 here); it smooths only the "
        "extra data's labels (0.1; no smoothing here: --label-smoothing applies to every label), repeats each "
        "labelled example 4 times per batch (4 emulated workers) and decays the logits' bias",
        {"extra_fraction": 0.7, "epoch_size": 50_000},
    ),
    Recipe(
        "wang2023", "TRADES with generated data, Wang et al. 2023",
        "wzekai99/DM-Improves-AT README (WRN-28-10, 1M generated images) with train-wa.py's defaults: SiLU "
        "WRN-28-10, 400 epochs of ceil(50,000 / 512) batches of 512, SGD with Nesterov momentum 0.9, lr 0.2, "
        "one-cycle cosine with 2.5% warm-up, weight decay 5e-4 without BN, TRADES beta 5, label smoothing 0.1, "
        "10 attack steps of 2/255 with BN in train mode without updating statistics, weight average 0.995, 70% "
        "of every batch generated, the best weight-averaged model on 1,024 held-out images",
        {"method": "trades", "method_options": "beta=5.0", "norm": "bn", "arch": "wide_resnet28_10",
         "activation": "silu", "epochs": 400, "batch_size": 512, "optimizer": "sgd", "lr": 0.2, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "decay_norms": False, "schedule": "cosine", "warmup_steps": 0,
         "warmup_epochs": 10.0, "eps": "8/255", "step_size": "2/255", "steps": 10, "attack_bn": "frozen",
         "ema": 0.995, "label_smoothing": 0.1, "val_split": 0.02, "val_steps": 40},
        "its OneCycleLR also cycles the momentum (0.85-0.95) and ramps from lr/25 (a linear warm-up from 0 and a "
        "fixed momentum here); its weight average copies the live weights for the first 10 epochs; it samples "
        "generated images with replacement (each pool is drawn without replacement here); it validates with "
        "PGD-40 on the CW loss (PGD-40 on CE here)",
        {"extra_fraction": 0.7, "epoch_size": 50_000},
    ),
    Recipe(
        "fast", "the most robustness per training minute on a CPU, for --time-budget",
        "measured here: chosen by PGD-20 accuracy on Fashion-MNIST at eps 0.1 among PGD-4, FGSM-RS and N-FGSM "
        "at the same number of forward-backward passes (one-step methods take 0.56x the time of PGD-4 per epoch): "
        "N-FGSM (noise 2 eps, step eps, the CO guard on) on a width-8 SaBN PreAct ResNet-18, batch 128, one-cycle "
        "lr 0.1, 5 epochs where no --time-budget chooses the steps",
        {"method": "nfgsm", "norm": "sabn", "arch": "preact_resnet18", "width": 8, "batch_size": 128, "lr": 0.1,
         "schedule": "onecycle", "epochs": 5, "val_split": 0.1, "val_limit": 500, "val_steps": 10},
        "not a paper's recipe: sized for 28x28 images on a CPU (a width-8 model); on CIFAR-10 pass a --width",
    ),
)}


def recipe_names() -> tuple[str, ...]:
    return tuple(RECIPES)


def recipe_values(name: str, with_extra_data: bool) -> dict[str, Any]:
    """The field values recipe ``name`` sets (its extra-data ones only ``with_extra_data``)."""
    recipe = RECIPES[name]
    return {**recipe.values, **(recipe.extra_data if with_extra_data else {})}


def recipes_help() -> str:
    return "; ".join(f"{r.name} ({r.summary}; {r.source.split()[0]})" for r in RECIPES.values())
