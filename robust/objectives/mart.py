"""``mart``: Wang et al. 2020, misclassification-aware adversarial training (YisenWang/MART).

Loss, as the official code: a boosted CE on x_adv,
``CE(f(x_adv), y) - log(1.0001 - p_adv[y'] + 1e-12)`` with ``y'`` the most likely wrong class of
f(x_adv), plus ``beta * mean_i KL(f(x_i) || f(x_adv_i)) * (1.0000001 - p_nat[y_i])`` (KL with the
official 1e-12 inside its log). Attack: PGD on CE from ``x + 0.001 * N(0, 1)``, BN in eval mode by
default (as the official code). f(x) and f(x_adv) are separate forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robust.attacks import gaussian_start, pgd
from robust.objectives import Objective, Option, hard_labels, register


def mart_loss(natural_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, beta: float,
              label_smoothing: float = 0.0) -> torch.Tensor:
    target, y = y, hard_labels(y)  # soft labels (extra data) enter the CE; the margin terms use the class
    adv_probs = F.softmax(adv_logits.float(), dim=1)
    top2 = adv_probs.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])  # the most likely wrong class
    boosted = F.cross_entropy(adv_logits.float(), target, label_smoothing=label_smoothing) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
    nat_probs = F.softmax(natural_logits.float(), dim=1)
    kl = (torch.xlogy(nat_probs, nat_probs) - nat_probs * torch.log(adv_probs + 1e-12)).sum(dim=1)
    true = nat_probs.gather(1, y[:, None]).squeeze(1)
    return boosted + beta * (kl * (1.0000001 - true)).sum() / len(y)


@register
class MART(Objective):
    name = "mart"
    summary = "Wang et al. 2020"
    uses_natural = True
    attack_bn = "eval"
    attack_text = "Linf PGD-{steps} on CE, from x + 0.001 N(0, 1)"
    options = {"beta": Option(6.0, "weight of the KL term (the official code's default 6)", min=0)}

    def examples(self, model, x, y):
        return pgd(model, x, y, self.eps, self.alpha, self.steps, start=gaussian_start(x))

    def loss(self, adv_logits, y, natural_logits=None):
        return mart_loss(natural_logits, adv_logits, y, self.beta, self.label_smoothing)
