"""An evaluation's plan: every setting of ``robust.evaluate`` and ``robust eval``, checked once, frozen.

:class:`EvalPlan` holds what is attacked and how (attacks, eps as a number, threat, route, batch size,
limit, device, seed, restarts, EOT forwards, repeats, queries, attack precision, processes and threads,
per-example verdicts, progress), with the state file (:class:`StateFile`) and the common corruptions (:class:`CorruptionPlan`)
as sub-plans. Each field is checked when the plan is made, by the machinery that checks a training
config's fields (:func:`robust.checks.check_fields`: its annotation and its metadata), then by the rules
that tie fields together; a bad value is a one-line ConfigError naming it. What depends on the model or
the images (a route the model lacks, more processes than images) is checked when the evaluation starts.

``EvalPlan.build(**keywords)`` takes the keywords of ``robust.evaluate`` as a user writes them (eps as
text like ``8/255``, attacks as ``"pgd20,autoattack"``, ``state``/``resume``/``force``,
``corruptions``/``severities``/``corruptions_dir``) and returns the plan.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from robust.attacks.registry import check_threat, parse_attack_name
from robust.checks import MAX_SEED, check_fields, split_list
from robust.data.corruptions import check_corruption_names, check_severities, official_layout
from robust.errors import ConfigError
from robust.eval.accuracy import ATTACK_PRECISIONS
from robust.nn.norms import ROUTES
from robust.runtime import THREADS_RANGE
from robust.threat import THREATS, resolve_eps

ROUTE_CHOICES = (*ROUTES, "both")
ALL_SEVERITIES = (1, 2, 3, 4, 5)


def _f(default: Any, help: str, **checks: Any):
    """A plan field with its help text and the checks :func:`robust.checks.check_value` applies."""
    return field(default=default, metadata={"help": help, **checks})


def check_attack_names(attacks: Iterable[str] | str) -> list[str]:
    """Normalized, de-duplicated attack names; ConfigError listing the valid ones for an unknown name."""
    names = split_list("attack", attacks) if isinstance(attacks, str) else list(attacks)
    out: list[str] = []
    for name in names:
        if not str(name).strip():
            continue
        if not str(name).isascii():
            raise ConfigError(f"attack {str(name).strip()!r} has characters that are not ASCII; write its name "
                              "with the letters and digits 0-9, e.g. pgd20")
        try:
            parse_attack_name(str(name))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        key = str(name).strip().lower()
        if key not in out:
            out.append(key)
    if not out:
        raise ConfigError("no attack given; pass e.g. --attack pgd20 or --attack pgd20,autoattack")
    return out


def _checked(plan: Any) -> None:
    """Check every field of the frozen dataclass ``plan`` against its annotation and metadata; keep the checked
    values (a path-like becomes its text)."""
    for name, value in check_fields(type(plan), {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}).items():
        object.__setattr__(plan, name, value)


@dataclass(frozen=True)
class StateFile:
    """Where an evaluation keeps its verdicts after each attack on each batch, and what to do with the file there."""

    path: str = field(metadata={"help": "the state file (written atomically after each attack on each batch)",
                                "kind": "path", "label": "state"})
    resume: bool = _f(False, "finish the evaluation the file holds, running only what it lacks")
    force: bool = _f(False, "start the file again although it exists")

    def __post_init__(self) -> None:
        _checked(self)


@dataclass(frozen=True)
class CorruptionPlan:
    """The common corruptions to score: their names, severities and the official files' folder (None: generated)."""

    names: tuple[str, ...] = _f(("all",), "corruption names, or all")
    severities: tuple[int, ...] = _f(ALL_SEVERITIES, "severities among 1..5")
    folder: str | None = _f(None, "the official CIFAR-10-C/CIFAR-100-C or ImageNet-C files", kind="path")
    classes: tuple[str, ...] | None = _f(None, "ImageNet-C: the model's class names, in its order "
                                               "[default: the sorted class folders]")

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(check_corruption_names(self.names)))
        object.__setattr__(self, "severities", tuple(check_severities(self.severities)))
        _checked(self)
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
        if self.folder is not None:  # refused before any work when the files are not there
            official_layout(self.folder, self.names)


