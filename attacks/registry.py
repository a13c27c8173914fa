"""Attack names -> attacks: ``build_attack("pgd20", model, eps)`` returns a callable ``(x, y) -> x_adv``.

Every attack is one entry of :data:`ATTACKS`, registered by a decorator on its builder with an
:class:`AttackSpec` that holds its facts: the summary ``--help`` shows, whether its name takes a
number of steps (``pgd20``), its source, and ``params``, the settings it records, read without
building it (:func:`attack_params`). Our own PGD engine (:mod:`attacks.pgd`) serves ``fgsm``,
``pgdN`` and ``cwN``; torchattacks serves the parameter-free attacks of Croce & Hein (APGD,
APGD-T, FAB, Square and their ensemble, AutoAttack) in Linf and L2; in L1 they are ours
(:mod:`attacks.apgd`, :mod:`attacks.fab_l1` on torchattacks' FAB runs, :mod:`attacks.square_l1`). Adding an attack is one decorated builder::

    @ATTACKS.register("noise", summary="uniform noise in the ball", params=lambda s: {"draws": 1})
    def noise(model, s: AttackSettings):
        return lambda x, y: (x + torch.empty_like(x).uniform_(-s.eps, s.eps)).clamp(0, 1)

Like the rest of this package it knows nothing of :mod:`robust`: the model is any
``model(x) -> logits`` module with inputs in [0, 1]. The caller chooses the model's route and mode;
torchattacks calls ``model.eval()`` itself, so attack models that are already in eval mode.

Every attack's output should lie in the eps ball around x and in [0, 1];
:func:`check_perturbation` verifies that and raises :class:`PerturbationError` otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn as nn
import torchattacks

from .apgd import APGDSettings, apgd
from .fab_l1 import FABSettings, fab_l1
from .named import Registry, Spec, nearest
from .pgd import THREATS, EarlyStop, PGDSettings, forward_is_deterministic, fp32_predictions, get_threat, pgd_restarts, pgd_with
from .square_l1 import SquareSettings, square_l1

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# AutoAttack's "standard" settings (Croce & Hein 2020): 100 iterations for APGD and FAB.
APGD_STEPS = 100
FAB_STEPS = 100
DEFAULT_QUERIES = 5000


class PerturbationError(RuntimeError):
    """An attack returned an input outside the eps ball or outside [0, 1]: a bug, never a result."""


@dataclass(frozen=True)
class AttackSettings:
    """What the caller chose for one attack: the ball, the steps its name gives, restarts, queries, seed."""

    eps: float
    threat: str = "linf"
    steps: int | None = None  # N of a stepped name (pgd20 -> 20); None for the others
    restarts: int = 1
    queries: int = DEFAULT_QUERIES
    seed: int = 0
    num_classes: int = 10
    step_size: float | None = None  # our PGD's step; None: eps/4
    eot: int = 1  # gradients averaged over this many forwards (expectation over transformation) for randomized models


@dataclass(frozen=True)
class AttackSpec(Spec):
    """An attack's facts. ``build(model, settings)`` returns the attack: an :class:`Attack`, or a plain
    ``(x, y) -> x_adv`` function; ``params(settings)`` the settings it records (after threat, eps, source)."""

    stepped: bool = False  # the name takes a number of steps: "pgd" is written pgd20
    source: str = ""  # where its algorithm comes from: attacks.pgd, torchattacks, identity; "": the builder's module
    params: Callable[[AttackSettings], dict[str, Any]] | None = None
    slow: bool = False  # robust eval times it on a probe and says how long it will take before it starts

    def __post_init__(self) -> None:
        if not self.source:
            object.__setattr__(self, "source", str(getattr(self.build, "__module__", "")))

    @property
    def pattern(self) -> str:
        """The name as users write it: ``pgdN`` for a stepped attack, the name otherwise."""
        return f"{self.name}N" if self.stepped else self.name


ATTACKS: Registry[AttackSpec] = Registry("attack", AttackSpec)


@dataclass
class Attack:
    """A named attack: call it as ``attack(x, y) -> x_adv``; ``params`` records its settings."""

    name: str
    run: AttackFn
    params: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # an ensemble's seconds per stage, summed over calls
    on_stage: Callable[[str, int], None] | None = None  # told (stage, images) as an ensemble's stage starts, for progress
    iterations: dict[str, int] = field(default_factory=dict)  # our PGD's iterations_run/iterations_full, summed over calls

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(x, y)


# ---- names ---------------------------------------------------------------------------------------


def available_attacks() -> list[str]:
    """Every attack name (``N`` stands for the number of steps, e.g. pgd20)."""
    return [spec.pattern for spec in ATTACKS]


def attack_help() -> str:
    """``clean (no attack), fgsm (...), pgdN (...), ...`` for --attack's help, in registration order."""
    return ", ".join(f"{spec.pattern} ({spec.summary})" if spec.summary else spec.pattern for spec in ATTACKS)


