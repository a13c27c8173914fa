"""``fast``: FGSM with a random start (Wong et al. 2020, "Fast is better than free").

Uniform start in the eps ball, one signed step of 1.25 eps, projected back to the ball; CE loss.
"""

from __future__ import annotations

from robust.attacks import fgsm_rs
from robust.objectives import Objective, register


@register
class Fast(Objective):
    name = "fast"
    summary = "FGSM-RS, Wong et al. 2020"
    one_step = True
    attack_text = "FGSM with a uniform random start, step 1.25 eps, projected"

    def examples(self, model, x, y):
        return fgsm_rs(model, x, y, self.eps)

    def loss(self, adv_logits, y, natural_logits=None):
        return self.ce(adv_logits, y)
