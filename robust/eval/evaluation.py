"""Clean and robust accuracy per route, with the honesty checks of docs/evaluation.md.

``evaluate(model, (x, y), attacks=["pgd20"], eps=8/255)`` attacks and scores each route through
that same route with the model in eval mode (attacks in fp32 or bf16, every verdict in fp32),
verifies that every adversarial input lies in the eps ball and in [0, 1], and reports the
per-example worst case over all attacks (an example is robust only if it survives every attack;
how AutoAttack scores its ensemble). An example that is misclassified clean counts as non-robust
under every attack. The batches may be split across processes and their verdicts kept in a state
file for a resume (:mod:`robust.eval.jobs`, :mod:`robust.eval.state`); neither changes a verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from robust.attacks.registry import Attack, attack_params, build_attack
from robust.checks import check_value
from robust.data.load import load_dataset
from robust.data.types import CUSTOM_DATASETS, ImageData
from robust.errors import ConfigError, DataError
from robust.eval.accuracy import PROBE_BATCH, choose_attack_precision
from robust.eval.corruptions import evaluate_corruptions
from robust.eval.jobs import SPLIT_RULE, Scoring, chunk_bounds, exchange, run_processes, score_units, split, world_position
from robust.eval.jobs import to_model_input  # also where robust.report finds it
from robust.eval.plan import EvalPlan
from robust.eval.repeats import RANDOMIZED_ADVICE, combine_repeats, randomized_routes, repeat_seeds, single_pass
from robust.eval.state import EvalState, digest_tensors, fingerprint, open_state
from robust.eval.transfer import Surrogate, as_surrogate
from robust.nn.norms import RoutedNorm, bn_mode, routes_for
from robust.progress import Progress
from robust.threat import check_radius
from robust.runtime import THREADS_RANGE, available_cpus, precision_name, resolve_device, versions


NO_STATE_ACROSS_RANKS = ("--state and --resume keep one machine's evaluation; under torchrun drop them, or run one "
                         "process with --jobs N --state FILE")


def as_tensors(data: Any, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a tuple or an ImageData (its test split), checked and cut to ``limit`` examples."""
    if isinstance(data, ImageData):
        x, y = data.test_x, data.test_y
        if not isinstance(x, torch.Tensor):  # streamed data: read the images to score now
            x, y = x[:limit].load(), y[:limit]
    else:
        try:
            x, y = data
        except (TypeError, ValueError):
            raise ConfigError("data must be a tuple (x, y) of tensors or an ImageData") from None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
        raise ConfigError("data must be x (N, C, H, W) and y (N,) tensors of the same length")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        x, y = x[:limit], y[:limit]
    if len(y) == 0:
        raise ConfigError("no examples to evaluate")
    check_images(x)
    check_labels(y)
    return x, y.long()


def check_images(x: torch.Tensor) -> None:
    """ConfigError unless ``x`` is uint8, or float with every value finite and in [0, 1]: a NaN pixel would make
    every comparison false (a NaN image scores as 'correct' or breaks the attack), an inf one is no image."""
    if x.dtype == torch.uint8:
        return
    if not x.is_floating_point():
        raise ConfigError(f"x must be uint8 or float in [0, 1], got {x.dtype}")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).flatten(1).any(1).nonzero()[0])
        raise ConfigError(f"x holds {int((~finite).sum())} NaN or infinite value(s), the first in example {bad}; "
                          "pass images with finite values in [0, 1]")
    low, high = x.min().item(), x.max().item()
    if low < 0 or high > 1:
        raise ConfigError(f"float inputs must lie in [0, 1] (the model normalizes inside), got values in "
                          f"[{low:.4g}, {high:.4g}]; divide uint8 images by 255 or pass them as uint8")