def _unknown(name: str) -> ValueError:
    examples = [f"{spec.name}20" if spec.stepped else spec.name for spec in ATTACKS]
    stepped = [f"{spec.name}20" for spec in ATTACKS if spec.stepped]
    steps = f" (N = steps, e.g. {stepped[0]})" if stepped else ""
    return ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(available_attacks())}{steps}"
                      + nearest(name, examples))


def parse_attack_name(name: str) -> tuple[str, int | None]:
    """``"pgd20"`` -> ``("pgd", 20)``, ``"square"`` -> ``("square", None)``; ValueError for unknown names."""
    key = str(name).strip().lower()
    own = ATTACKS.canonical(key)
    if own is not None and not ATTACKS.get(own).stepped:
        return own, None
    for spec in ATTACKS:
        for prefix in (spec.name, *spec.aliases) if spec.stepped else ():
            digits = key[len(prefix):]
            if key.startswith(prefix) and digits.isascii() and digits.isdigit():
                if int(digits) < 1:
                    raise ValueError(f"attack {name!r} needs at least 1 step, e.g. {spec.name}20")
                return spec.name, int(digits)
    raise _unknown(str(name))


# ---- building and settings -----------------------------------------------------------------------


def attack_settings(name: str, eps: float, threat: str = "linf", restarts: int = 1, queries: int = DEFAULT_QUERIES,
                    seed: int = 0, num_classes: int = 10, step_size: float | None = None, eot: int = 1
                    ) -> tuple[AttackSpec, AttackSettings]:
    """The spec of attack ``name`` and the checked settings to build it with; ValueError naming what is wrong."""
    kind, steps = parse_attack_name(name)
    threat = get_threat(threat).name
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if restarts < 1 or queries < 1:
        raise ValueError(f"restarts and queries must be >= 1, got {restarts} and {queries}")
    if eot < 1:
        raise ValueError(f"eot (forwards averaged per gradient) must be >= 1, got {eot}")
    check_threat(kind, threat)
    return ATTACKS.get(kind), AttackSettings(eps, threat, steps, restarts, queries, seed, num_classes, step_size, eot)


def _recorded(spec: AttackSpec, settings: AttackSettings) -> dict[str, Any]:
    """What an attack records of itself: threat, eps, source, then its spec's own settings."""
    other = THREAT_VERSIONS.get((spec.name, settings.threat))
    params = other.params if other is not None else spec.params
    own = params(settings) if params is not None else {}
    source = other.source if other is not None else spec.source
    return {"threat": settings.threat, "eps": settings.eps, "source": source, **own}


def _eot(s: AttackSettings) -> dict[str, int]:
    """``{"eot": N}`` in the params of an attack that averages its gradients over N > 1 forwards (recorded only
    where it changes the attack; FAB and Square take none)."""
    return {"eot": s.eot} if s.eot > 1 else {}


def attack_params(name: str, eps: float, **settings: Any) -> dict[str, Any]:
    """The settings ``build_attack(name, model, eps, **settings)`` records in ``.params``, without building it."""
    return _recorded(*attack_settings(name, eps, **settings))


def build_attack(name: str, model: nn.Module, eps: float, threat: str = "linf", restarts: int = 1,
                 queries: int = DEFAULT_QUERIES, seed: int = 0, num_classes: int = 10,
                 step_size: float | None = None, eot: int = 1) -> Attack:
    """The attack called ``name`` against ``model`` within the ``threat`` ball of radius ``eps``.

    ``pgdN``/``cwN`` take N steps of ``step_size`` (default eps/4) from a random start, keeping
    the first of ``restarts`` runs that fools the model; ``fgsm`` is one step of size eps.
    Raises ValueError for an unknown name or threat model, naming the valid ones.
    """
    spec, settings = attack_settings(name, eps, threat, restarts, queries, seed, num_classes, step_size, eot)
    made = build_part(spec.name, model, settings)
    attack = made if isinstance(made, Attack) else Attack("", made)
    attack.name = str(name).strip().lower()
    attack.params = _recorded(spec, settings)
    return attack


