"""A training run's plan: its settings checked once and every value derived from them computed once.

:func:`load_config` layers the sources of a run's settings (defaults <- a resumed run's config.json <- the
recipe <- a TOML file <- flags or Python keywords) for ``robust train``, ``robust compare`` and Python alike,
and returns a frozen :class:`TrainPlan`. :class:`~robust.config.TrainConfig` stays the editable settings object
a user writes; ``TrainPlan.of(config)`` resolves it, and the trainer, the build, the step, compare, bench and
analysis read the plan. :func:`command_words` rebuilds the command line of the flags given (for the workers of
``--nproc`` and for compare's results.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from robust.checks import check_fields
from robust.config import TrainConfig, check_resume, fold_method_options, load_saved_config, load_toml, upgrade_saved
from robust.objectives import Objective
from robust.outputs import RunFiles


@dataclass(frozen=True)
class DataSpec:
    """Which images a run trains and validates on, and how they are read."""

    dataset: str
    data_dir: str | None
    image_size: int | None
    mode: str
    workers: int | None
    val_split: float
    limit: int | None
    val_limit: int | None
    extra_data: str | None
    extra_fraction: float  # the share of every batch drawn from extra_data (0 without it)
    epoch_size: int | None


@dataclass(frozen=True, eq=False)
class TrainPlan:
    """A run's settings, checked, with every derived value resolved (built by :meth:`of` or :func:`load_config`).

    ``settings`` holds every :class:`~robust.config.TrainConfig` field as given (config.json stores it); each
    also reads as an attribute (``plan.batch_size``), except the fields resolved here, whose attribute is
    the resolved value: ``method`` (default pgd; ``hybrid`` kept), ``eps`` and ``step_size`` (numbers),
    ``clean_weight``, ``attack_bn``, ``co_guard``, ``select_by``. ``objective`` is the objective the step trains with,
    ``options`` its checked options (trades: ``{"beta": 6.0}``).
    """

    settings: Mapping[str, Any]
    method: str
    objective: Objective
    options: Mapping[str, Any]
    eps: float
    step_size: float
    clean_weight: float
    attack_bn: str
    co_guard: bool
    select_by: str
    milestone_epochs: tuple[int, ...]
    kept_epochs: tuple[int, ...]
    data: DataSpec
    run_dir: Path
    resuming: bool = False

    @classmethod
    def of(cls, config: TrainConfig, resuming: bool = False) -> "TrainPlan":
        """``config`` checked (ConfigError naming the first bad field) and resolved; ``config`` itself is not changed.
        ``resuming``: the config of a run being continued (its milestones stand as it was trained)."""
        c = dataclasses.replace(config)  # checking normalises the values: the caller's object stays as written
        derived = c.derive(resuming)
        options = MappingProxyType(dict(derived["options"]))
        objective = c.objective(derived["eps"], derived["step_size"], c.steps, label_smoothing=c.label_smoothing,
                                **options)
        data = DataSpec(c.dataset, c.data_dir, c.image_size, c.data_mode, c.workers, c.val_split, c.limit, c.val_limit,
                        c.extra_data, c.resolved_extra_fraction, c.epoch_size)
        return cls(MappingProxyType(c.to_dict()), c.resolved_method, objective, options, derived["eps"],
                   derived["step_size"], c.resolved_clean_weight, c.resolved_attack_bn, c.resolved_co_guard,
                   c.resolved_select_by,
                   tuple(derived["milestones"]), tuple(derived["kept_epochs"]), data, c.run_dir, resuming)

    def __getattr__(self, name: str) -> Any:
        """A setting by its field name (``plan.batch_size``)."""
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(f"TrainPlan has no {name!r}")

    def __eq__(self, other: object) -> bool:
        """Two plans of the same settings are the same plan (each holds its own objective instance)."""
        if not isinstance(other, TrainPlan):
            return NotImplemented
        return (dict(self.settings), self.resuming) == (dict(other.settings), other.resuming)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):
        """Pickled (DDP workers, a spawned compare job) as its settings: rebuilt, and so checked, on arrival."""
        return _plan_from_settings, (dict(self.settings), self.resuming)

    @property
    def objective_name(self) -> str:
        """The objective that trains: ``hybrid`` is ``pgd`` (with clean-weight 0.5 by default)."""
        return self.objective.name

    def config(self) -> TrainConfig:
        """The settings as an editable :class:`~robust.config.TrainConfig` (a new object each call)."""
        return TrainConfig(**self.settings)

    def to_dict(self) -> dict[str, Any]:
        """The settings as config.json stores them (the fields of TrainConfig, as given)."""
        return dict(self.settings)

    def replace(self, **changes: Any) -> "TrainPlan":
        """The plan of these settings with ``changes`` (field values), checked and resolved anew."""
        if all(self.settings.get(k) == v for k, v in changes.items()):
            return self
        return TrainPlan.of(dataclasses.replace(self.config(), **changes), self.resuming)


def _plan_from_settings(settings: dict[str, Any], resuming: bool) -> TrainPlan:
    return TrainPlan.of(TrainConfig(**settings), resuming)


def plan_of(config: TrainConfig | TrainPlan | Mapping[str, Any], resuming: bool = False) -> TrainPlan:
    """A plan from a plan (as it is), a TrainConfig, or a dict of field values (:meth:`TrainConfig.from_dict`)."""
    if isinstance(config, TrainPlan):
        return config
    if isinstance(config, Mapping):
        config = TrainConfig.from_dict(dict(config))
    return TrainPlan.of(config, resuming)


def saved_plan(values: Mapping[str, Any]) -> TrainPlan:
    """The plan of a saved config (config.json or a checkpoint's ``config``, of any version), as it trained."""
    return TrainPlan.of(TrainConfig.from_saved(dict(values)), resuming=True)


def layered(flags: Mapping[str, Any], toml: Mapping[str, Any] | None = None,
            saved: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Field values: ``saved`` (a run's config.json) <- ``toml`` <- ``flags`` (None: not given); the recipe is
    applied where the config is made. A method option given by name (``--beta 6``, TOML ``beta = 6``) joins
    ``method_options``; each source is typed before any of it is used (a flag over a bad TOML value too)."""
    given = fold_method_options({k: v for k, v in flags.items() if v is not None})
    from_file = fold_method_options(dict(toml or {}))
    for source in (from_file, given):
        check_fields(TrainConfig, source, partial=True)
    return {**upgrade_saved(dict(saved)), **from_file, **given} if saved else {**from_file, **given}


def load_config(flags: Mapping[str, Any] | None = None, config_file: str | None = None,
                resume: bool = False) -> TrainPlan:
    """The plan of a run: defaults <- its config.json (``resume``) <- recipe <- TOML ``config_file`` <- ``flags``.

    A resume that changes a field outside :data:`robust.config.RESUMABLE` is refused here, before anything
    is read or written (the trainer checks it again against the run it opens)."""
    values = layered(flags or {}, load_toml(config_file) if config_file else None)
    if not resume:
        return TrainPlan.of(TrainConfig(**values))  # the recipe, if any, is applied by the constructor
    out = values.get("out") or TrainConfig(**values).run_dir
    saved = load_saved_config(Path(out) / RunFiles.CONFIG)
    config = TrainConfig.from_dict({**saved, **values})  # the saved file's keys are checked here
    return TrainPlan.of(check_resume(saved, config, out), resuming=True)


def command_words(flags: Mapping[str, Any], config_file: str | None = None,
                  switches: tuple[str, ...] = ()) -> list[str]:
    """The options of a command line that gives these ``flags`` (None: not given), the ``config_file``
    (``--config``) and the on/off ``switches`` (``resume``, ``force``)."""
    words = [f"--config={config_file}"] if config_file else []
    for name, value in flags.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        words.append((flag if value else "--no-" + flag[2:]) if isinstance(value, bool) else f"{flag}={value}")
    return words + [f"--{name}" for name in switches]