def check_labels(y: torch.Tensor) -> None:
    """ConfigError unless ``y`` holds class indices: an integer tensor (a float label 2.7 is no class). Their range
    is the model's business (:func:`check_fits`)."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ConfigError(f"y must hold class indices as integers, got {y.dtype}; pass y.long() when they are "
                          "whole numbers (for soft labels, evaluate on their argmax)")


def check_fits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """DataError when the data does not fit the model: its channels, or a label outside the model's classes
    (scored as wrong, it would lower the accuracy without a word)."""
    args = getattr(model, "build_args", None) or {}
    channels = args.get("in_channels")
    if channels is not None and x.shape[1] != int(channels):
        raise DataError(f"the evaluation images have {x.shape[1]} channel(s) but the model takes {channels}; "
                        "evaluate on the data it was trained on (--data-dir)")
    trained = input_shape_of(model)
    if trained is not None and tuple(x.shape[1:]) != trained:
        raise DataError(f"the evaluation images are {'x'.join(map(str, x.shape[1:]))} (C x H x W) but the model was "
                        f"trained on {'x'.join(map(str, trained))}; evaluate on images of its size (--data-dir with "
                        "the data it was trained on)")
    classes = args.get("num_classes")
    if len(y) and int(y.min()) < 0 and classes is None:
        i = int((y < 0).nonzero()[0])
        raise DataError(f"label {int(y[i])} of evaluation example {i} is negative; labels are class indices from 0")
    if classes is not None and len(y):
        bad = ((y < 0) | (y >= int(classes))).nonzero()
        if len(bad):
            i = int(bad[0])
            raise DataError(f"label {int(y[i])} of evaluation example {i} is outside the model's {classes} classes "
                            f"(0..{int(classes) - 1}); evaluate on data with the checkpoint's classes (--data-dir)")


def input_shape_of(model: nn.Module) -> tuple[int, ...] | None:
    """The (C, H, W) a model was trained on, where it is known: recorded by :func:`robust.load_model` from its
    checkpoint, or fixed by an external model's constructor (a ViT's image size)."""
    shape = getattr(model, "input_shape", None)
    if shape:
        return tuple(int(v) for v in shape)
    args = getattr(model, "build_args", None) or {}
    size = args.get("image_size")
    if size and args.get("in_channels"):
        side = (size, size) if isinstance(size, int) else tuple(size)
        return (int(args["in_channels"]), *map(int, side))
    return None


def num_classes_of(model: nn.Module) -> int:
    return int((getattr(model, "build_args", None) or {}).get("num_classes", 10))


def build_attacks(model: nn.Module, names: Sequence[str], eps: float, threat: str, seed: int,
                  settings: dict[str, Any], surrogate: Surrogate | None = None) -> list[Attack]:
    """The attacks called ``names`` ("clean" is no attack) against ``model``, in the given order; made on
    ``surrogate`` instead where one is given (a transfer attack; it is moved to the model's device)."""
    target: nn.Module = model
    if surrogate is not None:
        device = next(iter(model.parameters()), torch.empty(0)).device
        target = surrogate.to(device)
    return [build_attack(n, target, eps, threat=threat, seed=seed, num_classes=num_classes_of(model), **settings)
            for n in names if n != "clean"]


def check_surrogate(surrogate: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    """ConfigError unless ``surrogate`` takes the scored images and gives as many logits as ``model`` (two test
    images, model inputs on the models' device): examples made on another task cannot be scored on this one."""
    inner = surrogate.inner if isinstance(surrogate, Surrogate) else surrogate
    shape = input_shape_of(inner)
    images = "x".join(map(str, x.shape[1:]))
    fix = "make the examples on a model of the same data (--transfer-from)"
    channels = (getattr(inner, "build_args", None) or {}).get("in_channels")
    if shape is not None and tuple(shape) != tuple(x.shape[1:]):
        raise ConfigError(f"the surrogate takes {'x'.join(map(str, shape))} (C x H x W) images but the scored ones are "
                          f"{images}; {fix}")
    if channels is not None and int(channels) != x.shape[1]:
        raise ConfigError(f"the surrogate takes images of {channels} channel(s) but the scored ones are {images} "
                          f"(C x H x W); {fix}")
    with torch.no_grad(), bn_mode(model, False):
        try:
            theirs = surrogate(x)
        except RuntimeError as exc:
            raise ConfigError(f"the surrogate cannot take the scored {images} (C x H x W) images "
                              f"({str(exc).splitlines()[0]}); {fix}") from None
        ours = model(x)
    if theirs.dim() != 2 or theirs.shape[1] != ours.shape[1]:
        raise ConfigError(f"the surrogate gives {tuple(theirs.shape[1:])} outputs per image but the scored model "
                          f"{ours.shape[1]} classes; {fix}")


def tally(state: EvalState, route: str, names: Sequence[str], y: torch.Tensor,
          bounds: Sequence[tuple[int, int]]) -> tuple[dict[str, float], dict[str, list]]:
    """Clean, per-attack and worst-case accuracy (%) of one route from its batches' verdicts, and per example
    its clean prediction, the first attack (in the given order) that broke it and whether it survived them all."""
    labels = y.tolist()
    n = len(labels)
    examples: dict[str, list] = {"prediction": [], "broken_by": [], "robust": []}
    correct = {"clean": 0, **dict.fromkeys(names, 0), "worst_case": 0}
    for b, (first, _) in enumerate(bounds):
        done = state.done(route, b)
        for j, prediction in enumerate(done["clean"]):
            ok = prediction == labels[first + j]
            correct["clean"] += ok
            broken_by = None if ok else "clean"
            for name in names:
                survived = bool(done[name][j])
                correct[name] += survived
                if broken_by is None and not survived:
                    broken_by = name
            correct["worst_case"] += broken_by is None
            examples["prediction"].append(prediction)
            examples["broken_by"].append(broken_by)
            examples["robust"].append(broken_by is None)
    return {k: 100.0 * v / n for k, v in correct.items()}, examples


def check_threads(threads: int | None) -> None:
    """The torch thread count of a process, checked as training checks its --threads (at most the CPUs here)."""
    check_value("threads", "int | None", THREADS_RANGE, threads)


def plan_jobs(jobs: int, threads: int | None, n: int, batches: int) -> tuple[int, int]:
    """(processes, torch threads each) of ``jobs`` and ``threads`` given as they are (checked here): see
    :func:`share_jobs`."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    return share_jobs(jobs, threads, n, batches)


def share_jobs(jobs: int, threads: int | None, n: int, batches: int) -> tuple[int, int]:
    """(processes, torch threads each): ``jobs`` (at most one per batch) of CPUs/jobs threads unless ``threads``;
    one process keeps torch's thread count unless ``threads``. More jobs than images is refused."""
    if jobs > n:
        raise ConfigError(f"--jobs {jobs} is more than the {n} images to evaluate; use at most --jobs {n}")
    processes = min(jobs, batches)
    if threads is None:  # one process keeps torch's setting (its default is the CPU count)
        threads = torch.get_num_threads() if jobs == 1 else max(1, available_cpus() // jobs)
    return processes, threads


STAGE_TITLES = {"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T", "fab": "FAB", "fab-t": "FAB-T",
                "square": "Square"}


class Bars:
    """Progress per attack (and the clean pass): a bar on a terminal, a heartbeat line without one; the count is
    route-images (``images`` x ``routes``), and an ensemble's stage and route are named while they run."""

    def __init__(self, keys: Sequence[str], total: int, what: str, enabled: bool) -> None:
        self.bars = {k: Progress(total, f"{k} ({what})", enabled, unit="img", position=i) for i, k in enumerate(keys)}
        self.robust = dict.fromkeys(keys, 0)

    def update(self, key: str, verdicts: list, correct: int) -> None:
        if key in self.bars:
            self.robust[key] += correct
            self.bars[key].show(**{"robust" if key != "clean" else "correct": self.robust[key]})
            self.bars[key].update(len(verdicts))

    def watch(self, attacks: Sequence[Attack], model: nn.Module) -> None:
        """Name each ensemble stage (AutoAttack's APGD-CE, APGD-T, FAB-T, Square) and its route as it starts."""
        for attack in attacks:
            if attack.name in self.bars:
                bar = self.bars[attack.name]
                attack.on_stage = lambda stage, n, bar=bar: bar.doing(
                    f"{STAGE_TITLES.get(stage, stage)} on {n} images, {route_now(model)} route")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def work_text(units: Sequence[tuple[str, int]], routes: Sequence[str], n: int, bounds: Sequence[tuple[int, int]]) -> str:
    """What a bar counts: "50 images x 2 routes" (route-images), or the one route's images (``bounds``: each chunk's)."""
    images = len({i for _, b in units for i in range(bounds[b][0], min(n, bounds[b][1]))})
    todo = [r for r in routes if any(u[0] == r for u in units)] or list(routes)
    return f"{images} images x {len(todo)} routes" if len(todo) > 1 else f"{images} images, {todo[0]} route"


def route_now(model: nn.Module) -> str:
    """The route the model's norm layers are set to (a single-route model: adv)."""
    return next((m.route for m in model.modules() if isinstance(m, RoutedNorm)), "adv")


def evaluate(model: nn.Module, data: Any, attacks: Iterable[str] | str | None = None, eps: float | str | None = None,
             *, plan: EvalPlan | None = None, surrogate: nn.Module | None = None, **settings: Any) -> dict[str, Any]:
    """Clean and robust accuracy (%) of every route of ``model`` under each attack.

    The keywords are the settings of an :class:`robust.eval.plan.EvalPlan` (checked once, before any work:
    :meth:`EvalPlan.build <robust.eval.plan.EvalPlan.build>`), or pass the plan itself as ``plan``; the work is
    :func:`evaluate_plan`'s. ``attacks`` defaults to pgd20.

    ``data`` is ``(x, y)`` with x uint8 or float in [0, 1] of shape (N, C, H, W) (an ImageData
    means its test split) and y integer class indices. What cannot be scored is refused before any
    work: non-finite or out-of-range images, non-integer labels, empty or mismatched sets (ConfigError);
    negative labels or labels outside the model's classes, other channels or, for a model from
    :func:`robust.load_model`, another image size than it was trained on (DataError). ``route`` None/'both' scores both routes of a dual-route model; a
    single-route model has one. Returns ``{"n", "eps", "threat", "seed", "attack_precision",
    "attacks": {name: params}, "routes": {route: {"clean", <attack>..., "worst_case"}}, "split", "iterations",
    "jobs", "threads", "ranks", "attack_seconds", "seconds", "versions", and the plan's "route", "batch_size",
    "limit", "restarts", "queries", "device"}`` (``split``: the rule of the chunks
    the images are attacked in and their number; ``iterations``: per PGD/CW attack, the example-steps
    computed and those the full run computes, the difference saved by exact early stop); with
    ``"per_class": {route: [{"class", "n", "clean", "worst_case"}, ...]}`` (the worst case per class:
    robust to every attack; None for a class without examples); with ``per_example``, also
    ``"per_example": {route: {"prediction", "broken_by", "robust"}}``, a list each in the examples'
    order (``broken_by``: "clean" when misclassified, else the first attack that fooled it, None
    when it survived every attack).

    ``attack_precision`` (auto, fp32, bf16) is the precision of the attacks' iterations (auto: bf16
    on CUDA, and on a CPU where it ran this model's attack step at least 1.2x faster than fp32, measured
    once and cached; ``attack_precision_why`` in the result says which and why); every verdict, clean and adversarial, is an fp32 forward
    (:func:`robust.eval.accuracy.correct_under_attack`). The images are attacked in chunks of at
    most ``batch_size`` by a rule of the image count and batch size alone
    (:func:`robust.eval.jobs.chunk_bounds`); ``jobs`` splits the chunks across that many processes of
    ``threads`` torch threads each (default CPUs/jobs); each attack on each chunk has its own seed,
    so the verdicts equal one process's. In a torch.distributed process group (torchrun)
    each of the ``ranks`` scores its share of the chunks and every rank returns the whole result, the
    same verdicts again; call it on every rank, or pass ``across_ranks=False`` to evaluate everything in
    this process alone (e.g. on rank 0 only). ``state`` is a file the verdicts are
    written to after each attack on each batch (an existing one is kept unless ``force``);
    ``resume`` finishes the evaluation that file holds, refusing one of another model, other
    images or other settings. ``attack_seconds`` sums each attack's time over batches, processes and ranks.
    ``corruptions`` (names or 'all') at ``severities`` adds accuracy under the common corruptions, generated
    from the images or read from the official files in ``corruptions_dir`` (:mod:`robust.eval.corruptions`).
    The model is moved to ``device``; its train/eval modes are restored afterwards.

    ``eot`` (N >= 1) averages each gradient of the gradient attacks (fgsm, pgdN, cwN, APGD, APGD-T; FAB and Square
    take none) over N forwards, for a randomized model; ``repeats`` (K >= 1) runs the evaluation K times with seeds
    seed, seed+1, ... where the model's forward is randomized, and an example is robust only if it survives all K
    (:mod:`robust.eval.repeats`: ``repeats`` in the result holds each repeat's figures and their spread).
    ``surrogate`` (another model of the same images and classes) makes the adversarial examples instead of
    ``model``, which scores them: a transfer attack (:mod:`robust.eval.transfer`; ``"transfer": True``).
    """
    if plan is None:
        return evaluate_plan(model, data, EvalPlan.build(attacks=("pgd20",) if attacks is None else attacks, eps=eps,
                                                         **settings), surrogate)
    if attacks is not None or eps is not None or settings:
        raise ConfigError("evaluate takes a plan or its settings as keywords, not both; change a plan with "
                          "dataclasses.replace(plan, ...) or plan.at_eps(eps)")
    return evaluate_plan(model, data, plan, surrogate)


@dataclass(frozen=True)
class Work:
    """How an evaluation's work is laid out: the routes, the chunks' bounds, the attacks (no "clean"), the device
    and attack dtype, the processes and their threads, this process's rank among ``world`` torchrun ranks."""

    routes: list[str]
    bounds: list[tuple[int, int]]
    attack_names: list[str]
    device: torch.device
    dtype: torch.dtype | None
    processes: int
    threads: int
    rank: int
    world: int


def evaluate_plan(model: nn.Module, data: Any, plan: EvalPlan, surrogate: nn.Module | None = None) -> dict[str, Any]:
    """Clean and robust accuracy (%) of every route of ``model`` on ``data`` as ``plan`` says: the one evaluation
    behind :func:`evaluate` and ``robust eval`` (the result and every refusal as :func:`evaluate` describes), once,
    or ``plan.repeats`` times for a randomized model (:mod:`robust.eval.repeats`)."""
    if plan.repeats == 1:
        return evaluate_pass(model, data, plan, surrogate)
    x, y = as_tensors(data, plan.limit)
    device = resolve_device("auto" if plan.device is None else plan.device)
    model.to(device)
    randomized = randomized_routes(model, to_model_input(x[:PROBE_BATCH], device), routes_for(model, plan.route))
    if not randomized:
        return single_pass(evaluate_pass(model, data, dataclasses.replace(plan, repeats=1), surrogate), plan.repeats,
                           plan.seed)
    seeds = repeat_seeds(plan.seed, plan.repeats)
    results = [evaluate_pass(model, data, dataclasses.replace(
        plan, seed=seed, repeats=1, per_example=True, corruptions=plan.corruptions if k == 0 else None), surrogate)
        for k, seed in enumerate(seeds)]
    result = combine_repeats(results, seeds, y.tolist(), randomized)
    result["seed"] = plan.seed
    result["per_class"] = {r: per_class_accuracy(examples, y, num_classes_of(model))
                           for r, examples in result["per_example"].items()}
    if not plan.per_example:
        del result["per_example"]
    return result


def evaluate_pass(model: nn.Module, data: Any, plan: EvalPlan, surrogate: nn.Module | None = None) -> dict[str, Any]:
    """One pass of :func:`evaluate_plan` (its repeats aside)."""
    if plan.eps is None:
        raise ConfigError("eps is required, e.g. eps=8/255 (robust eval defaults to the checkpoint's training eps)")
    rank, world = world_position() if plan.across_ranks else (0, 1)
    if world > 1 and plan.state is not None:
        raise ConfigError(NO_STATE_ACROSS_RANKS)
    x, y = as_tensors(data, plan.limit)
    check_fits(model, x, y)
    check_radius(plan.eps, plan.threat, x[0].numel())
    routes = list(routes_for(model, plan.route))
    bounds = chunk_bounds(len(y), plan.batch_size)
    processes, per_process = share_jobs(plan.jobs, plan.threads, len(y), len(bounds))
    device = resolve_device("auto" if plan.device is None else plan.device)
    model.to(device)
    if surrogate is not None:
        surrogate = as_surrogate(surrogate).to(device)
        check_surrogate(surrogate, model, to_model_input(x[:2], device))
    precision = choose_attack_precision(plan.attack_precision, device, model, to_model_input(x[:PROBE_BATCH], device),
                                        y[:PROBE_BATCH].to(device), per_process, world)
    work = Work(routes, bounds, [n for n in plan.attacks if n != "clean"], device, precision.dtype, processes,
                per_process, rank, world)
    record = open_record(plan, model, (x, y), work, surrogate)
    start = time.perf_counter()
    build = functools.partial(build_attacks, names=work.attack_names, eps=plan.eps, threat=plan.threat, seed=plan.seed,
                              settings={"restarts": plan.restarts, "queries": plan.queries, "eot": plan.eot},
                              surrogate=surrogate)
    score(model, (x, y), plan, work, record, build)
    dtype = work.dtype
    params = {n: attack_params(n, plan.eps, threat=plan.threat, seed=plan.seed, num_classes=num_classes_of(model),
                               restarts=plan.restarts, queries=plan.queries, eot=plan.eot)
              for n in work.attack_names}  # each attack's settings, read from its spec
    result: dict[str, Any] = {"n": len(y), "eps": plan.eps, "threat": plan.threat, "seed": plan.seed,
                              "attack_precision": precision_name(dtype), "attack_precision_why": precision.why,
                              "attacks": params, "routes": {}}
    for r in routes:
        result["routes"][r], examples = tally(record, r, work.attack_names, y, bounds)
        result.setdefault("per_class", {})[r] = per_class_accuracy(examples, y, num_classes_of(model))
        if plan.per_example:
            result.setdefault("per_example", {})[r] = examples
    result.update(split={"rule": SPLIT_RULE, "chunks": len(bounds)}, iterations=record.iterations(),
                  jobs=processes, threads=per_process, ranks=world, attack_seconds=record.seconds(),
                  seconds=time.perf_counter() - start, versions=versions())
    result.update(route=plan.route, batch_size=plan.batch_size, limit=plan.limit, restarts=plan.restarts,
                  queries=plan.queries, eot=plan.eot, device=str(device))
    if surrogate is not None:
        result["transfer"] = True
    result["randomized_routes"] = randomized_routes(model, to_model_input(x[:PROBE_BATCH], device), routes)
    if result["randomized_routes"]:
        result["randomized"] = RANDOMIZED_ADVICE
    if plan.corruptions is not None:
        result.update(evaluate_corruptions(model, x, y, plan.corruptions, route=plan.route, batch_size=plan.batch_size,
                                           seed=plan.seed, per_example=plan.per_example))
    return result


def open_record(plan: EvalPlan, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], work: Work,
                surrogate: nn.Module | None = None) -> EvalState:
    """The verdicts to fill: the plan's state file (checked, or read for a resume) or a record in memory."""
    state = plan.state
    if state is None:
        return open_state(None, False, False, {})
    x, y = data
    extra: dict[str, Any] = {"eot": plan.eot} if plan.eot > 1 else {}  # recorded where it changes the verdicts
    if surrogate is not None:
        extra["surrogate"] = digest_tensors(list(surrogate.state_dict().items()))
    return open_state(state.path, state.resume, state.force, fingerprint(
        model, x, y, eps=plan.eps, threat=plan.threat, attacks=work.attack_names, routes=work.routes, seed=plan.seed,
        batch_size=plan.batch_size, restarts=plan.restarts, queries=plan.queries,
        attack_precision=precision_name(work.dtype), split=SPLIT_RULE, **extra))


def score(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], plan: EvalPlan, work: Work, record: EvalState,
          build: Callable[[nn.Module], list[Attack]]) -> None:
    """Run every (route, chunk) the record lacks (this rank's share under torchrun), in this process or in
    ``work.processes``, each verdict into ``record`` as it comes; under torchrun the ranks then exchange theirs."""
    x, y = data
    bounds, world = work.bounds, work.world
    units = [(r, b) for r in work.routes for b in range(len(bounds))
             if not all(k in record.done(r, b) for k in ("clean", *work.attack_names))]
    if world > 1:  # this rank's share; the others' verdicts come in the exchange below
        units = split(units, world)[work.rank]
    known = {u: record.done(*u) for u in units if record.done(*u)}
    bars = Bars(["clean", *work.attack_names], sum(bounds[b][1] - bounds[b][0] for _, b in units),
                work_text(units, work.routes, len(y), bounds), plan.progress and work.rank == 0)
    labels = y.tolist()
    mine: list[tuple] = []

    def report(r: str, b: int, key: str, verdicts: list, seconds: float, stages: dict | None = None,
               iterations: dict | None = None) -> None:
        record.add(r, b, key, verdicts, seconds, stages, iterations)
        if world > 1:  # sent to the other ranks at the end
            mine.append((r, b, key, verdicts, seconds, stages, iterations))
        right = sum(p == t for p, t in zip(verdicts, labels[bounds[b][0]:])) if key == "clean" else sum(verdicts)
        bars.update(key, verdicts, right)

    device = work.device
    options = Scoring(plan.eps, plan.threat, bounds, device, plan.seed, work.dtype)
    failure: BaseException | None = None
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if work.processes == 1:
                with torch_threads(work.threads):
                    built = build(model)
                    bars.watch(built, model)
                    score_units(model, x, y, built, units, known, report, options)
            elif units:
                run_processes(work.processes, work.threads, build, model, x, y, units, known, report, options)
    except BaseException as exc:  # noqa: BLE001 (under torchrun the other ranks hear of it, then it is raised)
        if world == 1:
            raise
        failure = exc
    finally:
        bars.close()
    if world > 1:
        for item in exchange(mine, failure, work.rank, world):
            record.add(*item)


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set to ``threads`` inside, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def per_class_accuracy(examples: dict[str, list], y: torch.Tensor, num_classes: int) -> list[dict[str, Any]]:
    """Clean and worst-case accuracy (%) per true class, from one route's per-example verdicts."""
    labels = y.cpu().long()
    classes = max(num_classes, int(labels.max()) + 1)
    n = torch.bincount(labels, minlength=classes)
    clean = torch.bincount(labels[torch.tensor(examples["prediction"]) == labels], minlength=classes)
    robust = torch.bincount(labels[torch.tensor(examples["robust"], dtype=torch.bool)], minlength=classes)
    return [{"class": c, "n": int(n[c]), "clean": 100.0 * int(clean[c]) / int(n[c]) if n[c] else None,
             "worst_case": 100.0 * int(robust[c]) / int(n[c]) if n[c] else None} for c in range(classes)]


def eps_sweep(model: nn.Module, data: Any, eps_values: Sequence[float | str], plan: EvalPlan | None = None,
              **settings: Any) -> list[dict[str, Any]]:
    """``evaluate`` at each eps (same attacks, seed and examples); one result per eps, in order. The settings are
    ``plan`` (its attacks; no state file, corruptions or per-example verdicts) or :func:`evaluate`'s keywords."""
    if plan is not None:
        if settings:
            raise ConfigError("eps_sweep takes a plan or its settings as keywords, not both")
        return [evaluate_plan(model, data, plan.again(plan.attacks, e)) for e in eps_values]
    return [evaluate(model, data, eps=e, **settings) for e in eps_values]


def load_test_split(state: dict[str, Any], data_dir: str | None, limit: int | None):
    """The test images and labels of the checkpoint's dataset (your own data: from where it was trained), refused
    when they are not the data it was trained on (other classes, image size or more classes than its model's).

    Streamed data is read here, only the first ``limit`` images of it.
    """

    record = state.get("data") or {}
    data = eval_dataset(state["dataset"], data_dir or record.get("data_dir"), record.get("image_size"))
    if record.get("classes") and list(data.info.classes or []) != list(record["classes"]):
        raise DataError(f"the classes of {data.source['data_dir']} ({', '.join(data.info.classes or [])}) differ from "
                       f"the checkpoint's ({', '.join(record['classes'])}); pass --data-dir with the data it was trained on")
    trained = record.get("input_size")
    found = list(data.test_x.shape[1:])
    if trained and list(trained) != found:
        raise DataError(f"the test images of {data.source.get('data_dir') if data.source else state['dataset']} are "
                        f"{'x'.join(map(str, found))} (C x H x W) but the checkpoint was trained on "
                        f"{'x'.join(map(str, trained))}; pass --data-dir with the data it was trained on")
    args = state.get("model_args") or {}
    if args.get("num_classes") is not None and data.num_classes > int(args["num_classes"]):
        raise DataError(f"{data.source.get('data_dir') if data.source else state['dataset']} has {data.num_classes} classes "
                        f"but the checkpoint's model has {args['num_classes']}; pass --data-dir with the data it was trained on")
    return first_images(data, limit)


def eval_dataset(dataset: str, data_dir: str | None, image_size: int | None = None) -> ImageData:
    """The dataset whose test split an evaluation scores (built-in sets in memory; your own data streamed)."""
    custom = dataset in CUSTOM_DATASETS
    # Your own data streams (only the first ``limit`` images are read) where it can: a compressed .npz cannot,
    # so auto holds it in memory when it fits; eval has no --data-mode to ask for it.
    return load_dataset(dataset, data_dir, image_size=image_size, mode="auto" if custom else "memory",
                        budget=0 if custom else None)


def first_images(data: ImageData, limit: int | None) -> tuple[Any, Any]:
    """The test split of ``data``; of streamed data, only its first ``limit`` images, read now."""
    x, y = data.test_x, data.test_y
    if not isinstance(x, torch.Tensor):
        x, y = x[:limit].load(), y[:limit]
    return x, y
