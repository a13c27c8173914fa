"""Training objectives, one small class per method, and the registry that maps names to them.

An objective makes its own adversarial examples (:meth:`Objective.examples`) and returns its loss
and the logits the running accuracy counts (:meth:`Objective.loss`); everything it computes runs
through the adv route. The clean route's loss, the fused forward, AWP and the optimizer step are
the training step's business (:mod:`robust.train.step`), the same for every objective.

=========  ===============================  ==========================================================
name       module                           method
=========  ===============================  ==========================================================
pgd        :mod:`robust.objectives.pgd`     Madry et al. 2018: CE on PGD examples
trades     :mod:`robust.objectives.trades`  Zhang et al. 2019: CE(x) + beta * KL(f(x) || f(x_adv))
mart       :mod:`robust.objectives.mart`    Wang et al. 2020: boosted CE(x_adv) + beta * KL * (1 - p_y(x))
fast       :mod:`robust.objectives.fast`    Wong et al. 2020: CE on FGSM with a random start
nfgsm      :mod:`robust.objectives.nfgsm`   de Jorge et al. 2022: CE on noisy, unprojected FGSM
=========  ===============================  ==========================================================

Each class is the one source of its method's facts: its ``name`` and ``aliases`` (``hybrid`` is
``pgd`` with clean-weight 0.5 by default), its ``options`` (each with a default, help text and
checks: TRADES's and MART's ``beta``), ``one_step`` (the catastrophic-overfitting guard is on by
default) and ``attack_bn`` (the BN mode its official code attacks in). The config's choices, the
CLI's flags and help and the training step follow from the registry: a new method is one module
with a subclass of :class:`Objective` decorated with :func:`register`, imported before use.

:func:`register` records the class in :data:`OBJECTIVE_SPECS`, the project's one registry shape (an
:class:`ObjectiveSpec` per method: ``build`` is the class, ``summary`` and ``aliases`` its own).
``OBJECTIVES`` (name -> class) and ``ALIASES`` (alias -> name) are views of that registry.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from robust.attacks.named import Registry, Spec
from robust.checks import check_value, split_list
from robust.errors import ConfigError, did_you_mean
from robust.threat import parse_fraction


@dataclass(frozen=True)
class ObjectiveSpec(Spec):
    """A training method: ``build`` is its :class:`Objective` subclass, whose class attributes hold the method's
    other facts (options, attack BN mode, one-step, the settings each alias implies)."""


OBJECTIVE_SPECS: Registry[ObjectiveSpec] = Registry("method", ObjectiveSpec, error=ConfigError)


class ObjectiveTable(MutableMapping):
    """``OBJECTIVES``: each registered method's own name -> its class, in registration order. Deleting a name
    unregisters the method; its aliases stay in ``ALIASES`` until deleted there (as a test's clean-up does)."""

    def __getitem__(self, name: str) -> type["Objective"]:
        if name not in OBJECTIVE_SPECS.names():
            raise KeyError(name)
        return OBJECTIVE_SPECS.get(name).build

    def __iter__(self) -> Iterator[str]:
        return iter(OBJECTIVE_SPECS.names())

    def __len__(self) -> int:
        return len(OBJECTIVE_SPECS)

    def __setitem__(self, name: str, cls: type["Objective"]) -> None:
        raise TypeError("register an objective with the @register class decorator")

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        aliases = OBJECTIVE_SPECS.get(name).aliases
        OBJECTIVE_SPECS.remove(name)
        _left_aliases.update({alias: name for alias in aliases})


class AliasTable(MutableMapping):
    """``ALIASES``: alias -> objective name (``hybrid`` -> ``pgd``), read from the registry; an alias of an
    objective deleted from ``OBJECTIVES`` stays until it is deleted here, and keeps its name taken."""

    def _table(self) -> dict[str, str]:
        return {alias: spec.name for spec in OBJECTIVE_SPECS for alias in spec.aliases} | _left_aliases

    def __getitem__(self, alias: str) -> str:
        return self._table()[alias]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __setitem__(self, alias: str, name: str) -> None:
        raise TypeError("an alias is declared in its objective's class (aliases = {...})")

    def __delitem__(self, alias: str) -> None:
        if alias not in _left_aliases:
            raise TypeError(f"{alias!r} is an alias of a registered objective; delete the objective first")
        del _left_aliases[alias]


_left_aliases: dict[str, str] = {}  # aliases of objectives deleted from OBJECTIVES, not yet deleted from ALIASES
OBJECTIVES = ObjectiveTable()
ALIASES = AliasTable()
ATTACK_BN_MODES = ("train", "eval", "frozen")  # frozen: batch statistics, running statistics left as they were


@dataclass(frozen=True)
class Option:
    """One hyperparameter an objective declares: its default, help text and range (as config fields have)."""

    default: float | int
    help: str
    min: float | None = None
    max: float | None = None

    def check(self, name: str, value: Any) -> float | int:
        """``value`` (a number, or text like ``6`` or ``1/2``) as the option's type, checked against its range."""
        kind = type(self.default)
        if isinstance(value, str):
            value = parse_fraction(value, name) if kind is float else _parse_int(name, value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        meta = {k: v for k, v in (("min", self.min), ("max", self.max)) if v is not None}
        return check_value(name, kind.__name__, meta, value)


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got the text {text!r}") from None


def register(cls: type["Objective"]) -> type["Objective"]:
    """Class decorator: record ``cls`` in :data:`OBJECTIVE_SPECS` under ``cls.name`` and each of its aliases."""
    for name in (cls.name, *cls.aliases):
        if name in OBJECTIVE_SPECS or name in ALIASES:
            raise ValueError(f"method name {name!r} is taken")
    return OBJECTIVE_SPECS.register(cls.name, summary=cls.summary, aliases=tuple(cls.aliases))(cls)


class Objective:
    """One training method's adversarial examples and loss, on the adv route.

    ``eps``/``alpha``/``steps`` are the attack's radius, step size and steps; ``label_smoothing``
    applies to every cross-entropy on labels in the loss (:meth:`ce`; not to a KL term, nor to the
    attack's own loss); the class's declared ``options`` come as keywords (missing ones take their defaults) and become attributes. Class
    attributes say what the training step needs: ``uses_natural`` (the loss also takes the adv
    route's logits of the clean input x), ``attack_bn`` (the BN mode its official code attacks in,
    used when the config leaves it open), ``one_step`` (a single-step attack: the catastrophic-
    overfitting guard is on by default), ``adversarial`` (it trains on adversarial examples; a method that
    does not keeps as best.pt its most accurate epoch, not its most robust) and ``aliases`` (other names,
    each with the step settings it implies, e.g. ``{"hybrid": {"clean_weight": 0.5}}``).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""  # who proposed it, for --help (e.g. "Madry et al. 2018")
    uses_natural: ClassVar[bool] = False
    attack_bn: ClassVar[str] = "train"
    one_step: ClassVar[bool] = False
    adversarial: ClassVar[bool] = True
    options: ClassVar[Mapping[str, Option]] = {}
    attack_text: ClassVar[str] = "Linf PGD-{steps}"  # the training attack in words ({steps} filled in)
    aliases: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __init__(self, eps: float, alpha: float, steps: int, label_smoothing: float = 0.0, **options: Any) -> None:
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.label_smoothing = float(label_smoothing)
        for name, value in self.checked_options(options).items():
            setattr(self, name, value)

    def ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The cross-entropy on labels every loss uses, with the run's label smoothing (in fp32); ``y`` holds
        class indices (B,) or per-class probabilities (B, classes)."""
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    @classmethod
    def checked_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every declared option: the given value checked, or its default; ConfigError for an unknown name."""
        unknown = sorted(set(given) - set(cls.options))
        if unknown:
            known = ", ".join(cls.options) or "none"
            raise ConfigError(f"method {cls.name} has no option {', '.join(unknown)}; its options: {known}")
        return {name: option.check(name, given[name]) if name in given else option.default
                for name, option in cls.options.items()}

    @classmethod
    def describe_attack(cls, steps: int) -> str:
        """The training attack in words, for reports."""
        return cls.attack_text.format(steps=steps)

    def examples(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples of x (the caller has chosen the adv route, BN mode and precision)."""
        raise NotImplementedError

    def loss(self, adv_logits: torch.Tensor, y: torch.Tensor,
             natural_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The objective's loss (a mean over the batch) from the adv route's logits of x_adv (and of x)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        extra = "".join(f", {name}={getattr(self, name):g}" for name in self.options)
        return f"{type(self).__name__}(eps={self.eps:g}, alpha={self.alpha:g}, steps={self.steps}{extra})"


def hard_labels(y: torch.Tensor) -> torch.Tensor:
    """Class indices from labels given as indices (B,) or as per-class probabilities (B, classes)
    (soft labels of extra data): what an attack maximizes the loss of, and what accuracy counts."""
    return y.argmax(1) if y.dim() == 2 else y


def method_names() -> tuple[str, ...]:
    """Every name ``--method`` takes: each objective followed by its aliases, in registration order."""
    return OBJECTIVE_SPECS.all_names()


def methods_help() -> str:
    """Every method name with its summary, for --help: ``pgd (Madry et al. 2018), hybrid (pgd with clean_weight 0.5), ...``."""
    parts = []
    for spec in OBJECTIVE_SPECS:
        parts.append(f"{spec.name} ({spec.summary})" if spec.summary else spec.name)
        for alias, settings in spec.build.aliases.items():
            implied = ", ".join(f"{k} {v:g}" for k, v in settings.items())
            parts.append(f"{alias} ({spec.name} with {implied})" if implied else alias)
    return ", ".join(parts)


def get_objective(name: str) -> type[Objective]:
    """The objective class called ``name`` or aliased so (``hybrid`` is ``pgd``); ConfigError (a ValueError) naming
    the valid ones."""
    if name not in OBJECTIVE_SPECS:
        valid = [*ALIASES, *OBJECTIVES]
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(valid)}{did_you_mean(name, valid)}")
    return OBJECTIVE_SPECS.get(name).build


def alias_settings(name: str) -> Mapping[str, Any]:
    """The step settings a method name implies (``hybrid``: clean-weight 0.5); empty for an objective's own name."""
    return get_objective(name).aliases.get(name, {})


def parse_method_options(text: str | None) -> dict[str, str]:
    """``"beta=6,gamma=0.1"`` -> ``{"beta": "6", "gamma": "0.1"}`` (values checked by the objective)."""
    options: dict[str, str] = {}
    for part in split_list("method-options", text) if text else []:
        name, eq, value = part.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise ConfigError(f"method-options {text!r}: write NAME=VALUE pairs separated by commas, e.g. beta=6")
        key = name.strip().replace("-", "_")
        if key in options:
            raise ConfigError(f"method-options {text!r} gives {key} twice; give each option once")
        options[key] = value.strip()
    return options


def all_options() -> dict[str, tuple[Option, list[str]]]:
    """Every option any registered objective declares, with the methods declaring it (for the CLI's flags)."""
    out: dict[str, tuple[Option, list[str]]] = {}
    for spec in OBJECTIVE_SPECS:
        cls = spec.build
        for name, option in cls.options.items():
            out.setdefault(name, (option, []))[1].append(cls.name)
    return out


from robust.objectives import pgd, trades, mart, fast, nfgsm, standard  # noqa: E402, F401  # isort: skip  (each registers itself, in this order)

# The order of registration is the order of --method's choices: pgd first, as the default.
METHODS = method_names()

__all__ = ["ALIASES", "ATTACK_BN_MODES", "METHODS", "OBJECTIVES", "OBJECTIVE_SPECS", "Objective", "ObjectiveSpec",
           "Option", "alias_settings",
           "all_options", "get_objective", "method_names", "methods_help", "parse_method_options", "register"]