# ---- our PGD engine ------------------------------------------------------------------------------


@ATTACKS.register("clean", summary="no attack", source="identity")
def _clean(model: nn.Module, s: AttackSettings) -> AttackFn:
    return lambda x, y: x.detach().clone()


@ATTACKS.register("fgsm", summary="one step of eps", source="attacks.pgd",
                  params=lambda s: {"steps": 1, "step_size": s.eps, "random_start": False, "loss": "ce", **_eot(s)})
def _fgsm(model: nn.Module, s: AttackSettings) -> AttackFn:
    """Plain FGSM (Goodfellow et al. 2015): one step of size eps from x, no random start."""
    settings = PGDSettings(s.eps, alpha=s.eps, steps=1, threat=s.threat, random_start=False, eot=s.eot)
    return lambda x, y: pgd_with(model, x, y, settings)


def _step_size(s: AttackSettings) -> float:
    return s.eps / 4 if s.step_size is None else s.step_size


def _pgd_params(loss: str) -> Callable[[AttackSettings], dict[str, Any]]:
    return lambda s: {"steps": s.steps, "step_size": _step_size(s), "random_start": True, "restarts": s.restarts,
                      "loss": loss, **_eot(s)}


def _our_pgd(model: nn.Module, s: AttackSettings, loss: str) -> Attack:
    """N steps of eps/4 from a random start, each gradient averaged over ``eot`` forwards, the first of ``restarts``
    runs that fools the model kept, stopping early (exactly) on examples whose outcome is settled when the model is
    in eval mode and its forward deterministic."""
    memo = EarlyStop()

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # exact early stop needs a step that depends on the example alone: eval mode (no batch statistics, no
        # dropout) and a forward without randomness (two forwards checked to agree; that draws nothing from the
        # random stream of a deterministic model, so its attack is the same with or without the check)
        exact = not any(m.training for m in model.modules()) and forward_is_deterministic(model, x)
        memo.reset_counts()
        x_adv = pgd_restarts(model, x, y, restarts=s.restarts, early_stop=memo if exact else None, eps=s.eps,
                             alpha=_step_size(s), steps=s.steps, threat=s.threat, random_start=True, loss=loss,
                             eot=s.eot)
        for key, n in (memo.counts() if exact else {}).items():
            attack.iterations[key] = attack.iterations.get(key, 0) + n
        return x_adv

    attack = Attack("", run)
    return attack


@ATTACKS.register("pgd", summary="N steps of eps/4 from a random start", stepped=True, source="attacks.pgd",
                  params=_pgd_params("ce"))
def _pgd(model: nn.Module, s: AttackSettings) -> Attack:
    return _our_pgd(model, s, "ce")


@ATTACKS.register("cw", summary="pgdN on the CW margin loss", stepped=True, source="attacks.pgd",
                  params=_pgd_params("cw"))
def _cw(model: nn.Module, s: AttackSettings) -> Attack:
    return _our_pgd(model, s, "cw")


# ---- torchattacks: Croce & Hein's attacks with AutoAttack's standard settings --------------------


