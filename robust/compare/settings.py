"""A compare grid's settings (:class:`CompareSettings`): the shared config, norms, methods, seeds, attacks,
the checkpoint to select; saved as compare.json so a resumed grid is the same grid.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robust.checks import MAX_SEED, check_fields
from robust.config import TrainConfig, shown_setting
from robust.errors import CompareExistsError, ConfigError, check_ascii_number
from robust.eval.plan import check_attack_names
from robust.nn.norms import NORMS, check_norm
from robust.objectives import METHODS
from robust.outputs import RunFiles, holds_files
from robust.plan import TrainPlan
from robust.threat import parse_fraction

SETTINGS_FILE = "compare.json"


RESULT_FILES = ("results.md", "results.json", "curves.png")


EVAL_CACHE = "eval.json"


DEFAULT_ATTACKS = ("pgd10", "pgd20")


NORM_TITLES = {"bn": "BN", "auxbn": "AuxBN", "sabn": "SaBN"}


@dataclass
class CompareSettings:
    """A comparison: the shared training config plus which norms and how to evaluate them.

    ``config.norm`` is ignored (each norm replaces it) and ``config.out`` is the compare folder
    (default ``runs/compare-<dataset>-s<seed>``).
    """

    config: TrainConfig
    norms: tuple[str, ...] = NORMS
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    eval_limit: int | None = field(default=None, metadata={"min": 1})
    eval_batch_size: int = field(default=256, metadata={"min": 1})
    seeds: tuple[int, ...] | None = None
    baseline: str | None = None
    select: str = "best"
    methods: tuple[str, ...] | None = None

    @property
    def seed_list(self) -> list[int]:
        """The seeds trained: --seeds, else the config's one seed."""
        return list(self.seeds) if self.seeds is not None else [self.config.seed]

    @property
    def baseline_norm(self) -> str:
        """The norm every other is paired against: --baseline, else bn when compared, else the first norm."""
        if self.baseline is not None:
            return self.baseline
        return "bn" if "bn" in self.norms else self.norms[0]

    @property
    def out(self) -> Path:
        return Path(self.config.out or f"runs/compare-{self.config.dataset}-s{self.config.seed}")

    @property
    def method(self) -> str:
        return self.config.method or "hybrid"

    @property
    def method_list(self) -> list[str]:
        """The methods trained: --methods, else the one --method (default hybrid)."""
        return list(self.methods) if self.methods is not None else [self.method]

    @property
    def clean_weight(self) -> float:
        """The same loss for every norm: the config's clean-weight, else the reference's 0.5 (bn too)."""
        return 0.5 if self.config.clean_weight is None else float(self.config.clean_weight)

    def norm_config(self, norm: str, seed: int | None = None, method: str | None = None) -> TrainConfig:
        """The config of one run: the shared one with norm, method, clean-weight, seed and out replaced.

        Without --seeds a run is ``<out>/<norm>/`` (the config's seed); with --seeds it is
        ``<out>/<norm>/seed<k>/``; with --methods every path has the method above the norm
        (``<out>/<method>/<norm>/...``). With --select epoch:N the run keeps epochN.pt.
        """
        method = method or self.method_list[0]
        base = self.out / method if self.methods is not None else self.out
        keep = select_epoch(self.select)
        kept = sorted({*self.config.kept_epochs, keep}) if keep is not None else []  # --keep-epochs too
        extra = {"keep_epochs": ",".join(map(str, kept))} if kept else {}
        if self.seeds is None:
            return dataclasses.replace(self.config, norm=norm, method=method, clean_weight=self.clean_weight,
                                       out=str(base / norm), **extra)
        seed = self.seed_list[0] if seed is None else seed
        return dataclasses.replace(self.config, norm=norm, method=method, clean_weight=self.clean_weight,
                                   seed=seed, out=str(base / norm / f"seed{seed}"), **extra)

    def norm_plan(self, norm: str, seed: int | None = None, method: str | None = None) -> TrainPlan:
        """The resolved plan of one run (:meth:`norm_config`)."""
        return TrainPlan.of(self.norm_config(norm, seed, method))

    def validate(self) -> "CompareSettings":
        """Raise ConfigError naming the first bad value; check attack names before any training."""

        self.config.validate()
        check_fields(CompareSettings, self.__dict__)
        if not self.norms:
            raise ConfigError("no norms given; pass e.g. --norms bn,auxbn,sabn")
        for norm in self.norms:
            try:
                check_norm(norm)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if len(set(self.norms)) != len(self.norms):
            raise ConfigError(f"norms {','.join(self.norms)} repeat a name; list each once")
        self.attacks = tuple(a for a in check_attack_names(self.attacks) if a != "clean") or DEFAULT_ATTACKS
        if self.seeds is not None:
            self.seeds = parse_seeds(self.seeds)
        if self.baseline is not None and self.baseline not in self.norms:
            raise ConfigError(f"baseline {self.baseline!r} is not one of the norms {','.join(self.norms)}; "
                              "pass one of them to --baseline")
        parse_select(self.select)
        keep = select_epoch(self.select)
        if keep is not None and keep > self.config.epochs:
            raise ConfigError(f"select {self.select!r}: the runs train {self.config.epochs} epochs; pick an epoch "
                              f"in 1..{self.config.epochs}")
        if self.methods is not None:
            if self.config.method is not None:
                raise ConfigError("give --method (one method) or --methods (a grid), not both")
            for method in self.methods:
                if method not in METHODS:
                    raise ConfigError(f"unknown method {method!r} in methods; valid: {', '.join(METHODS)}")
            if len(set(self.methods)) != len(self.methods):
                raise ConfigError(f"methods {','.join(self.methods)} repeat a name; list each once")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "norms": list(self.norms), "attacks": list(self.attacks),
                "eval_limit": self.eval_limit, "eval_batch_size": self.eval_batch_size,
                "seeds": None if self.seeds is None else list(self.seeds), "baseline": self.baseline,
                "select": self.select, "methods": None if self.methods is None else list(self.methods)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CompareSettings":
        try:
            seeds, methods = values.get("seeds"), values.get("methods")
            return cls(TrainConfig.from_saved(values["config"]), tuple(values["norms"]), tuple(values["attacks"]),
                       values.get("eval_limit"), values.get("eval_batch_size", 256),
                       None if seeds is None else tuple(seeds), values.get("baseline"), values.get("select", "best"),
                       None if methods is None else tuple(methods))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"compare settings are incomplete ({exc}); start a new comparison with --force") from None


