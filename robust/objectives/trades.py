"""``trades``: Zhang et al. 2019 (yaodongyu/TRADES).

Loss: ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))``, the KL summed over classes and examples and
divided by the batch size, as the official code does; gradients flow through both f(x) and f(x_adv).
Attack: PGD on that KL (the clean distribution held fixed) from ``x + 0.001 * N(0, 1)``, BN in eval
mode by default (the official code attacks in eval mode and computes the loss in train mode).
f(x) and f(x_adv) are separate forwards, as in the official code; the official code evaluates f(x)
twice in its loss (identical values and gradients, one more update of the running statistics),
we once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robust.attacks import gaussian_start, kl_loss_from, pgd
from robust.objectives import Objective, Option, register


def batch_kl(natural_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """``sum_i KL(softmax(natural_i) || softmax(adv_i)) / n``."""
    log_p = F.log_softmax(natural_logits.float(), dim=1)
    log_q = F.log_softmax(adv_logits.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum() / len(natural_logits)


@register
class TRADES(Objective):
    name = "trades"
    summary = "Zhang et al. 2019"
    uses_natural = True
    attack_bn = "eval"
    attack_text = "Linf PGD-{steps} on the KL to f(x), from x + 0.001 N(0, 1)"
    options = {"beta": Option(6.0, "weight of the KL term (the official code's default 6)", min=0)}

    def examples(self, model, x, y):
        with torch.no_grad():
            natural = model(x)
        return pgd(model, x, y, self.eps, self.alpha, self.steps, loss=kl_loss_from(natural), start=gaussian_start(x))

    def loss(self, adv_logits, y, natural_logits=None):
        return self.ce(natural_logits, y) + self.beta * batch_kl(natural_logits, adv_logits)