class FloatLogits(nn.Module):
    """``model`` with its logits in fp32, for torchattacks under bf16 autocast: the forward runs in bf16,
    while the losses, their bookkeeping (some kept as numpy arrays, which have no bf16) and the step
    decisions work on fp32 logits. Its train/eval mode is the wrapped model's own, so torchattacks,
    which switches the model to eval and back to what it found, leaves the caller's mode alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    @property
    def training(self) -> bool:  # type: ignore[override]
        inner = self.__dict__.get("_modules", {}).get("inner")
        return bool(inner.training) if inner is not None else False

    @training.setter
    def training(self, mode: bool) -> None:  # the mode lives in the wrapped model (train() reaches it)
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).float()


TorchattacksMaker = Callable[[nn.Module, AttackSettings, dict[str, Any]], Any]


def torchattacks_builder(make: TorchattacksMaker) -> Callable[[nn.Module, AttackSettings], AttackFn]:
    """A builder from ``make(model, settings, common)``, which returns a torchattacks attack object given
    the fp32-logits model and the arguments every torchattacks attack takes (norm, eps, seed, verbose)."""

    def build(model: nn.Module, s: AttackSettings) -> AttackFn:
        norm = {"linf": "Linf", "l2": "L2"}[s.threat]
        atk = make(FloatLogits(model), s, dict(norm=norm, eps=s.eps, seed=s.seed, verbose=False))

        def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if s.eps == 0:  # torchattacks divides by eps in places; at eps 0 the only input is x itself
                return x.detach().clone()
            return atk(x, y).detach()

        return run

    return build


def _torchattacks_params(**facts: Callable[[AttackSettings], Any]) -> Callable[[AttackSettings], dict[str, Any]]:
    """restarts and seed, then ``facts`` (each a function of the settings, read when asked)."""
    return lambda s: {"restarts": s.restarts, "seed": s.seed, **{k: f(s) for k, f in facts.items()}}


def _targets(s: AttackSettings) -> int:
    return s.num_classes - 1


def _with_eot(params: Callable[[AttackSettings], dict[str, Any]]) -> Callable[[AttackSettings], dict[str, Any]]:
    """``params`` plus APGD's ``eot_iter`` as the "eot" :func:`_eot` records."""
    return lambda s: {**params(s), **_eot(s)}


@ATTACKS.register("apgd-ce", summary="APGD, CE loss", source="torchattacks",
                  slow=True, params=_with_eot(_torchattacks_params(steps=lambda s: APGD_STEPS, loss=lambda s: "ce")))
@torchattacks_builder
def _apgd_ce(model: nn.Module, s: AttackSettings, common: dict[str, Any]) -> Any:
    return torchattacks.APGD(model, steps=APGD_STEPS, n_restarts=s.restarts, loss="ce", eot_iter=s.eot, **common)


@ATTACKS.register("apgd-dlr", summary="APGD, DLR loss", source="torchattacks", slow=True,
                  params=_with_eot(_torchattacks_params(steps=lambda s: APGD_STEPS, loss=lambda s: "dlr")))
@torchattacks_builder
def _apgd_dlr(model: nn.Module, s: AttackSettings, common: dict[str, Any]) -> Any:
    return torchattacks.APGD(model, steps=APGD_STEPS, n_restarts=s.restarts, loss="dlr", eot_iter=s.eot, **common)


@ATTACKS.register("apgd-t", summary="targeted APGD", source="torchattacks",
                  slow=True, params=_with_eot(_torchattacks_params(steps=lambda s: APGD_STEPS,
                                                                   loss=lambda s: "targeted dlr", target_classes=_targets)))
@torchattacks_builder
def _apgd_t(model: nn.Module, s: AttackSettings, common: dict[str, Any]) -> Any:
    return torchattacks.APGDT(model, steps=APGD_STEPS, n_restarts=s.restarts, n_classes=s.num_classes,
                              eot_iter=s.eot, **common)


@ATTACKS.register("fab", summary="FAB, minimal perturbation", source="torchattacks", slow=True,
                  params=_torchattacks_params(steps=lambda s: FAB_STEPS))
@torchattacks_builder
def _fab(model: nn.Module, s: AttackSettings, common: dict[str, Any]) -> Any:
    return torchattacks.FAB(model, steps=FAB_STEPS, n_restarts=s.restarts, multi_targeted=False,
                            n_classes=s.num_classes, **common)


@ATTACKS.register("fab-t", summary="targeted FAB", source="torchattacks", slow=True,
                  params=_torchattacks_params(target_classes=_targets, steps=lambda s: FAB_STEPS))
@torchattacks_builder
def _fab_t(model: nn.Module, s: AttackSettings, common: dict[str, Any]) -> Any:
    return torchattacks.FAB(model, steps=FAB_STEPS, n_restarts=s.restarts, multi_targeted=True,
                            n_classes=s.num_classes, **common)


@ATTACKS.register("square", summary="black-box, --queries", source="torchattacks", slow=True,
                  params=_torchattacks_params(queries=lambda s: s.queries, p_init=lambda s: 0.8,
                                              resc_schedule=lambda s: False))
@torchattacks_builder
def _square(model: nn.Module, s: AttackSettings, common: dict[str, Any]) -> Any:
    # the official standard version's Square: no rescaled schedule (torchattacks' default is True)
    return torchattacks.Square(model, n_queries=s.queries, n_restarts=s.restarts, p_init=0.8, loss="margin",
                               resc_schedule=False, **common)


