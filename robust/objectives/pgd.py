"""``pgd``: Madry et al. 2018, cross-entropy on PGD examples (uniform start in the eps ball)."""

from __future__ import annotations

from robust.attacks import pgd
from robust.objectives import Objective, register


@register
class PGD(Objective):
    name = "pgd"
    summary = "Madry et al. 2018"
    attack_text = "Linf PGD-{steps} on CE, uniform random start"
    aliases = {"hybrid": {"clean_weight": 0.5}}  # the SaBN reference's loss: pgd with half the weight on the clean route

    def examples(self, model, x, y):
        return pgd(model, x, y, self.eps, self.alpha, self.steps, random_start=True)

    def loss(self, adv_logits, y, natural_logits=None):
        return self.ce(adv_logits, y)
