"""``nfgsm``: N-FGSM (de Jorge et al. 2022, "Make some noise", pdejorge/N-FGSM).

Noise ``U[-2 eps, 2 eps]``, one signed step of size eps and **no** projection back to the eps
ball (the example may lie up to 3 eps away; only [0, 1] is enforced); CE loss.
"""

from __future__ import annotations

from robust.attacks import nfgsm
from robust.objectives import Objective, register


@register
class NFGSM(Objective):
    name = "nfgsm"
    summary = "N-FGSM, de Jorge et al. 2022"
    one_step = True
    attack_text = "N-FGSM: noise U[-2 eps, 2 eps], one step of eps, not projected"

    def examples(self, model, x, y):
        return nfgsm(model, x, y, self.eps, noise=2 * self.eps, alpha=self.eps)

    def loss(self, adv_logits, y, natural_logits=None):
        return self.ce(adv_logits, y)
