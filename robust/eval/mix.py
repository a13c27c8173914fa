"""Calibrating a mixture (:class:`robust.nn.mixed.MixedClassifier`) on the run's validation images, never the test set.

The weight and the robust route's transform are chosen to maximize clean accuracy subject to a robust accuracy at
most ``max_drop`` points below the robust route's own, both measured on the validation images the run held out
(the indices its seed, ``val_split``, ``limit`` and ``val_limit`` give, :func:`validation_indices`). The robust
route's reference is the attack on that route alone. A candidate's robust accuracy counts the examples that survive
the attack on the mixture itself, end to end (gradients through both routes and the transform), the robust route's
own adversarial examples (a transfer attack from the robust part) and every adversarial image found for the
candidates tried before it, with fp32 verdicts (:func:`robust.eval.accuracy.correct_under_attack`): a transform
that weakens the attack's gradients cannot make a mixture look more robust than its robust part. Clean accuracy
needs no attack: each route's validation logits are computed once and every candidate's clean accuracy comes from
them.

A second rule, MixedNUTS's (Bai et al. 2024), predicts instead of attacking the mixture (:func:`calibrate_by_margin`):
the robust route alone is attacked once with a minimum-margin attack, and a candidate counts as robust where the
robust route's margin on those images keeps the mixture right whatever the accurate part says
(:func:`survives_any_accurate`). It costs one attack in all; whether its choice keeps the bound under an attack on the
mixture is for ``robust eval`` to measure.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from robust.attacks.pgd import fp32_predictions
from robust.attacks.registry import build_attack, check_perturbation
from robust.data.loader import split_indices, to_float
from robust.data.types import ImageData
from robust.errors import ConfigError
from robust.eval.accuracy import correct_under_attack
from robust.nn.mixed import MixedClassifier, MixSettings, mix_log_probs, transform_logits
from robust.nn.norms import bn_mode

MAX_DROP_RANGE = (0.0, 100.0)
ROBUST_RULE = ("survives the attack on the mixture, the adv route's own adversarial images (transfer) and every "
               "adversarial image the calibration found for the candidates tried before; the adv route's reference "
               "(robust_found) counts the same images")

MARGIN_RULE = ("predicted from the adv route alone: robust where the adv route survives the attack on itself and its "
               "transformed softmax q on that image keeps w (q_y - max_{j != y} q_j) > 1 - w, right whatever the accurate "
               "part predicts (MixedNUTS's rule); no attack on the mixture")
RULES = ("attack", "margin")  # the calibration's robust-accuracy rule: the attack on each mixture, or the margin prediction
DEFAULT_ATTACK = {"attack": "pgd20", "margin": "cw20"}  # the margin rule wants the adv route's minimum-margin images


def check_max_drop(value: object) -> float:
    """``--max-drop`` in points of robust accuracy, a finite number in [0, 100]; ConfigError otherwise."""
    low, high = MAX_DROP_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"--max-drop must be a number of points in [{low:g}, {high:g}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CalibrationPlan:
    """The calibration's settings: the allowed robust-accuracy drop, the attack on the mixture, the candidate grid."""

    eps: float
    threat: str = "linf"
    max_drop: float = 1.0
    attack: str = "pgd20"
    weights: tuple[float, ...] = tuple(i / 20 for i in range(21))
    scales: tuple[float, ...] = (1.0, 2.0, 4.0)
    powers: tuple[float, ...] = (1.0, 2.0)
    offsets: tuple[float, ...] = (0.0, 1.0)
    batch_size: int = 250
    seed: int = 0
    rule: str = "attack"  # RULES: "attack" (calibrate) or "margin" (calibrate_by_margin)
    touched: list = field(default_factory=list, compare=False)  # the training-set indices read (the tests check them)

    def __post_init__(self) -> None:
        check_max_drop(self.max_drop)
        if self.rule not in RULES:
            raise ConfigError(f"the calibration rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        for name, values in (("scale", self.scales), ("power", self.powers), ("offset", self.offsets),
                             ("weight", self.weights)):
            for v in values:
                MixSettings().replace(**{name: v})  # each candidate inside its parameter's range

    def transforms(self) -> list[MixSettings]:
        """Every candidate transform (weight left at 1)."""
        return [MixSettings(1.0, s, p, c) for s, p, c in itertools.product(self.scales, self.powers, self.offsets)]


