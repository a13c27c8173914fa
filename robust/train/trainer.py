"""Adversarial training of dual-route models: ``Trainer(config).fit()``.

Where things live (each a short module of :mod:`robust.train`, the methods in :mod:`robust.objectives`):

- ``step``     — the one training step (examples, loss, backward, optimizer step), shared with
  ``robust analyze`` and ``robust bench``; the clean weight and the fused forward live there.
- ``awp``      — adversarial weight perturbation, an option of every objective.
- ``co_guard`` — the catastrophic-overfitting guard of one-step methods (and its rollback).
- ``build``    — plan + data -> loader, model, optimizer (no IO).
- ``rundir``   — the run folder: config.json, metrics.jsonl, last.pt, best.pt, the lock.
- ``faults``   — signals, non-finite losses, the in-epoch save timer.
- this module  — setup (the IO) and the loop: :meth:`Trainer.fit` -> :meth:`Trainer.train_one_epoch` -> ``train_step``.

Distributed (torchrun, see :mod:`robust.train.distributed`): ``batch_size`` is the global batch. Every
rank draws the same global batch (same permutation and augmentation) and trains on its own
contiguous part, so N ranks see exactly the batches one process would; the loss is weighted by
the part's share so DDP's gradient average is the global batch's mean. Attacks run on the
unwrapped module; only rank 0 writes files; metrics are summed over ranks.

Exact resume: each step's attack is seeded by (seed, epoch, step, rank) and last.pt holds the
position inside the epoch, so a resumed run ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn

from robust import checkpoint as ckpt
from robust.attacks import pgd
from robust.checks import format_duration, parse_duration
from robust.config import TrainConfig, check_resume, load_saved_config, replan_milestones, upgrade_saved
from robust.data.corruptions import check_corruption_names, corrupted_copy
from robust.data.extra import load_extra_data
from robust.data.load import load_dataset, memory_budget
from robust.data.loader import to_float
from robust.data.types import ImageData
from robust.errors import CheckpointError, ConfigError, NonFiniteLoss, TrainingInterrupted
from robust.eval.accuracy import correct_under_attack
from robust.eval.corruptions import predictions
from robust.nn.norms import ROUTES, bn_mode, is_dual_route, use_route
from robust.objectives import hard_labels
from robust.outputs import RunFiles, check_output_dir
from robust.plan import TrainPlan, plan_of
from robust.progress import Progress, run_estimate
from robust.runtime import configure_kernels, describe_machine, precision_name
from robust.torchrun import local_world_size
from robust.train import distributed as dist_
from robust.train.budget import Bought, Probe, buy_steps, epochs_for, steps_in_epoch
from robust.train.build import build_training, training_precision
from robust.train.co_guard import COGuard
from robust.train.ema import WeightAverage
from robust.train.faults import SIGNAL_NAMES, FiniteWatch, SaveTimer, SignalCatcher
from robust.train.rundir import RunFolder, describe
from robust.train.schedule import lr_at
from robust.train.step import StepSettings, train_step
from robust.train.tensorboard import ScalarLog, check_tensorboard_dir, summary_writer_class


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The RNG seed of one step's attack: a resumed run draws the same random starts as an uninterrupted one."""
    return (((seed * 1_000_003 + epoch) * 1_000_033 + batch) * 1_009 + rank) % (2 ** 63 - 1)


@torch.no_grad()
def _count_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).sum()


# --select-by -> the metrics.jsonl figure best.pt has the best of (the adv route's)
SELECTED_FIGURE = {"robust": "val_adv_robust", "clean": "val_adv_clean", "corruption": "val_adv_corruption"}
VALIDATION_BATCH = 256  # the smallest batch validation runs in (no parameter gradients: larger than training's)


def route_correct_counts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, route: str, plan: TrainPlan,
                         device: torch.device, amp: torch.dtype | None = None, attack_all: bool = False) -> torch.Tensor:
    """``[clean correct, robust]`` counts (a device tensor) of one route under the plan's validation PGD
    (``val_steps`` steps of ``step_size`` at ``eps``), in eval mode, in batches of at least :data:`VALIDATION_BATCH`.

    Robust is :func:`robust.eval.accuracy.correct_under_attack`'s definition, the same as ``robust.evaluate``'s.
    ``attack_all`` attacks the misclassified examples too (then robust is not that definition): what validation
    costs once the model classifies every example, which the time budget's probe times on a model still untrained.
    """
    eps, alpha, steps, channels_last = plan.eps, plan.step_size, plan.val_steps, plan.channels_last
    batch_size = max(plan.batch_size, VALIDATION_BATCH)
    counts = torch.zeros(2, device=device, dtype=torch.long)
    with use_route(model, route), bn_mode(model, False):
        for i in range(0, len(y), batch_size):
            xb = to_float(x[i:i + batch_size].to(device), channels_last)
            yb = y[i:i + batch_size].to(device)
            every = torch.ones_like(yb, dtype=torch.bool) if attack_all else None
            clean, robust = correct_under_attack(  # PGD iterations in amp, both verdicts in fp32
                model, xb, yb, lambda xa, ya: pgd(model, xa, ya, eps, alpha, steps, random_start=True), clean=every,
                dtype=amp)
            counts[0] += clean.sum()
            counts[1] += robust.sum()
    return counts


