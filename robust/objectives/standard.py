"""``standard``: training on clean inputs only (no attack), CE loss: a standard, non-robust model.

The teacher of ``robust pseudo-label`` (Carmon et al. 2019 label their unlabelled images with a
standard model), and the non-robust baseline. The validation attack still runs, so a run's
figures show how little robustness such a model has; best.pt is the epoch of the best natural
validation accuracy (the most robust epoch of a standard model is its least trained one).
"""

from __future__ import annotations

from robust.objectives import Objective, register


@register
class Standard(Objective):
    name = "standard"
    summary = "clean training, no attack"
    attack_text = "none (clean inputs)"
    adversarial = False

    def examples(self, model, x, y):
        return x.detach()

    def loss(self, adv_logits, y, natural_logits=None):
        return self.ce(adv_logits, y)