# ---- threat models: which attacks serve which, and our own APGD where torchattacks has none -------


@dataclass(frozen=True)
class ThreatVersion:
    """An attack's builder, recorded settings and source for a threat model its registered builder does not serve."""

    build: Callable[[nn.Module, AttackSettings], Any]
    params: Callable[[AttackSettings], dict[str, Any]]
    source: str = "attacks.apgd"


# the threats a registered builder serves, where not every threat model: torchattacks has no L1 APGD or Square
# and its FAB driver fails in L1 (torchattacks 3.5.1, fab.py: `res` unset for L1), so their L1 versions are
# ours (THREAT_VERSIONS); the official AutoAttack has its plus version for Linf and L2 only
OWN_THREATS: dict[str, tuple[str, ...]] = {name: ("linf", "l2") for name in (
    "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square", "autoattack-plus")}


def served_threats(name: str) -> tuple[str, ...]:
    """The threat models attack ``name`` (a registered name) takes."""
    own = OWN_THREATS.get(name, tuple(THREATS))
    return tuple(t for t in THREATS if t in own or (name, t) in THREAT_VERSIONS)


def check_threat(name: str, threat: str) -> None:
    """ValueError in one line when attack ``name`` has no version for ``threat``."""
    served = served_threats(name)
    if threat not in served:
        raise ValueError(f"attack {name!r} has no {threat} version; its threat models: {', '.join(served)}")


def build_part(name: str, model: nn.Module, s: AttackSettings) -> Any:
    """Attack ``name`` (registered) built for ``s.threat``: its own builder, or the threat's version of it."""
    check_threat(name, s.threat)
    other = THREAT_VERSIONS.get((name, s.threat))
    return other.build(model, s) if other is not None else ATTACKS.get(name).build(model, s)


L1_APGD_TARGETS = 5  # the official L1 standard version's APGD-T target classes
L1_APGD_RESTARTS = 5  # and its APGD-CE restarts
L1_FAB_TARGETS = 9  # and its FAB-T target classes


def _apgd_settings(s: AttackSettings, loss: str, **official: Any) -> APGDSettings:
    """Our APGD's settings: 100 steps, the larger-eps schedule in L1 (the official L1 APGD), ``official``'s overrides."""
    base = dict(eps=s.eps, threat=s.threat, loss=loss, steps=APGD_STEPS, restarts=s.restarts,
                target_classes=_targets(s), eot=s.eot, seed=s.seed, larger_eps=s.threat == "l1")
    return APGDSettings(**{**base, **official})


def own_apgd(loss: str, **official: Any) -> ThreatVersion:
    """Our APGD (:mod:`attacks.apgd`) on ``loss``, with its recorded settings."""

    def build(model: nn.Module, s: AttackSettings) -> AttackFn:
        settings = _apgd_settings(s, loss, **official)
        return lambda x, y: apgd(model, x, y, settings)

    def params(s: AttackSettings) -> dict[str, Any]:
        a = _apgd_settings(s, loss, **official)
        targets = {"target_classes": a.target_classes} if loss == "dlr-targeted" else {}
        eot = {"eot": a.eot} if a.eot > 1 else {}
        return {"restarts": a.restarts, "seed": a.seed, "steps": a.steps, "loss": loss.replace("-", " "),
                "larger_eps": a.larger_eps, **targets, **eot}

    return ThreatVersion(build, params)


def _fab_settings(s: AttackSettings, targeted: bool, **official: Any) -> FABSettings:
    """FAB's L1 settings: 100 iterations, ``s``'s restarts, FAB-T towards ``num_classes - 1`` classes, ``official``'s overrides."""
    base = dict(eps=s.eps, steps=FAB_STEPS, restarts=s.restarts, target_classes=_targets(s) if targeted else None,
                seed=s.seed, num_classes=s.num_classes)
    return FABSettings(**{**base, **official})


def own_fab(targeted: bool, **official: Any) -> ThreatVersion:
    """FAB or FAB-T in L1 (:mod:`attacks.fab_l1`: torchattacks' single runs, our driver), with its recorded settings."""

    def build(model: nn.Module, s: AttackSettings) -> AttackFn:
        settings, wrapped = _fab_settings(s, targeted, **official), FloatLogits(model)
        return lambda x, y: fab_l1(wrapped, x, y, settings)

    def params(s: AttackSettings) -> dict[str, Any]:
        f = _fab_settings(s, targeted, **official)
        targets = {"target_classes": f.target_classes} if targeted else {}
        return {"restarts": f.restarts, "seed": f.seed, "steps": f.steps, **targets}

    return ThreatVersion(build, params, source="attacks.fab_l1")