def validation_indices(config: dict[str, Any], n_train: int) -> torch.Tensor:
    """The indices (into the training set) of the validation images a run held out, from its saved config."""
    fraction = float(config.get("val_split") or 0)
    if fraction <= 0:
        raise ConfigError("the run held out no validation images (val_split 0); calibrate a run trained with "
                          "--val-split above 0 (never on the test set)")
    limit = config.get("limit")
    n = min(n_train, int(limit)) if limit else n_train
    return split_indices(n, fraction, int(config.get("seed", 0)), config.get("val_limit"))[1]


def validation_images(data: ImageData, indices: torch.Tensor, plan: CalibrationPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images (floats in [0, 1]) and labels at ``indices`` of the training set; recorded in the plan."""
    plan.touched.extend(int(i) for i in indices)
    return to_float(data.train_x[indices]), data.train_y[indices]


def route_logits(mix: MixedClassifier, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each route's logits of ``x`` (fp32, eval mode), batch by batch."""
    parts = []
    with torch.no_grad(), bn_mode(mix, False):
        for i in range(0, len(x), batch_size):
            parts.append(mix.route_logits(x[i:i + batch_size]))
    return torch.cat([p[0] for p in parts]).float(), torch.cat([p[1] for p in parts]).float()


def clean_accuracy(logits: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor, settings: MixSettings) -> float:
    """Clean accuracy (%) of the mixture ``settings`` from cached route logits."""
    return _percent(mix_log_probs(*logits, settings).argmax(1) == y)


def attacked(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: CalibrationPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: robust under ``plan.attack`` (fp32 verdicts, every example checked inside the ball), and the
    attacked image (the clean one where the model is wrong without attack, as the attack never sees it). The
    random starts come from ``plan.seed``, the caller's random state untouched."""
    robust, images = [], []
    devices = [x.device] if x.device.type == "cuda" else []
    with bn_mode(model, False), torch.random.fork_rng(devices=devices):
        torch.manual_seed(plan.seed)  # every candidate meets the same random starts: a reproducible calibration
        attack = build_attack(plan.attack, model, plan.eps, plan.threat, seed=plan.seed,
                              num_classes=int(y.max().item()) + 1 if len(y) else 10)
        for i in range(0, len(x), plan.batch_size):
            xb, yb, made = x[i:i + plan.batch_size], y[i:i + plan.batch_size], {}

            def checked(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
                made["x"] = attack(xs, ys)
                check_perturbation(xs, made["x"], plan.eps, plan.threat)
                return made["x"]

            clean, survived = correct_under_attack(model, xb, yb, checked)
            x_adv = xb.clone()
            if "x" in made:
                x_adv[clean] = made["x"].detach().to(x_adv.dtype)
            robust.append(survived)
            images.append(x_adv)
    return (torch.cat(robust), torch.cat(images)) if robust else (torch.zeros(0, dtype=torch.bool), x)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: CalibrationPlan,
                    transfer: torch.Tensor | None = None) -> float:
    """Robust accuracy (%) of ``model`` under ``plan.attack``; with ``transfer`` (adversarial images made on another
    model), an example counts only if the model also classifies its transferred image right."""
    robust, _ = attacked(model, x, y, plan)
    if transfer is not None and len(y):
        robust &= fp32_predictions_batched(model, transfer, plan.batch_size) == y
    return _percent(robust)


def fp32_predictions_batched(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model``'s fp32 predictions of ``x`` (eval mode), batch by batch."""
    with torch.no_grad(), bn_mode(model, False):
        return torch.cat([fp32_predictions(model, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def adv_route(mix: MixedClassifier) -> nn.Module:
    """The robust route alone, as a model: the adv half of the mixture's forward (untransformed logits)."""
    return _RouteOf(mix, 1)


def clean_route(mix: MixedClassifier) -> nn.Module:
    """The accurate route alone, as a model."""
    return _RouteOf(mix, 0)


class _RouteOf(nn.Module):
    """One route of a mixture as ``forward(x) -> logits`` (the mixture's batched forward, one half kept)."""

    def __init__(self, mix: MixedClassifier, which: int) -> None:
        super().__init__()
        self.mix, self.which = mix, which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix.route_logits(x)[self.which]


def search_order(plan: CalibrationPlan) -> list[MixSettings]:
    """Every candidate of the grid: each transform at each weight."""
    weights = sorted(set(plan.weights))
    return [t.replace(weight=w) for t in plan.transforms() for w in weights]


def by_clean_accuracy(logits, y: torch.Tensor, plan: CalibrationPlan) -> list[tuple[float, MixSettings]]:
    """Every candidate with its clean accuracy, the most accurate first (among equals, the larger weight, then the
    grid's order)."""
    ranked = sorted(((clean_accuracy(logits, y, c), c.weight, -i, c) for i, c in enumerate(search_order(plan))),
                    key=lambda r: r[:3], reverse=True)
    return [(clean, c) for clean, _, _, c in ranked]


class FoundImages:
    """The adversarial images a calibration has found so far (the adv route's own, then each attacked candidate's),
    kept as each route's logits: any of them, inside the eps ball, attacks every candidate, and checking a candidate
    against them all needs no forward pass."""

    def __init__(self, mix: MixedClassifier, y: torch.Tensor, batch_size: int) -> None:
        self.mix, self.y, self.batch_size, self.logits = mix, y, batch_size, []

    def add(self, images: torch.Tensor) -> None:
        self.logits.append(route_logits(self.mix, images, self.batch_size))

    def right(self, settings: MixSettings) -> torch.Tensor:
        """Per example: ``settings``' mixture classifies every found image right."""
        right = torch.ones_like(self.y, dtype=torch.bool)
        for logits in self.logits:
            right &= mix_log_probs(*logits, settings).argmax(1) == self.y
        return right

    def adv_route_right(self) -> torch.Tensor:
        """Per example: the robust route alone classifies every found image right."""
        right = torch.ones_like(self.y, dtype=torch.bool)
        for _, adv in self.logits:
            right &= adv.argmax(1) == self.y
        return right


def robust_under_all(mix: MixedClassifier, x: torch.Tensor, y: torch.Tensor, plan: CalibrationPlan,
                     settings: MixSettings, found: FoundImages) -> torch.Tensor:
    """Per example: ``settings``' mixture survives the attack on itself and every image in ``found``; its attacked
    images join ``found``."""
    survived, images = attacked(MixedClassifier(mix.robust, mix.accurate, settings), x, y, plan)
    found.add(images)
    return survived & found.right(settings)


def calibrate(mix: MixedClassifier, x: torch.Tensor, y: torch.Tensor, plan: CalibrationPlan,
              log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The chosen settings and the validation figures: the candidate with the most clean accuracy whose robust
    accuracy is within ``max_drop`` of the robust route's (among equals, the larger weight, then the grid's order).

    A candidate's example counts as robust if it survives the attack on the mixture itself and every adversarial
    image found so far (:class:`FoundImages`: the adv route's own, a transfer attack from the robust part, and each
    earlier candidate's); the robust route's reference counts the same found images, so a stronger image found
    through a mixture lowers the reference as well as the candidates (each comparison is like with like).
    Candidates are tried from the most clean accuracy down (free from cached logits) and the first that meets the
    bound wins, so only the candidates above it are attacked. Two rules skip an attack: a candidate already below
    the target on the clean and found images; and a transform that failed at a weight is not tried at a smaller
    one (robust accuracy grows with the weight)."""
    logits = route_logits(mix, x, plan.batch_size)
    adv_robust, transfer = attacked(adv_route(mix), x, y, plan)
    found = FoundImages(mix, y, plan.batch_size)
    found.add(transfer)

    def adv_route_robust() -> float:
        return _percent(adv_robust & found.adv_route_right())

    def target() -> float:
        return adv_route_robust() - plan.max_drop

    reference = {"clean_route": {"clean": _accuracy(logits[0], y), "robust": robust_accuracy(clean_route(mix), x, y, plan)},
                 "adv_route": {"clean": _accuracy(logits[1], y), "robust": _percent(adv_robust)}}
    log(f"validation: clean route {reference['clean_route']['clean']:.1f}% clean, adv route "
        f"{reference['adv_route']['clean']:.1f}% clean {reference['adv_route']['robust']:.1f}% robust; "
        f"target robust >= {target():.1f}%")
    ranked = by_clean_accuracy(logits, y, plan)
    tried, failed_at, screened, chosen = [], {}, 0, None
    for clean, candidate in ranked:
        transform, weight = candidate.replace(weight=1.0), candidate.weight
        if weight <= failed_at.get(transform, -1.0):
            continue
        clean_right = mix_log_probs(*logits, candidate).argmax(1) == y
        if not meets(_percent(clean_right & found.right(candidate)), target()):
            screened += 1
            continue
        robust = robust_under_all(mix, x, y, plan, candidate, found)
        figures = {**candidate.to_dict(), "clean": clean, "robust": _percent(robust), "target": target()}
        tried.append(figures)
        log(f"  weight {weight:g} scale {candidate.scale:g} power {candidate.power:g} offset {candidate.offset:g}: "
            f"clean {clean:.1f}% robust {figures['robust']:.1f}% (target {figures['target']:.1f}%)")
        if meets(figures["robust"], figures["target"]):
            chosen = figures
            break
        failed_at[transform] = max(weight, failed_at.get(transform, -1.0))
    if chosen is None:
        raise ConfigError(f"no mixture keeps robust accuracy within {plan.max_drop:g} points of the adv route's on the "
                          "validation images; raise --max-drop")
    log(f"  {len(tried)} of {len(ranked)} candidates attacked, {screened} ruled out by images already found")
    reference["adv_route"]["robust_found"] = adv_route_robust()
    return {"settings": {k: chosen[k] for k in ("weight", "scale", "power", "offset")},
            "validation": {"n": len(y), "attack": plan.attack, "eps": plan.eps, "threat": plan.threat, "rule": "attack",
                           "robust_rule": ROBUST_RULE, "candidates": len(ranked), "attacked": len(tried),
                           "screened": screened,
                           "max_drop": plan.max_drop, "target_robust": chosen["target"], **reference,
                           "mixture": {"clean": chosen["clean"], "robust": chosen["robust"]}, "tried": tried}}


def survives_any_accurate(adv_logits: torch.Tensor, y: torch.Tensor, settings: MixSettings) -> torch.Tensor:
    """Per example: the mixture ``settings`` classifies right whatever probabilities its accurate part gives, from the
    robust route's logits alone: ``w (q_y - max_{j != y} q_j) > 1 - w``, ``q`` the softmax of the transformed logits
    (the accurate part's worst case puts all its mass on the robust part's strongest wrong class). Weight 0: never."""
    q = torch.softmax(transform_logits(adv_logits.float(), settings), dim=1)
    right = q.gather(1, y[:, None]).squeeze(1)
    strongest_wrong = q.scatter(1, y[:, None], float("-inf")).amax(1)
    return settings.weight * (right - strongest_wrong) > 1 - settings.weight


def calibrate_by_margin(mix: MixedClassifier, x: torch.Tensor, y: torch.Tensor, plan: CalibrationPlan,
                        log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """MixedNUTS's calibration: ``plan.attack`` (a minimum-margin attack such as cw20) on the robust route alone, once;
    a candidate is robust on an example where the adv route survives it and :func:`survives_any_accurate` holds on the
    attacked image. The most clean-accurate candidate whose predicted robust accuracy is within ``max_drop`` of the adv
    route's wins (among equals, the larger weight, then the grid's order). The same record as :func:`calibrate`, the
    mixture's robust figure a prediction (``rule`` "margin"): no mixture is attacked."""
    logits = route_logits(mix, x, plan.batch_size)
    adv_robust, images = attacked(adv_route(mix), x, y, plan)
    adv_logits = route_logits(mix, images, plan.batch_size)[1]
    target = _percent(adv_robust) - plan.max_drop
    reference = {"clean_route": {"clean": _accuracy(logits[0], y), "robust": robust_accuracy(clean_route(mix), x, y, plan)},
                 "adv_route": {"clean": _accuracy(logits[1], y), "robust": _percent(adv_robust),
                               "robust_found": _percent(adv_robust)}}
    log(f"validation: adv route {reference['adv_route']['clean']:.1f}% clean {reference['adv_route']['robust']:.1f}% "
        f"robust under {plan.attack}; target predicted robust >= {target:.1f}% (margin rule)")
    ranked = by_clean_accuracy(logits, y, plan)
    chosen = None
    for clean, candidate in ranked:
        predicted = _percent(adv_robust & survives_any_accurate(adv_logits, y, candidate))
        if meets(predicted, target):
            chosen = {**candidate.to_dict(), "clean": clean, "robust": predicted, "target": target}
            break
    if chosen is None:
        raise ConfigError(f"no mixture keeps predicted robust accuracy within {plan.max_drop:g} points of the adv "
                          "route's on the validation images; raise --max-drop")
    return {"settings": {k: chosen[k] for k in ("weight", "scale", "power", "offset")},
            "validation": {"n": len(y), "attack": plan.attack, "eps": plan.eps, "threat": plan.threat, "rule": "margin",
                           "robust_rule": MARGIN_RULE, "candidates": len(ranked), "attacked": 0, "screened": 0,
                           "max_drop": plan.max_drop, "target_robust": target, **reference,
                           "mixture": {"clean": chosen["clean"], "robust": chosen["robust"]}, "tried": [chosen]}}


def calibrate_by_rule(mix: MixedClassifier, x: torch.Tensor, y: torch.Tensor, plan: CalibrationPlan,
                      log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The calibration ``plan.rule`` names: :func:`calibrate` (attack) or :func:`calibrate_by_margin` (margin)."""
    return (calibrate_by_margin if plan.rule == "margin" else calibrate)(mix, x, y, plan, log)


def sweep(mix: MixedClassifier, x: torch.Tensor, y: torch.Tensor, transform: MixSettings,
          plan: CalibrationPlan) -> list[dict[str, Any]]:
    """Clean and robust validation accuracy of the mixture at every weight of the plan's grid (``transform`` fixed),
    an example robust at a weight if it survives the attack there and every image found at any weight."""
    logits = route_logits(mix, x, plan.batch_size)
    found = FoundImages(mix, y, plan.batch_size)
    found.add(attacked(adv_route(mix), x, y, plan)[1])
    weights = sorted(set(plan.weights))
    survived = [attacked(MixedClassifier(mix.robust, mix.accurate, transform.replace(weight=w)), x, y, plan)
                for w in weights]
    for _, images in survived:
        found.add(images)
    return [{**transform.replace(weight=w).to_dict(), "clean": clean_accuracy(logits, y, transform.replace(weight=w)),
             "robust": _percent(mask & found.right(transform.replace(weight=w)))}
            for w, (mask, _) in zip(weights, survived)]


def meets(robust: float, target: float) -> bool:
    """``robust`` reaches ``target`` (percentages of one set of images): a count exactly ``max_drop`` points below
    the reference meets it, whatever the rounding of the two percentages."""
    return robust >= target - 1e-9


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return _percent(logits.argmax(1) == y)


def _percent(mask: torch.Tensor) -> float:
    """The percentage of true entries, in float64 from the exact count."""
    return 100.0 * int(mask.sum()) / len(mask) if len(mask) else 0.0