@dataclass(frozen=True)
class EvalPlan:
    """Every setting of one evaluation, checked when made (see the module's docstring); build one with
    :meth:`build` from ``robust.evaluate``'s keywords. ``eps`` None means "not known yet": ``robust eval``
    fills it with the checkpoint's training eps (:meth:`at_eps`); an evaluation refuses it."""

    eps: float | None = _f(None, "attack radius in pixel units (a number; build() also reads text like 8/255)")
    attacks: tuple[str, ...] = _f(("pgd20",), "attack names, in the order they run")
    threat: str = _f("linf", "threat model", choices=THREATS)
    route: str | None = _f(None, "route to attack and score [default: both of a dual-route model]",
                           choices=ROUTE_CHOICES)
    batch_size: int = _f(256, "images per chunk at most", min=1)
    limit: int | None = _f(None, "evaluate the first N examples only", min=1)
    device: str | None = _f(None, "auto, cpu or cuda [default: auto]")
    seed: int = _f(0, "seed of the attacks' random starts", min=0, max=MAX_SEED)
    restarts: int = _f(1, "random restarts per attack", min=1)
    eot: int = _f(1, "gradient attacks: each gradient the mean over this many forwards (expectation over "
                     "transformation), for a randomized model", min=1, label="--eot")
    repeats: int = _f(1, "the whole evaluation run this many times with seeds seed, seed+1, ...; an example is robust "
                         "only if it survives every repeat (a deterministic model runs once)", min=1, label="--repeats")
    queries: int = _f(5000, "Square: query budget", min=1)
    attack_precision: str = _f("auto", "precision of the attacks' iterations", choices=ATTACK_PRECISIONS)
    jobs: int = _f(1, "processes the chunks are split across", min=1, label="--jobs")
    threads: int | None = _f(None, "torch threads per process [default: CPUs / jobs]", **THREADS_RANGE)
    per_example: bool = _f(False, "also return each example's verdicts")
    progress: bool = _f(False, "progress bars (or heartbeat lines)")
    across_ranks: bool = _f(True, "under torchrun, share the chunks among the ranks")
    state: StateFile | None = _f(None, "the state file, for a resumable evaluation")
    corruptions: CorruptionPlan | None = _f(None, "the common corruptions to score as well")

    def __post_init__(self) -> None:
        if self.eps is not None:  # a number in the threat model's range (its text read first)
            object.__setattr__(self, "eps", resolve_eps(self.eps, self.threat))
        object.__setattr__(self, "attacks", tuple(check_attack_names(self.attacks)))
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        _checked(self)
        for name in self.attacks:
            try:
                check_threat(parse_attack_name(name)[0], self.threat)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.repeats > 1 and self.state is not None:
            raise ConfigError("--state keeps the verdicts of one pass; drop --state or --repeats")
        if self.seed + self.repeats - 1 > MAX_SEED:
            raise ConfigError(f"--seed {self.seed} with --repeats {self.repeats} runs seeds above {MAX_SEED}; "
                              "choose a smaller --seed")
        for name, kind in (("state", StateFile), ("corruptions", CorruptionPlan)):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} of an EvalPlan must be a {kind.__name__} or None, got "
                                  f"{type(getattr(self, name)).__name__}")

    @classmethod
    def build(cls, state: str | os.PathLike[str] | None = None, resume: bool = False, force: bool = False,
              corruptions: Iterable[str] | str | None = None, severities: Iterable[int] | str = ALL_SEVERITIES,
              corruptions_dir: str | os.PathLike[str] | None = None, **settings: Any) -> "EvalPlan":
        """The plan of ``robust.evaluate``'s keywords: ``settings`` are the plan's own fields; ``state``, ``resume``
        and ``force`` make its :class:`StateFile`, ``corruptions``, ``severities`` and ``corruptions_dir`` its
        :class:`CorruptionPlan`. An unknown keyword is refused, naming the valid ones."""
        own = {f.name for f in dataclasses.fields(cls)} - {"state", "corruptions"}
        unknown = sorted(set(settings) - own)
        if unknown:
            valid = sorted(own | {"state", "resume", "force", "corruptions", "severities", "corruptions_dir"})
            raise ConfigError(f"unknown evaluation setting(s): {', '.join(unknown)}; valid: {', '.join(valid)}")
        if resume and state is None:
            raise ConfigError("--resume needs --state FILE, the state file of the evaluation to finish")
        if state is not None:
            settings["state"] = StateFile(state, resume, force)
        if corruptions is not None:
            folder = None if corruptions_dir is None else os.fspath(corruptions_dir)
            settings["corruptions"] = CorruptionPlan(corruptions, severities, folder)
        return cls(**settings)

    def at_eps(self, eps: float | str) -> "EvalPlan":
        """This plan at radius ``eps`` (text like 8/255 or a number, read for the plan's threat)."""
        return dataclasses.replace(self, eps=eps)  # __post_init__ reads and checks it

    def again(self, attacks: Iterable[str] | str, eps: float | str) -> "EvalPlan":
        """The same settings with other attacks at another eps, without the state file, the corruptions and the
        per-example verdicts: the extra runs of the sanity checks and of an eps sweep."""
        return dataclasses.replace(self, attacks=attacks, eps=eps, state=None, corruptions=None,
                                   per_example=False)  # __post_init__ reads and checks attacks and eps

    def settings(self) -> dict[str, Any]:
        """The plan as plain values (the sub-plans as dicts), e.g. for a JSON file."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelFacts:
    """What is known of a model besides its module, for ``robust eval``: the dataset whose test split it is
    scored on, and the radius and threat model it was trained for (None where nothing records one: a plain
    model without a RobustBench entry). ``weights`` says which of a checkpoint's weights are scored (ema,
    live; None for a plain model); ``eps_from`` names the file the eps was read from when not the model's own."""

    dataset: str
    eps: float | None = None
    threat: str = "linf"
    weights: str | None = None
    eps_from: str | None = None
