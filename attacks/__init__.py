"""Adversarial attacks on any callable ``model(x) -> logits`` with inputs in [0, 1].

This package knows nothing of the rest of :mod:`robust` (installed, it is ``robust.attacks``): our PGD engine lives in :mod:`attacks.pgd`, the
name -> attack registry (which also wraps torchattacks) in :mod:`attacks.registry`, the L1 ball in :mod:`attacks.l1`,
APGD in :mod:`attacks.apgd`, and FAB and Square in L1 in :mod:`attacks.fab_l1` and :mod:`attacks.square_l1`.
"""

from .apgd import APGDSettings, apgd
from .l1 import L1Ball
from .pgd import (
    THREATS,
    L2Ball,
    LinfBall,
    ce_loss,
    cw_margin_loss,
    fgsm_rs,
    fp32_predictions,
    gaussian_start,
    get_threat,
    kl_loss_from,
    nfgsm,
    pgd,
    pgd_restarts,
)

__all__ = [
    "APGDSettings", "L1Ball", "apgd", "L2Ball", "LinfBall", "THREATS", "ce_loss", "cw_margin_loss", "fgsm_rs", "gaussian_start", "get_threat",
    "fp32_predictions", "kl_loss_from", "nfgsm", "pgd", "pgd_restarts",
]