def _square_settings(s: AttackSettings, **official: Any) -> SquareSettings:
    """Square's L1 settings: ``s``'s queries and restarts, p_init 0.8, ``official``'s overrides."""
    return SquareSettings(**{**dict(eps=s.eps, queries=s.queries, p_init=0.8, restarts=s.restarts, seed=s.seed),
                             **official})


def own_square(**official: Any) -> ThreatVersion:
    """Square in L1 (:mod:`attacks.square_l1`), with its recorded settings."""

    def build(model: nn.Module, s: AttackSettings) -> AttackFn:
        settings = _square_settings(s, **official)
        return lambda x, y: square_l1(model, x, y, settings)

    def params(s: AttackSettings) -> dict[str, Any]:
        q = _square_settings(s, **official)
        return {"restarts": q.restarts, "seed": q.seed, "queries": q.queries, "p_init": q.p_init, "resc_schedule": False}

    return ThreatVersion(build, params, source="attacks.square_l1")


THREAT_VERSIONS: dict[tuple[str, str], ThreatVersion] = {
    ("apgd-ce", "l1"): own_apgd("ce"), ("apgd-dlr", "l1"): own_apgd("dlr"), ("apgd-t", "l1"): own_apgd("dlr-targeted"),
    ("fab", "l1"): own_fab(targeted=False), ("fab-t", "l1"): own_fab(targeted=True), ("square", "l1"): own_square(),
}


# ---- AutoAttack's versions: one ensemble runner, each version a list of parts ----------------------


def ensemble(model: nn.Module, parts: list[tuple[str, AttackFn]]) -> Attack:
    """Each part in turn on the examples still robust (verdicts in fp32); seconds per stage in ``stage_seconds``."""

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x.detach().clone()
        alive = fp32_predictions(model, x) == y
        for part, attack in parts:
            idx = alive.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            if made.on_stage is not None:
                made.on_stage(part, len(idx))
            start = time.perf_counter()
            candidate = attack(x[idx], y[idx])
            fooled = fp32_predictions(model, candidate) != y[idx]  # a stage's verdict is fp32 whatever it searched in
            x_adv[idx[fooled]] = candidate[fooled]
            alive[idx[fooled]] = False
            made.stage_seconds[part] = made.stage_seconds.get(part, 0.0) + time.perf_counter() - start
        return x_adv

    made = Attack("", run)
    return made


AUTOATTACK_PARTS = ("apgd-ce", "apgd-t", "fab-t", "square")
PLUS_PARTS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
PLUS_RESTARTS = 5  # the plus version's restarts of APGD-CE, APGD-DLR and FAB
RAND_EOT = 20  # the rand version's forwards per gradient


def _standard_parts(s: AttackSettings) -> list[tuple[str, AttackSettings | ThreatVersion]]:
    """The official standard version: Linf/L2 APGD-CE (1 restart), APGD-T (9 targets), FAB-T, Square; L1 APGD-CE
    with 5 restarts and APGD-T with 5 targets, both on the larger-eps schedule, FAB-T with 9 targets and Square
    (5000 queries), all four ours in L1."""
    if s.threat != "l1":
        return [(part, s) for part in AUTOATTACK_PARTS]
    return [("apgd-ce", own_apgd("ce", restarts=max(L1_APGD_RESTARTS, s.restarts))),
            ("apgd-t", own_apgd("dlr-targeted", target_classes=L1_APGD_TARGETS, restarts=1)),
            ("fab-t", own_fab(targeted=True, target_classes=min(L1_FAB_TARGETS, _targets(s)))),
            ("square", own_square())]


def _plus_parts(s: AttackSettings) -> list[tuple[str, AttackSettings | ThreatVersion]]:
    """The official plus version (Linf, L2): APGD-CE, APGD-DLR, FAB (5 restarts each), Square, APGD-T, FAB-T (9 targets)."""
    more = replace(s, restarts=max(PLUS_RESTARTS, s.restarts))
    return [(part, more if part in ("apgd-ce", "apgd-dlr", "fab") else replace(s, restarts=1)) for part in PLUS_PARTS]