def parse_seeds(text: str | list | tuple) -> tuple[int, ...]:
    """--seeds 0,1,2 (or a list of ints) as a tuple of distinct non-negative seeds, in the order given."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise ConfigError(f"seeds {text!r} must be comma-separated non-negative integers, e.g. 0,1,2")
        check_ascii_number(text, "seeds")
        try:
            seeds = tuple(int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"seeds {text!r} must be comma-separated non-negative integers, e.g. 0,1,2") from None
    elif isinstance(text, (list, tuple)) and text and all(isinstance(p, int) and not isinstance(p, bool) for p in text):
        seeds = tuple(text)
    else:
        raise ConfigError(f"seeds {text!r} must be comma-separated non-negative integers, e.g. 0,1,2")
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seeds must be >= 0 and <= {MAX_SEED}, got {seed}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {','.join(map(str, seeds))} repeat a seed; list each once")
    return seeds


def parse_select(text: str) -> str:
    """--select best|last|epoch:N: which checkpoint of each run is evaluated; returns its file name
    (epoch:N -> epochN.pt, which the runs keep through --keep-epochs)."""
    if text == "best":
        return RunFiles.BEST
    if text == "last":
        return RunFiles.LAST
    if isinstance(text, str) and text.startswith("epoch:"):
        number = text[len("epoch:"):]
        if not (number.isascii() and number.isdigit()) or int(number) < 1:
            raise ConfigError(f"select {text!r}: epoch:N needs a whole epoch number >= 1, e.g. epoch:5")
        return RunFiles.epoch(int(number))
    raise ConfigError(f"select {text!r} must be best, last or epoch:N (e.g. epoch:5)")


def select_epoch(text: str) -> int | None:
    """N of --select epoch:N, else None."""
    name = parse_select(text)
    return int(name[len("epoch"):-len(".pt")]) if name.startswith("epoch") else None


def load_settings(out: str | Path) -> dict[str, Any]:
    """The saved settings of the comparison in ``out`` (for resuming), as a plain dict."""
    path = Path(out) / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} does not exist; start a new comparison without --resume")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not valid JSON; start a new comparison with --force") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc}); fix the file or start a new comparison "
                          "with --force") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ConfigError(f"{path} is not the settings of a comparison; start a new comparison with --force")
    CompareSettings.from_dict(saved)  # every saved value typed, before any of it is used
    return saved


# Settings a resumed grid may change: they decide nothing about the figures (where the data is read from,
# how many processes read it, progress bars, how often last.pt is written) or change every run alike
# (--epochs continues every run to the new count). Every other field of the config must be the saved one.
RESUME_MAY_CHANGE = ("quiet", "workers", "data_mode", "save_every", "epochs", "out")


def check_same_grid(saved: dict[str, Any], settings: CompareSettings) -> None:
    """ConfigError naming the first field of ``settings.config`` that differs from the saved grid's, with the
    saved and the given value: a resumed grid trains its missing runs with the settings of its finished ones."""
    before = TrainConfig.from_saved(saved["config"])
    now = settings.config
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MAY_CHANGE:
            continue
        old, new = getattr(before, f.name), getattr(now, f.name)
        if f.metadata.get("kind") == "fraction" and old is not None and new is not None:
            try:
                same = parse_fraction(old, f.name) == parse_fraction(new, f.name)
            except ConfigError:
                same = old == new
        elif f.metadata.get("kind") == "path" and old is not None and new is not None:
            same = Path(old).resolve() == Path(new).resolve()
        else:
            same = old == new
        if not same:
            flag = "--" + f.name.replace("_", "-")
            raise ConfigError(f"cannot resume {settings.out}: its runs were trained with {flag} {shown_setting(old)}, "
                              f"not {shown_setting(new)}; resume without {flag} (or with {flag} {shown_setting(old)}), or start "
                              "a new comparison with another --out")


def check_compare_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite an existing comparison unless told to continue or replace it."""
    if resume and force:
        raise ConfigError("resume and force exclude each other; pick one")
    if resume:
        load_settings(out)
    elif holds_files(out) and not force:
        raise CompareExistsError(f"compare folder {out} already exists; pass --resume to continue it, "
                                 "--force to retrain every norm, or --out NEW")
