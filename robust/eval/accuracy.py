"""The one definition of robust accuracy, used by training validation and ``robust.evaluate``.

An example is robust when the model is right on the clean input **and** right on the attack's
adversarial example (the AutoAttack / RobustBench convention). Examples already wrong on the
clean input are not attacked: they count as non-robust whatever an attack would return, so a
weak attack can never make robust accuracy exceed clean accuracy.

Both verdicts (clean and adversarial) are fp32 forwards, without autocast, whatever precision the
attack's own iterations ran in: an attack may search in bf16, but an example counts as broken only
when its adversarial input is misclassified in fp32, so a robust accuracy never rests on bf16
arithmetic.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from robust.attacks.pgd import fp32_predictions
from robust.errors import ConfigError
from robust.nn.norms import bn_mode
from robust.precision import PrecisionChoice, choose_precision, input_gradient_probe, model_signature
from robust.runtime import autocast, autocast_dtype

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ATTACK_PRECISIONS = ("auto", "fp32", "bf16")


def attack_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of attack iterations for ``precision`` (None: fp32).

    ``auto`` here is the rule without a model (bf16 on CUDA where supported and on CPUs with AMX,
    fp32 elsewhere); :func:`choose_attack_precision` measures the model instead. Never fp16, whose
    range loses a confident example's gradient.
    """
    if precision not in ATTACK_PRECISIONS:
        raise ConfigError(f"unknown attack precision {precision!r}; use {', '.join(ATTACK_PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    dtype = autocast_dtype("auto", device)
    return dtype if dtype == torch.bfloat16 else None


PROBE_BATCH = 128  # the most images the attack-precision probe times


def choose_attack_precision(precision: str, device: torch.device, model: nn.Module, x: torch.Tensor,
                            y: torch.Tensor, threads: int, ranks: int = 1) -> PrecisionChoice:
    """``--attack-precision`` resolved; ``auto`` on a CPU times the attacks' unit of work on this model.

    The unit is one forward and input gradient on the first images (``x`` floats in [0, 1] on
    ``device``), in eval mode, with the ``threads`` each process will have; the ratio is cached per
    machine and model shape (robust.precision). Several ranks keep the flag rule, so they agree.
    """
    if precision not in ATTACK_PRECISIONS:
        raise ConfigError(f"unknown attack precision {precision!r}; use {', '.join(ATTACK_PRECISIONS)}")
    if precision != "auto" or device.type != "cpu" or ranks > 1 or not len(y):
        dtype = attack_dtype(precision, device)
        return PrecisionChoice(dtype, "asked" if precision != "auto" else "auto by device and CPU flags")
    xb, yb = x[:PROBE_BATCH], y[:PROBE_BATCH]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with bn_mode(model, False), torch.random.fork_rng(devices=[]):
            return choose_precision("auto", device, model_signature(model, tuple(xb.shape), "attack"),
                                    input_gradient_probe(model, xb, yb))
    finally:
        torch.set_num_threads(previous)


def correct_under_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                         clean: torch.Tensor | None = None,
                         dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example boolean masks ``(clean correct, robust)`` of one batch, both judged in fp32.

    ``attack(x, y) -> x_adv`` sees only the clean-correct examples and runs under autocast to
    ``dtype`` when given (else in the caller's precision); pass ``clean`` (the clean mask) when it
    is already known, to skip the clean forward.
    """
    if clean is None:
        clean = fp32_predictions(model, x) == y
    robust = clean.clone()
    idx = clean.nonzero().squeeze(1)
    if len(idx):
        with autocast(x.device, dtype):
            x_adv = attack(x[idx], y[idx])
        robust[idx] = fp32_predictions(model, x_adv) == y[idx]
    return clean, robust
