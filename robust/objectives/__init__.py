"""Training objectives, one small class per method, and the registry that maps names to them.

An objective makes its own adversarial examples (:meth:`Objective.examples`) and returns its loss
and the logits the running accuracy counts (:meth:`Objective.loss`); everything it computes runs
through the adv route. The clean route's loss, the fused forward, AWP and the optimizer step are
the training step's business (:mod:`robust.step`), the same for every objective.

=========  ===============================  ==========================================================
name       module                           method
=========  ===============================  ==========================================================
pgd        :mod:`robust.objectives.pgd`     Madry et al. 2018: CE on PGD examples
trades     :mod:`robust.objectives.trades`  Zhang et al. 2019: CE(x) + beta * KL(f(x) || f(x_adv))
mart       :mod:`robust.objectives.mart`    Wang et al. 2020: boosted CE(x_adv) + beta * KL * (1 - p_y(x))
fast       :mod:`robust.objectives.fast`    Wong et al. 2020: CE on FGSM with a random start
nfgsm      :mod:`robust.objectives.nfgsm`   de Jorge et al. 2022: CE on noisy, unprojected FGSM
=========  ===============================  ==========================================================

``hybrid`` (the SaBN reference) is not an objective of its own: it is ``pgd`` with clean-weight 0.5.
A new method is one module with a subclass of :class:`Objective` decorated with :func:`register`
(and its name in ``robust.config.METHODS``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

OBJECTIVES: dict[str, type["Objective"]] = {}


def register(cls: type["Objective"]) -> type["Objective"]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    OBJECTIVES[cls.name] = cls
    return cls


class Objective:
    """One training method's adversarial examples and loss, on the adv route.

    ``eps``/``alpha``/``steps`` are the attack's radius, step size and steps; ``beta`` is the
    weight of a regularizer (TRADES, MART). Class attributes say what the training step needs:
    ``uses_natural`` (the loss also takes the adv route's logits of the clean input x),
    ``attack_bn`` (the BN mode its official code attacks in, used when the config leaves it open)
    and ``one_step`` (a single-step attack: the catastrophic-overfitting guard is on by default).
    """

    name: ClassVar[str]
    uses_natural: ClassVar[bool] = False
    attack_bn: ClassVar[str] = "train"
    one_step: ClassVar[bool] = False

    def __init__(self, eps: float, alpha: float, steps: int, beta: float = 6.0) -> None:
        self.eps, self.alpha, self.steps, self.beta = float(eps), float(alpha), int(steps), float(beta)

    def examples(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples of x (the caller has chosen the adv route, BN mode and precision)."""
        raise NotImplementedError

    def loss(self, adv_logits: torch.Tensor, y: torch.Tensor,
             natural_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The objective's loss (a mean over the batch) from the adv route's logits of x_adv (and of x)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:g}, alpha={self.alpha:g}, steps={self.steps}, beta={self.beta:g})"


def get_objective(name: str) -> type[Objective]:
    """The objective class called ``name`` (``hybrid`` is ``pgd``); ValueError naming the valid ones."""
    key = "pgd" if name == "hybrid" else name
    try:
        return OBJECTIVES[key]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid: hybrid, {', '.join(OBJECTIVES)}") from None


def objective_from_config(config) -> Objective:
    """The objective a :class:`robust.config.TrainConfig` trains with."""
    return get_objective(config.objective_name)(config.eps_value, config.step_size_value, config.steps,
                                                config.resolved_beta)


from . import pgd, trades, mart, fast, nfgsm  # noqa: E402,F401,I001  (each registers itself, in this order)

__all__ = ["OBJECTIVES", "Objective", "get_objective", "objective_from_config", "register"]