def corruption_correct_counts(model: nn.Module, sets: list[torch.Tensor], y: torch.Tensor, route: str,
                              device: torch.device) -> torch.Tensor:
    """Correct predictions of one route on each corrupted copy in ``sets`` (a device tensor, one count per copy):
    fp32 forwards in eval mode, as ``robust.evaluate(..., corruptions=...)`` scores them."""
    labels = y.tolist()
    counts = [sum(p == t for p, t in zip(predictions(model, xc, route, VALIDATION_BATCH, device), labels))
              for xc in sets]
    return torch.tensor(counts, device=device, dtype=torch.long)


class EpochTally:
    """Running sums of one epoch (loss, adv-route correct, examples), kept on the device."""

    def __init__(self, device: torch.device, loss_sum: float = 0.0, correct: int = 0, seen: int = 0,
                 seconds: float = 0.0) -> None:
        self.loss_sum = torch.tensor(float(loss_sum), device=device)
        self.correct = torch.tensor(int(correct), device=device, dtype=torch.long)
        self.seen, self.seconds_before = int(seen), float(seconds)

    def add(self, loss: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss * len(y)
        self.correct += _count_correct(adv_logits, y)
        self.seen += len(y)

    def totals(self, ctx: dist_.DistContext) -> dict[str, float]:
        """The sums over all ranks (a collective when distributed); the tally itself is unchanged."""
        t = torch.stack([self.loss_sum.double(), self.correct.double(),
                         torch.tensor(float(self.seen), device=self.loss_sum.device, dtype=torch.float64)])
        dist_.all_reduce_sum(t, ctx)
        loss_sum, correct, seen = t.tolist()
        return {"loss_sum": loss_sum, "correct": int(round(correct)), "seen": int(round(seen))}


ESTIMATE_AFTER = 10  # steps timed before the whole run's estimate is printed
QUICK_RUN = "--epochs 10 --width 16 --limit 10000"  # named when the estimate is days


def _silent(msg: str) -> None:
    return None


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Trainer:
    """Adversarial training from a :class:`TrainConfig` or a :class:`~robust.plan.TrainPlan`: ``Trainer(config).fit()``
    returns the final metrics. A config is resolved into a plan once, here (:attr:`plan`); the run reads only the plan.

    ``data`` may be passed to skip loading (tests, notebooks); ``resume`` continues from the run
    folder's last.pt (also from inside an epoch); ``force`` replaces an existing run folder's
    files. Keyword-only options: ``sync_bn`` (route-aware SyncBatchNorm; None keeps the resumed
    checkpoint's choice), ``check_every`` (steps between non-finite-loss checks),
    ``handle_signals`` (turn SIGINT/SIGTERM into a checkpoint and :class:`TrainingInterrupted`
    while fit() runs), ``clock`` (seconds; what --time-budget's probe and the run's time read) and ``started`` (the
    clock's reading where the budget began: by default construction; ``robust train`` gives the process's start). ``config`` may also be a dict of field values (:meth:`TrainConfig.from_dict`).
    A resume is refused (ConfigError, nothing written) when the config differs from the run's saved one
    in a field outside :data:`robust.config.RESUMABLE`.

    Constructing a Trainer only checks the config: it reads, writes and joins nothing.
    :meth:`setup` (called by :meth:`fit`, or first by a caller that wants to look at the model)
    joins the process group under torchrun, checks the run folder, reads last.pt, loads the data
    and builds the model, optimizer and loader (:func:`robust.train.build.build_training`, no IO).
    """

    def __init__(self, config: TrainConfig | TrainPlan | Mapping[str, Any], data: ImageData | None = None,
                 resume: bool = False, force: bool = False, log: Callable[[str], None] | None = None, *,
                 sync_bn: bool | None = None, check_every: int = 50, handle_signals: bool = True,
                 clock: Callable[[], float] = time.perf_counter, started: float | None = None) -> None:
        if not isinstance(config, (TrainConfig, TrainPlan, Mapping)):
            raise ConfigError(f"Trainer needs a TrainConfig or a dict of its fields, got {type(config).__name__}; "
                              "pass TrainConfig(...) or TrainConfig.from_dict({...})")
        self.plan = plan_of(config, resuming=resume)  # checked and resolved once, here
        self.data, self.resume, self.force, self._sync_bn_asked = data, resume, force, sync_bn
        self.check_every = max(1, int(check_every))
        self._log = log or _to_stderr
        self.signals = SignalCatcher(handle_signals)
        self.saves = SaveTimer(self.plan.save_every)  # the plan is the one source of a run's settings
        self.ready = False
        self._val_corrupted: list[torch.Tensor] | None = None  # the corrupted validation images, made once
        self.clock = clock  # the budget counts from ``started`` (a reading of it; default: now), data loading included
        self.started = clock() if started is None else started
        self.bought: Bought | None = None  # what --time-budget bought (a new run only)
        self._saved_epochs: int | None = None  # the epochs the resumed run was planned for

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir

    @property
    def config(self) -> TrainConfig:
        """The run's settings as an editable TrainConfig (a copy: the run trains with :attr:`plan`)."""
        return self.plan.config()

    def setup(self) -> "Trainer":
        """Join the process group, check the folder, read last.pt, load the data, build; once (fit() calls it)."""
        if self.ready:
            return self
        self.dist, self.device = dist_.setup(self.plan.device)
        configure_kernels(self.device, self.plan.deterministic)
        self.log = self._log if self.dist.is_main else _silent
        self.folder = RunFolder(self.run_dir, self.dist, self.resume, self.force)
        error = None
        try:
            self._setup_local()
        except Exception as exc:  # every rank must learn of a failure on any rank, or the others hang
            if not self.dist.enabled:
                raise
            error = exc
        dist_.agree(self.dist, error)
        if self.dist.enabled:  # DDP around the loss model (a collective: it broadcasts rank 0's weights)
            unused = self.settings.clean_weight == 0 and is_dual_route(self.model)  # the clean route is idle
            self.step_model = dist_.wrap_ddp(self.attack_model, self.dist, self.device, unused)
        self._resolve_steps()
        self.ready = True
        return self

    @property
    def save_every_s(self) -> float | None:
        return self.saves.every_s

    # ---- setup (local to this rank: no collectives, a rank that fails must not strand the others) ---
    def _setup_local(self) -> None:
        self.folder.check()
        state = self.folder.read_last(self.device) if self.resume else None  # a bad last.pt before the slow data
        if state is not None:
            self._check_same_run(state)
        c = self.plan
        if c.threads:
            torch.set_num_threads(c.threads)
        if c.batch_size < self.dist.world_size:
            raise ConfigError(f"batch-size {c.batch_size} is the global batch and must be >= the {self.dist.world_size} ranks; raise --batch-size")
        d = c.data
        self.data = self.data if self.data is not None else load_dataset(
            d.dataset, d.data_dir, image_size=d.image_size, mode=d.mode, budget=memory_budget(self.device) // local_world_size(),
            workers=d.workers)
        self.precision = training_precision(c, self.data, self.device, self.dist.world_size)
        self.amp = self.precision.dtype
        extra = load_extra_data(d.extra_data, tuple(self.data.train_x.shape[1:]), self.data.num_classes, d.mode,
                                memory_budget(self.device) // local_world_size()) if d.extra_data else None
        parts = build_training(c, self.data, self.device, self.amp, state, self._sync_bn_asked, self.folder.last_pt, extra)
        self.loader, self.val, self.model, self.attack_model = parts.loader, parts.val, parts.model, parts.attack_model
        self.optimizer, self.scaler, self.sync_bn = parts.optimizer, parts.scaler, parts.sync_bn
        self.settings = StepSettings.from_plan(c, self.amp, self.device)  # the step reads the plan's objective directly
        self.step_model = self.attack_model
        self.guard = self._make_guard() if c.co_guard else None
        self.ema = WeightAverage(self.model, c.ema) if c.ema > 0 else None
        self.start_epoch, self.start_batch, self.step, self.best = 0, 0, 0, None
        self.resume_tally: dict[str, float] | None = None
        if state is not None:
            self._load_state(state)
            replanned = replan_milestones(self.plan.config(), self._saved_epochs or c.epochs, self.start_epoch,
                                          self.start_batch)
            self.plan = self.plan.replace(milestones=replanned.milestones)
            if self.guard is not None and not self.start_batch:  # resumed at an epoch end: that epoch is the last good one
                self._remember_good(state.get("metrics"))
        if self.dist.is_main:
            self.folder.check_room(self._checkpoint_bytes(), len(self.plan.kept_epochs))
            if c.tensorboard:  # refused now, before anything is written
                check_output_dir(c.tensorboard, "--tensorboard")
                check_tensorboard_dir(c.tensorboard, self.run_dir)
                summary_writer_class()

    def _resolve_steps(self) -> None:
        """--time-budget (a new run): time the steps and buy the most that fit; --train-steps (given, or bought
        before a resume): the epochs they need. Before anything is written: a refusal leaves the folder as it was."""
        batches = len(self.loader)
        steps = self.plan.train_steps
        if steps is None and self.plan.time_budget:
            self.bought = self._buy(batches)
            steps = self.bought.steps
        if steps is not None:
            self.plan = self.plan.replace(train_steps=steps, epochs=epochs_for(steps, batches))

    def _buy(self, batches: int) -> Bought:
        """Time training steps on the loop's own batches (reading and augmentation included), one validation batch
        and the CO guard's check (after warm-up steps; the weights and the optimizer are restored) and buy the
        steps; every rank trains the fewest any rank could afford."""
        c = self.plan
        reduce = self._average_over_ranks if self.dist.enabled else None
        batches_again = self._probe_batches()

        def train_once() -> float:
            x, y = next(batches_again)
            x, y, weight = self._local_part(x, y) or (x, y, 1.0)
            return float(train_step(self.step_model, self.optimizer, self.scaler, x, y, self.settings,
                                    attack_model=self.attack_model, loss_scale=weight, awp=c.awp_gamma > 0,
                                    reduce=reduce)[0])  # float(): waits for the device

        vx, vy = (self.val[0][self.dist.rank::self.dist.world_size], self.val[1][self.dist.rank::self.dist.world_size]) \
            if self.val is not None else (None, None)
        k = 0 if vy is None else min(len(vy), max(c.batch_size, VALIDATION_BATCH))
        routes = ROUTES if is_dual_route(self.model) else ("adv",)

        def validate_part() -> list[int]:
            return [route_correct_counts(self.model, vx[:k], vy[:k], r, c, self.device, self.amp, attack_all=True).tolist()
                    for r in routes]

        guard = self.guard
        check = (lambda: guard.accuracy(self.model, 0, self.amp, attack_all=True)) if guard is not None else None
        try:
            costs = Probe(self.clock, [self.model, self.optimizer, self.scaler]).measure(
                train_once, validate_part, len(vy) / k if k else 0.0, self.started, per_epoch=check)
        finally:
            self.loader.close()  # a streamed pass's reading workers end here; epoch 0 starts its own pass
        bought, error = None, None
        try:
            bought = buy_steps(parse_duration(c.time_budget), costs, batches, c.batch_size)
        except ConfigError as exc:
            error = exc
        dist_.agree(self.dist, error)
        fewest = -dist_.control_max([-bought.steps], self.dist)[0]
        return Bought(bought.budget_s, fewest, batches, c.batch_size, costs)

    def _probe_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training loop's batches, epoch 0's over and over, for the budget's probe: each epoch's order and
        augmentation come from the seed and the epoch alone, so reading them here changes nothing the run trains."""
        while True:
            self.loader.set_epoch(0)
            seen = 0
            for batch in self.loader:
                seen += 1
                yield batch
            if not seen:
                raise ConfigError("the training split gives no batch to time; lower --batch-size or give more images")

    def _check_same_run(self, state: dict[str, Any]) -> None:
        """Refuse to resume with settings the run was not trained with (its config.json, else last.pt's config)."""
        path = self.run_dir / RunFiles.CONFIG
        saved = load_saved_config(path) if path.is_file() else upgrade_saved(state.get("config"))
        if isinstance(saved, dict):
            self.plan = self.plan.replace(**check_resume(saved, self.plan.config(), self.run_dir).to_dict())
            self._saved_epochs = TrainConfig.from_saved(saved).epochs

    def _make_guard(self) -> COGuard:
        """The guard's fixed batch: the first training images, as they are (not augmented)."""
        n = min(self.plan.batch_size, 512, len(self.loader.y))
        x = self.loader.x[:n]  # in memory: a view of the images already on the device
        if not isinstance(x, torch.Tensor):  # streamed (LazyImages): read these n images here, no worker processes
            x = x.load(workers=0).to(self.device)
        x = to_float(x, self.plan.channels_last)
        return COGuard(x, self.loader.y[:n], self.plan.eps)

    def _load_state(self, state: dict[str, Any]) -> None:
        path = self.folder.last_pt
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.step = int(state["scheduler"]["step"])
            completed = int(state["epoch"]) + 1
            self.best = state.get("best")
            position = state.get("position")
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} lacks training state ({type(exc).__name__}: {exc}); it is not a last.pt of robust train, start a new run") from None
        stopped = state.get("stopped")
        if stopped and self.guard is not None:
            raise ConfigError(f"cannot resume: {self.run_dir} stopped at epoch {stopped['epoch']} by the catastrophic-"
                              f"overfitting guard (PGD accuracy {stopped['previous']:.1f}% -> {stopped['pgd_acc']:.1f}%); "
                              "pass --no-co-guard to train on past it, or start a new run")
        if self.guard is not None:
            self.guard.previous = (state.get("co_guard") or {}).get("previous")
        if self.ema is not None and isinstance(state.get("ema"), dict):  # a run without one starts its average here
            self.ema.load_state_dict(state["ema"])
        if position:
            self.start_epoch, self.start_batch = int(position["epoch"]), int(position["batch"])
            self.resume_tally = position
        else:
            self.start_epoch, self.start_batch = completed, 0
        self.folder.last_saved = describe(self.start_epoch, self.start_batch)
        where = f", step {self.start_batch}" if self.start_batch else ""
        self.resumed_note = f"resumed {self.run_dir} at epoch {self.start_epoch + 1}{where}"  # said once the folder is ours

    def _checkpoint_bytes(self) -> int:
        """About one checkpoint's size: the weights plus the optimizer's momentum buffers."""
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return weights + params

    # ---- checkpoints ------------------------------------------------------------------------------
    def _checkpoint(self, completed_epoch: int, metrics: dict[str, Any] | None,
                    position: dict[str, Any] | None, **extra: Any) -> dict[str, Any] | None:
        """The last.pt / best.pt dict (built on rank 0 only; None elsewhere)."""
        if not self.dist.is_main:
            return None
        c = self.plan
        guard = {"previous": self.guard.previous} if self.guard is not None else None
        return ckpt.build_checkpoint(
            self.model, optimizer=self.optimizer.state_dict(),
            scheduler={"step": self.step}, epoch=completed_epoch, best=self.best, metrics=metrics,
            config=c.to_dict(), dataset=c.dataset, data=self.data.record(), eps=c.eps, method=c.method,
            scaler=self.scaler.state_dict() if self.scaler is not None else None, position=position,
            distributed={"world_size": self.dist.world_size, "sync_bn": self.sync_bn}, co_guard=guard,
            ema=self.ema.state_dict() if self.ema is not None else None,
            machine={"description": describe_machine(self.device), "device": str(self.device),
                     "precision": precision_name(self.amp), "precision_why": self.precision.why}, **extra,
        )

    def _save_position(self, epoch: int, batch: int, tally: EpochTally, elapsed: float) -> None:
        """last.pt at a point inside epoch ``epoch`` (0-based) before batch ``batch``."""
        position = {"epoch": epoch, "batch": batch, **tally.totals(self.dist), "seconds": elapsed}
        self.folder.save_position(self._checkpoint(epoch - 1, None, position), epoch, batch)
        self.saves.saved()

    def _save_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        key = SELECTED_FIGURE[self.plan.select_by]
        improved = key not in metrics or self.best is None or metrics[key] > self.best["value"]
        if improved:
            self.best = {"epoch": epoch + 1, "metric": key if key in metrics else "last_epoch",
                         "value": metrics.get(key, float(epoch + 1))}
        keep = epoch + 1 in self.plan.kept_epochs
        self.folder.save_epoch(self._checkpoint(epoch, metrics, None), epoch, metrics, improved, keep)
        self.saves.saved()
        if self.guard is not None:
            self._remember_good(metrics)

    def _remember_good(self, metrics: dict[str, Any] | None) -> None:
        self.guard.remember(self.model, self.optimizer, self.scaler, step=self.step, best=self.best, metrics=metrics or {},
                            ema=self.ema.state_dict() if self.ema is not None else None)

    # ---- the loop ---------------------------------------------------------------------------------
    def _local_part(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's rows of the global batch and its loss weight; None when a rank would get no row."""
        if not self.dist.enabled:
            return x, y, 1.0
        n = len(y)
        if n < self.dist.world_size:
            return None
        rows = dist_.shard_rows(n, self.dist)
        return x[rows], y[rows], (rows.stop - rows.start) * self.dist.world_size / n

    def _average_over_ranks(self, grads: list[torch.Tensor]) -> None:
        """AWP's ascent gradients averaged over ranks (each already weighted by its part's share)."""
        dist_.average_tensors(grads, self.dist)

    def _check_finite(self, epoch: int, steps: int, watch: FiniteWatch, next_batch: int) -> None:
        """Raise NonFiniteLoss naming the first bad step (on every rank); restart the watch otherwise."""
        bad = watch.first_bad_on_any_rank(self.dist)
        if bad is not None:
            global_step = watch.step + (bad - watch.batch) + 1
            raise NonFiniteLoss(
                f"non-finite training loss at epoch {epoch + 1}, step {bad + 1} of {steps} (global step {global_step}); "
                f"training stopped and {self.folder.last_pt} ({self.folder.last_saved}) is kept; "
                "lower --lr, use --precision fp32, or check the data")
        watch.restart(next_batch, self.step)

    def _between_steps(self, epoch: int, next_batch: int, steps: int, tally: EpochTally, watch: FiniteWatch,
                       elapsed: float) -> None:
        """Agree on stop/save across ranks, check the loss every ``check_every`` steps, act."""
        due = self.dist.is_main and next_batch < steps and self.saves.due()
        signum, save = dist_.control_max([self.signals.signum, int(due)], self.dist)
        if signum or save or watch.count >= self.check_every:
            self._check_finite(epoch, steps, watch, next_batch)
        if signum or save:
            self._save_position(epoch, next_batch, tally, elapsed)
        if signum:
            name = SIGNAL_NAMES.get(signum, f"signal {signum}")
            launcher = f" --nproc {self.dist.world_size}" if self.dist.enabled else ""
            raise TrainingInterrupted(signum, (
                f"stopped by {name} at epoch {epoch + 1}, step {next_batch} of {steps}; saved {self.folder.last_pt}. "
                f"Resume with: robust train --out {self.run_dir} --resume{launcher}"))

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns loss, adv accuracy, images/s, seconds."""
        c = self.plan
        batches = len(self.loader)
        end = steps_in_epoch(epoch, batches, c.train_steps)  # the last epoch of --train-steps stops part-way
        resuming = epoch == self.start_epoch and bool(self.resume_tally)
        first = self.start_batch if epoch == self.start_epoch else 0
        self.loader.set_epoch(epoch, skip=first)  # resuming inside the epoch: skipped batches are not read
        saved = self.resume_tally if resuming and self.dist.is_main else {}  # other ranks' sums start at 0
        tally = EpochTally(self.device, saved.get("loss_sum", 0.0), saved.get("correct", 0), saved.get("seen", 0),
                           saved.get("seconds", 0.0))
        watch = FiniteWatch(self.device, first, self.step)
        progress = Progress(end - first, f"epoch {epoch + 1}/{c.epochs}", not c.quiet and self.dist.is_main)
        awp = c.awp_gamma > 0 and epoch >= c.awp_warmup
        start = time.perf_counter()
        lr = lr_at(self.step, c, batches)
        for i, (x, y) in enumerate(self.loader):
            if i < first:  # resuming inside the epoch: the loader yields (None, None) for these
                continue
            if i >= end:
                break
            part = self._local_part(x, y)
            if part is None:
                break
            x, y, weight = part
            lr = lr_at(self.step, c, batches)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(step_seed(c.seed, epoch, i, self.dist.rank))
            loss, adv_logits = train_step(self.step_model, self.optimizer, self.scaler, x, y, self.settings,
                                          attack_model=self.attack_model, loss_scale=weight, awp=awp,
                                          reduce=self._average_over_ranks if self.dist.enabled else None)
            if self.ema is not None:
                self.ema.update(self.model)
            tally.add(loss, adv_logits, hard_labels(y))
            watch.update(loss)
            self.step += 1
            if i + 1 - first == min(ESTIMATE_AFTER, end - first) and epoch == self.start_epoch and progress.enabled:
                self.log(run_estimate((time.perf_counter() - start) / (i + 1 - first),
                                      (c.train_steps or batches * c.epochs) - self.step, QUICK_RUN))
            if progress.enabled and (i % 10 == 0 or i == end - 1):
                progress.show(loss=f"{tally.loss_sum.item() / tally.seen:.3f}",
                              adv_acc=f"{100 * tally.correct.item() / tally.seen:.1f}")
            progress.update()
            self._between_steps(epoch, i + 1, end, tally, watch, tally.seconds_before + time.perf_counter() - start)
        progress.close()
        self._check_finite(epoch, end, watch, end)
        totals = tally.totals(self.dist)
        dist_.average_running_stats(self.model, self.dist)
        if self.ema is not None:  # without SyncBN each rank's averaged statistics followed its own shard
            dist_.average_running_stats(self.ema.average, self.dist)
        seconds = tally.seconds_before + time.perf_counter() - start
        seen = max(totals["seen"], 1)
        return {"lr": lr, "train_loss": totals["loss_sum"] / seen, "train_adv_acc": 100.0 * totals["correct"] / seen,
                "seconds": seconds, "images_per_s": totals["seen"] / max(seconds, 1e-9)}

    def validation_metrics(self) -> dict[str, float]:
        """Clean and PGD-``val_steps`` accuracy of every route on the validation split (sharded over ranks)."""
        if self.val is None:
            return {}
        c = self.plan
        routes = ROUTES if is_dual_route(self.model) else ("adv",)
        rows = slice(self.dist.rank, None, self.dist.world_size)
        x, y = self.val[0][rows], self.val[1][rows]
        model = self.ema.average if self.ema is not None else self.model  # the averaged weights, when kept
        counts = torch.stack([route_correct_counts(model, x, y, route, c, self.device, self.amp) for route in routes])
        counts = dist_.all_reduce_sum(counts, self.dist).tolist()
        n = max(len(self.val[1]), 1)
        out = {}
        for route, (clean, robust) in zip(routes, counts):
            out[f"val_{route}_clean"], out[f"val_{route}_robust"] = 100.0 * clean / n, 100.0 * robust / n
        if c.val_corruptions is not None:
            out.update(self.corruption_metrics(model, routes, rows))
        return out

    def corrupted_validation(self) -> list[torch.Tensor]:
        """The validation images under each of --val-corruptions at --val-severity (uint8, on the CPU), generated
        on the first call and kept for the run: every epoch scores the same images (image i corrupted by the
        run's seed and its index, as ``robust.evaluate`` corrupts it)."""
        if self._val_corrupted is None:
            c, x = self.plan, self.val[0].cpu()
            self._val_corrupted = [corrupted_copy(x, name, c.val_severity, c.seed)
                                   for name in check_corruption_names(c.val_corruptions)]
        return self._val_corrupted

    def corruption_metrics(self, model: nn.Module, routes: tuple[str, ...], rows: slice) -> dict[str, float]:
        """``val_<route>_corruption``: each route's accuracy (%) on the validation images, the mean over
        --val-corruptions at --val-severity (each corruption's accuracy first, as robust eval's mean)."""
        sets = [xc[rows] for xc in self.corrupted_validation()]
        y = self.val[1][rows].cpu()
        counts = torch.stack([corruption_correct_counts(model, sets, y, route, self.device) for route in routes])
        counts = dist_.all_reduce_sum(counts, self.dist).tolist()
        n = max(len(self.val[1]), 1)
        return {f"val_{route}_corruption": sum(100.0 * k / n for k in row) / len(row) for route, row in zip(routes, counts)}

    def _guard_check(self, epoch: int) -> dict[str, Any]:
        """The catastrophic-overfitting check after ``epoch`` (same verdict on every rank: same batch, seed, weights)."""
        report = self.guard.check(self.model, step_seed(self.plan.seed, epoch, len(self.loader), 0), self.amp)
        return {"co_guard_pgd_acc": report["pgd_acc"], **({"co_guard": report} if report["collapsed"] else {})}

    def _stop_collapsed(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Catastrophic overfitting in ``epoch``: back to the last good epoch, say so, write it down."""
        report = metrics["co_guard"]
        good = self.guard.roll_back(self.model, self.optimizer, self.scaler)
        kept = epoch if good is not None else epoch + 1  # resumed inside this epoch: the previous one is not in memory
        stopped = {"epoch": epoch + 1, "kept_epoch": kept, "pgd_acc": report["pgd_acc"], "previous": report["previous"]}
        metrics["co_guard"] = {**report, "stopped": True, "kept_epoch": kept}
        if good is None:
            good = {"metrics": metrics}
        else:
            self.step, self.best = good["step"], good["best"]
            if self.ema is not None and good.get("ema"):
                self.ema.load_state_dict(good["ema"])
        self.folder.save_stopped(self._checkpoint(kept - 1, good["metrics"], None, stopped=stopped), metrics, kept)
        self.log(f"catastrophic overfitting at epoch {epoch + 1}: PGD-5 accuracy on a training batch fell from "
                 f"{report['previous']:.1f}% to {report['pgd_acc']:.1f}%; stopped, the result is epoch {kept} "
                 f"({self.folder.last_pt}; --no-co-guard trains on)")
        return {"run_dir": str(self.run_dir), "best": self.best, **good["metrics"], "stopped": stopped}

    def fit(self) -> dict[str, Any]:
        """Train to ``config.epochs``; write config.json, metrics.jsonl, last.pt, best.pt; return the final metrics."""
        c = self.setup().plan
        self.folder.lock()  # nothing is written before this process is the folder's only writer
        if getattr(self, "resumed_note", None):
            self.log(self.resumed_note)
        self.signals.install()
        scalars = ScalarLog(None, 0, False)
        try:
            self.folder.prepare(c.to_dict(), self.start_epoch)
            scalars = ScalarLog(c.tensorboard, self.start_epoch + 1, self.dist.is_main)
            if self.bought is not None:
                self.log(self.bought.describe())
            self.log(self._header())
            self.saves.saved()
            if not self.resume:  # from now on a loadable last.pt always exists
                self._save_position(0, 0, EpochTally(self.device), 0.0)
            metrics: dict[str, Any] = {}
            for epoch in range(self.start_epoch, c.epochs):
                metrics = {"epoch": epoch + 1, **self.train_one_epoch(epoch)}
                if self.guard is not None:
                    metrics.update(self._guard_check(epoch))
                    if "co_guard" in metrics:
                        result = self._stop_collapsed(epoch, metrics)
                        scalars.add(metrics)
                        self.folder.settle()
                        return self._timed(result)
                metrics.update(self.validation_metrics())
                self._save_epoch(epoch, metrics)
                scalars.add(metrics)
                self.folder.settle()  # an epoch is saved: the files it replaced (--force) go for good
                self.log(format_epoch(metrics, attacked=self.plan.objective.adversarial))
            self.folder.settle()
            return self._timed({"run_dir": str(self.run_dir), "best": self.best, **metrics})
        except Exception as exc:
            if not isinstance(exc, TrainingInterrupted):  # an interrupted run keeps its last.pt to resume from
                self.folder.undo()  # failed before its first epoch was saved: the folder as it was, no blocked rerun
            raise
        finally:
            self.loader.close()  # a streamed epoch's reading workers end here, whatever stopped the loop
            scalars.close()
            self.signals.restore()
            self.folder.unlock()

    def _timed(self, result: dict[str, Any]) -> dict[str, Any]:
        """The result with the process's time (``took_s``, from construction) and, under a budget, the budget."""
        took = self.clock() - self.started
        budget = self.plan.time_budget
        if budget:
            self.log(f"trained {self.plan.train_steps:,} steps; took {format_duration(took)} of the "
                     f"{format_duration(parse_duration(budget))} time budget")
        return {**result, "took_s": took, **({"time_budget": budget} if budget else {})}

    def _header(self) -> str:
        c = self.plan
        ranks = f" x {self.dist.world_size} ranks (DDP{', sync-bn' if self.sync_bn else ''})" if self.dist.enabled else ""
        extras = [f"recipe {c.recipe}"] if c.recipe else []
        extras.append(f"clean-weight {self.settings.clean_weight:g}")
        extras += [f"{name} {value:g}" for name, value in c.options.items()]
        if c.label_smoothing:
            extras.append(f"label smoothing {c.label_smoothing:g}")
        if c.attack_bn != c.objective.attack_bn:
            extras.append(f"attack BN {c.attack_bn}")
        if c.awp_gamma > 0:
            extras.append(f"AWP gamma {c.awp_gamma:g} from epoch {c.awp_warmup + 1}")
        if self.guard is not None:
            extras.append("CO guard")
        if self.ema is not None:
            extras.append(f"EMA {c.ema:g}: validation, best.pt and the figures use the averaged weights")
        width = f", width {self.model.build_args['width']}" if self.model.build_args.get("width") else ""
        width += f", {c.activation}" if c.activation != "relu" else ""
        shape = "x".join(map(str, self.loader.x.shape[1:]))
        streamed = f", streamed by {self.loader.workers} workers" if self.loader.streamed else ""
        n_val = 0 if self.val is None else len(self.val[1])
        mixed = getattr(self.loader, "extra", None)
        if mixed is not None:
            streamed += (f"; + {len(mixed)} extra ({'soft' if mixed.soft else 'hard'} labels{', memory-mapped' if mixed.mode == 'stream' else ''}) "
                         f"at {c.data.extra_fraction:g} of every batch, {len(self.loader)} batches per epoch")
        return (f"training {c.arch} ({c.norm}{width}) on {c.data.dataset} "
                f"[{len(self.loader.y)} training, {n_val} validation examples, {shape}{streamed}], "
                f"method {c.method} ({', '.join(extras)}), eps {c.settings['eps']}{_attack_words(c)}, device {self.device}{ranks}, "
                f"precision {self.precision.describe()} -> {self.run_dir}")


def _attack_words(c: TrainPlan) -> str:
    """The training attack's step in the run's first line (a recipe's step scales with the eps given)."""
    if "{steps}" not in c.objective.attack_text:  # one-step methods and clean training take no step size
        return ""
    return f" (PGD-{c.steps}, step {c.step_size:.4g})"


def format_epoch(m: dict[str, Any], attacked: bool = True) -> str:
    """One plain line per epoch (``attacked``: the method trains on adversarial examples, else on clean ones)."""
    parts = [f"epoch {m['epoch']}", f"lr {m['lr']:.4g}", f"loss {m['train_loss']:.3f}",
             f"train {'adv ' if attacked else ''}acc {m['train_adv_acc']:.1f}%"]
    for route in ROUTES:
        if f"val_{route}_clean" in m:
            corrupted = f" corrupted {m[f'val_{route}_corruption']:.1f}%" if f"val_{route}_corruption" in m else ""
            parts.append(f"val {route} route: natural {m[f'val_{route}_clean']:.1f}% robust "
                         f"{m[f'val_{route}_robust']:.1f}%{corrupted}")
    if "co_guard_pgd_acc" in m:
        parts.append(f"guard PGD-5 {m['co_guard_pgd_acc']:.1f}%")
    parts.append(f"{m['images_per_s']:.0f} img/s, {m['seconds']:.0f}s")
    return " | ".join(parts)