def _rand_parts(s: AttackSettings) -> list[tuple[str, AttackSettings | ThreatVersion]]:
    """The official rand version: APGD-CE and APGD-DLR, 1 restart, 20 forwards per gradient (ours, every threat;
    in L1 without the larger-eps schedule, as the official rand version runs it)."""
    official = dict(restarts=1, eot=max(RAND_EOT, s.eot), larger_eps=False)
    return [("apgd-ce", own_apgd("ce", **official)), ("apgd-dlr", own_apgd("dlr", **official))]


VERSIONS: dict[str, Callable[[AttackSettings], list[tuple[str, AttackSettings | ThreatVersion]]]] = {
    "standard": _standard_parts, "plus": _plus_parts, "rand": _rand_parts}


def _build_version(version: str, model: nn.Module, s: AttackSettings) -> Attack:
    parts = []
    for part, how in VERSIONS[version](s):
        parts.append((part, how.build(model, s) if isinstance(how, ThreatVersion) else build_part(part, model, how)))
    return ensemble(model, parts)


def _version_params(version: str) -> Callable[[AttackSettings], dict[str, Any]]:
    """What a version records: its parts, each with its own recorded settings."""

    def params(s: AttackSettings) -> dict[str, Any]:
        parts = {}
        for part, how in VERSIONS[version](s):
            if isinstance(how, ThreatVersion):
                parts[part] = {"source": how.source, **how.params(s)}
            else:
                spec = ATTACKS.get(part)
                other = THREAT_VERSIONS.get((part, how.threat))
                parts[part] = {"source": other.source if other else spec.source,
                               **(other.params if other else spec.params)(how)}
        return {"version": version, "parts": list(parts), "restarts": s.restarts, "seed": s.seed, "steps": APGD_STEPS,
                "queries": s.queries, "settings": parts}

    return params


@ATTACKS.register("autoattack", summary="standard version: APGD-CE, APGD-T, FAB-T, Square",
                  source="torchattacks", slow=True, params=_version_params("standard"))
def _autoattack(model: nn.Module, s: AttackSettings) -> Attack:
    """AutoAttack, standard version: each part run on the survivors of the ones before.

    Linf and L2 from torchattacks' components with AutoAttack's own settings (100 iterations, 9 target
    classes, 5000 queries; torchattacks.AutoAttack itself uses 10 iterations); L1 with our APGD, FAB driver
    and Square, with the official L1 settings.
    """
    return _build_version("standard", model, s)


@ATTACKS.register("autoattack-plus", summary="plus version: APGD-CE, APGD-DLR, FAB, Square, APGD-T, FAB-T",
                  source="torchattacks", slow=True, params=_version_params("plus"))
def _autoattack_plus(model: nn.Module, s: AttackSettings) -> Attack:
    """AutoAttack, plus version (Linf, L2): 5 restarts of APGD-CE, APGD-DLR and FAB, then Square, APGD-T, FAB-T."""
    return _build_version("plus", model, s)


@ATTACKS.register("autoattack-rand", summary="rand version: APGD-CE, APGD-DLR, 20 EOT forwards",
                  source="attacks.apgd", slow=True, params=_version_params("rand"))
def _autoattack_rand(model: nn.Module, s: AttackSettings) -> Attack:
    """AutoAttack, rand version for randomized models: APGD-CE and APGD-DLR averaging 20 forwards per gradient."""
    return _build_version("rand", model, s)


# ---- the one check every attack's output passes ----------------------------------------------------


def check_perturbation(x: torch.Tensor, x_adv: torch.Tensor, eps: float, threat: str = "linf",
                       tol: float = 1e-6, name: str = "attack") -> None:
    """Raise PerturbationError unless every ``x_adv`` is finite, in [0, 1] and within eps of ``x``."""
    if x_adv.shape != x.shape:
        raise PerturbationError(f"{name} returned shape {tuple(x_adv.shape)} for inputs of shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x_adv).all()):
        raise PerturbationError(f"{name} returned non-finite inputs")
    low, high = x_adv.min().item(), x_adv.max().item()
    if low < -tol or high > 1 + tol:
        raise PerturbationError(f"{name} left [0, 1]: inputs range over [{low:.6g}, {high:.6g}]")
    distance = get_threat(threat).distance((x_adv - x).float()).max().item()
    if distance > eps + tol * max(1.0, eps):
        raise PerturbationError(f"{name} left the {threat} ball: distance {distance:.8g} > eps {eps:.8g}")
