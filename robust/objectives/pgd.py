"""``pgd``: Madry et al. 2018, cross-entropy on PGD examples (uniform start in the eps ball)."""

from __future__ import annotations

import torch.nn.functional as F

from ..attacks import pgd
from . import Objective, register


@register
class PGD(Objective):
    name = "pgd"

    def examples(self, model, x, y):
        return pgd(model, x, y, self.eps, self.alpha, self.steps, random_start=True)

    def loss(self, adv_logits, y, natural_logits=None):
        return F.cross_entropy(adv_logits.float(), y)
