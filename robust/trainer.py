"""PGD adversarial training of dual-route models: one step, one epoch, one validation.

Methods:
- ``pgd``    Madry et al.: cross-entropy of the adv route on PGD examples only.
- ``hybrid`` the SaBN reference: ``w * CE(clean route, x) + (1 - w) * CE(adv route, x_adv)``.
- ``fast``   FGSM with random start (Wong et al. 2020); hybrid loss for auxbn/sabn,
             adversarial loss only for bn.

Training attacks run through the adv route with the model in train mode by default
(``attack_bn="train"``, as the reference: the attack's forwards also update the adv route's
running statistics); ``attack_bn="eval"`` generates them with frozen statistics instead.

Distributed (torchrun, see :mod:`robust.distributed`): ``batch_size`` is the global batch. Every
rank draws the same global batch (same permutation and augmentation) and trains on its own
contiguous part, so N ranks see exactly the batches one process would; the loss is weighted by
the part's share so DDP's gradient average is the global batch's mean. Attacks run on the
unwrapped module; only rank 0 writes files; metrics are summed over ranks.

Faults: SIGINT/SIGTERM finish the current step, write last.pt (with the position inside the
epoch) and raise :class:`TrainingInterrupted`; a non-finite loss raises :class:`NonFiniteLoss`
naming the epoch and step, before anything is saved over the last good checkpoint; every file is
written atomically, so a kill -9 at any moment leaves a loadable last.pt.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks import fgsm_rs, pgd

from . import checkpoint as ckpt
from . import distributed as dist_
from . import outputs
from .config import ConfigError, TrainConfig
from .data import BatchLoader, ImageData, augmentation_for, load_dataset, memory_budget, split_train_val, to_float
from .engine import autocast, autocast_dtype, bn_mode, lr_at, precision_name
from .metrics import correct_under_attack
from .models import build_model
from .norms import ROUTES, is_dual_route, split_routes, use_route

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class RunExistsError(ConfigError):
    """The run folder already holds a run; pass --resume or --force."""


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite; the message names the epoch and step."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint or log could not be written (disk full, folder gone); the previous last.pt is kept."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a step; last.pt holds the position to resume from."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


@dataclass
class StepSettings:
    """What one training step needs to know, resolved once from the config."""

    method: str
    dual: bool
    eps: float
    alpha: float
    steps: int
    clean_weight: float
    attack_train_mode: bool
    fused: bool
    amp: torch.dtype | None
    device: torch.device

    @property
    def hybrid_loss(self) -> bool:
        return self.method == "hybrid" or (self.method == "fast" and self.dual)


def make_adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: StepSettings) -> torch.Tensor:
    """Training examples through the adv route, in the configured BN mode."""
    with use_route(model, "adv"), bn_mode(model, s.attack_train_mode), autocast(s.device, s.amp):
        if s.method == "fast":
            return fgsm_rs(model, x, y, s.eps)
        return pgd(model, x, y, s.eps, s.alpha, s.steps, random_start=True)


def step_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, s: StepSettings):
    """The method's loss and the adv-route logits of ``x_adv`` (for the running accuracy)."""
    with autocast(s.device, s.amp):
        if not s.hybrid_loss:
            with use_route(model, "adv"):
                adv_logits = model(x_adv)
            return F.cross_entropy(adv_logits.float(), y), adv_logits
        if s.fused:  # one forward over [x; x_adv], each half normalized by its own route
            with split_routes(model, len(x)):
                logits = model(torch.cat([x, x_adv]))
            clean_logits, adv_logits = logits[: len(x)], logits[len(x):]
        else:
            with use_route(model, "clean"):
                clean_logits = model(x)
            with use_route(model, "adv"):
                adv_logits = model(x_adv)
        w = s.clean_weight
        loss = w * F.cross_entropy(clean_logits.float(), y) + (1 - w) * F.cross_entropy(adv_logits.float(), y)
        return loss, adv_logits


def _without_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, x: torch.Tensor, y: torch.Tensor,
               s: StepSettings, attack_model: nn.Module | None = None, loss_scale: float = 1.0):
    """One optimizer step; returns the loss and the adv-route logits, both still on the device.

    ``model`` computes the loss (a DDP wrapper in distributed runs); the attack runs on
    ``attack_model`` (default: ``model`` without its DDP wrapper, so the attack's forwards and
    input gradients never touch DDP's hooks). ``loss_scale`` weights this rank's part of the
    global batch; the returned loss is unscaled.
    """
    attack_model = attack_model if attack_model is not None else _without_ddp(model)
    x_adv = make_adversarial(attack_model, x, y, s)
    model.train()
    loss, adv_logits = step_loss(model, x, x_adv, y, s)
    optimizer.zero_grad(set_to_none=True)
    objective = loss * loss_scale if loss_scale != 1.0 else loss
    if scaler is not None:
        scaler.scale(objective).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        objective.backward()
        optimizer.step()
    return loss.detach(), adv_logits.detach()


@torch.no_grad()
def _count_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).sum()


def route_correct_counts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, route: str, eps: float, alpha: float,
                         steps: int, batch_size: int, device: torch.device, amp: torch.dtype | None = None,
                         channels_last: bool = False) -> torch.Tensor:
    """``[clean correct, robust]`` counts (a device tensor) of one route under PGD, in eval mode.

    Robust is :func:`robust.metrics.correct_under_attack`'s definition, the same as ``robust.evaluate``'s.
    """
    counts = torch.zeros(2, device=device, dtype=torch.long)
    with use_route(model, route), bn_mode(model, False):
        for i in range(0, len(y), batch_size):
            xb = to_float(x[i:i + batch_size].to(device), channels_last)
            yb = y[i:i + batch_size].to(device)
            with autocast(device, amp):
                clean, robust = correct_under_attack(
                    model, xb, yb, lambda xa, ya: pgd(model, xa, ya, eps, alpha, steps, random_start=True))
            counts[0] += clean.sum()
            counts[1] += robust.sum()
    return counts


def evaluate_route(model: nn.Module, x: torch.Tensor, y: torch.Tensor, route: str, eps: float, alpha: float,
                   steps: int, batch_size: int, device: torch.device, amp: torch.dtype | None = None,
                   channels_last: bool = False) -> dict[str, float]:
    """Clean and PGD robust accuracy (%) of one route, attacked and scored through that route in eval mode."""
    counts = route_correct_counts(model, x, y, route, eps, alpha, steps, batch_size, device, amp, channels_last)
    n = max(len(y), 1)
    return {"clean": 100.0 * counts[0].item() / n, "robust": 100.0 * counts[1].item() / n}


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The RNG seed of one step's attack: a resumed run draws the same random starts as an uninterrupted one."""
    return (((seed * 1_000_003 + epoch) * 1_000_033 + batch) * 1_009 + rank) % (2 ** 63 - 1)


class Progress:
    """A tqdm bar per epoch on a terminal; nothing per batch otherwise (the epoch line is logged)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def show(self, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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


class FiniteWatch:
    """Finds the first step with a non-finite loss without a host sync per step.

    On the device it keeps "all losses finite so far" and the count of leading finite steps;
    :meth:`first_bad` reads them (one sync) at the trainer's check points.
    """

    def __init__(self, device: torch.device, batch: int, step: int) -> None:
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.good = torch.zeros((), dtype=torch.long, device=device)
        self.restart(batch, step)

    def restart(self, batch: int, step: int) -> None:
        self.ok.fill_(True)
        self.good.zero_()
        self.count, self.batch, self.step = 0, batch, step

    def update(self, loss: torch.Tensor) -> None:
        self.ok.logical_and_(torch.isfinite(loss))
        self.good += self.ok
        self.count += 1

    def first_bad(self) -> int | None:
        """The epoch batch index of the first non-finite loss since the last restart, or None."""
        if self.count == 0:
            return None
        good = int(self.good.item())
        return None if good == self.count else self.batch + good


def _write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and os.replace (a normal file mode, unlike mkstemp's 0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "x") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _append_line(path: Path, line: str) -> None:
    """Append one line; on failure cut the file back, so no half line is ever left."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        if path.exists():
            os.truncate(path, size)
        raise


def _line_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; infinity for a line that is not one (dropped on resume)."""
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _silent(msg: str) -> None:
    return None


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Trainer:
    """Adversarial training from a :class:`TrainConfig`: ``Trainer(config).fit()`` returns the final metrics.

    ``data`` may be passed to skip loading (tests, notebooks); ``resume`` continues from the run
    folder's last.pt (also from inside an epoch); ``force`` replaces an existing run folder's
    files. Under torchrun the trainer joins the process group itself. Keyword-only options:
    ``sync_bn`` (route-aware SyncBatchNorm; None keeps the resumed checkpoint's choice),
    ``check_every`` (steps between non-finite-loss checks), ``handle_signals`` (turn
    SIGINT/SIGTERM into a checkpoint and :class:`TrainingInterrupted` while fit() runs).
    """

    def __init__(self, config: TrainConfig, data: ImageData | None = None, resume: bool = False,
                 force: bool = False, log: Callable[[str], None] | None = None, *, sync_bn: bool | None = None,
                 check_every: int = 50, handle_signals: bool = True) -> None:
        self.config = config.validate()
        self.resume, self.force = resume, force
        self.run_dir = config.run_dir
        self.save_every_s = config.save_every or None  # the config is the one source of a run's settings
        self.check_every, self.handle_signals = max(1, int(check_every)), handle_signals
        self.dist, self.device = dist_.setup(config.device)
        self.log = (log or _to_stderr) if self.dist.is_main else _silent
        self._signal, self._last_save_time = 0, time.monotonic()
        self._lock: outputs.FolderLock | None = None  # taken by fit(): constructing a Trainer writes nothing
        error = None
        try:
            self._setup(data, sync_bn)
        except Exception as exc:  # every rank must learn of a failure on any rank, or the others hang
            if not self.dist.enabled:
                raise
            error = exc
        dist_.agree(self.dist, error)
        self._wrap()

    def _wrap(self) -> None:
        """DDP around the loss model (a collective: it broadcasts rank 0's weights)."""
        if self.dist.enabled:  # pgd on a dual model never uses the clean route's affine
            find_unused = self.settings.method == "pgd" and self.settings.dual
            self.loss_model = dist_.wrap_ddp(self.forward_model, self.dist, self.device, find_unused)

    # ---- setup ------------------------------------------------------------------------------
    def _setup(self, data: ImageData | None, sync_bn: bool | None) -> None:
        """Everything local to this rank (no collectives: a rank that fails here must not strand the others)."""
        c = self.config
        self._check_run_dir()
        if c.threads:
            torch.set_num_threads(c.threads)
        if c.batch_size < self.dist.world_size:
            raise ConfigError(f"batch-size {c.batch_size} is the global batch and must be >= the {self.dist.world_size} ranks; raise --batch-size")
        self.amp = autocast_dtype(c.precision, self.device)
        # a bad last.pt is reported before the (slower) data loading
        self._resumed_stamp = self._stamp() if self.resume else None
        state = ckpt.load_checkpoint(self.run_dir / "last.pt", map_location=self.device) if self.resume else None
        self.data = data if data is not None else load_dataset(
            c.dataset, c.data_dir, image_size=c.image_size, mode=c.data_mode, budget=memory_budget(self.device),
            workers=c.workers)
        self._build(sync_bn, state)
        if self.dist.is_main:
            self._check_writable()

    def _check_run_dir(self) -> None:
        """Refuse a folder we must not write: checked at setup, and again by fit() once it holds the lock."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"--out {self.run_dir} is a file, not a folder; pass a folder path")
        if self.resume:
            if not (self.run_dir / "last.pt").is_file():
                raise ConfigError(f"cannot resume: {self.run_dir}/last.pt does not exist; start a new run without --resume "
                                  "(with --force if the folder exists)")
        elif self.dist.is_main and outputs.holds_files(self.run_dir) and not self.force:
            raise RunExistsError(f"run folder {self.run_dir} already exists; pass --resume to continue it, --force to replace it, or --out NEW")

    def _stamp(self) -> tuple[int, int, int] | None:
        """What identifies the last.pt this trainer resumed from (inode, size, mtime)."""
        try:
            st = (self.run_dir / "last.pt").stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _lock_run_dir(self) -> None:
        """Become the folder's only writer (rank 0), then re-check it: another run may have used it since setup."""
        error = None
        if self.dist.is_main:
            try:
                self._lock = (self._lock or outputs.FolderLock(self.run_dir)).acquire()
                self._check_run_dir()
                if self.resume and self._stamp() != self._resumed_stamp:
                    raise ConfigError(f"{self.run_dir / 'last.pt'} changed after this run read it (another process wrote it); "
                                      "start the resume again")
            except Exception as exc:
                self._unlock()
                error = exc
        dist_.agree(self.dist, error)

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _build(self, sync_bn: bool | None, state: dict[str, Any] | None = None) -> None:
        c, d = self.config, self.data
        (train_x, train_y), self.val = split_train_val(d, c.val_split, c.seed, c.limit, c.val_limit)
        # Every rank iterates the same global batches; _local_part takes this rank's rows.
        # In-memory images move to the device once; streamed ones are read batch by batch.
        train_x = train_x.to(self.device) if isinstance(train_x, torch.Tensor) else train_x
        self.loader = BatchLoader(train_x, train_y.to(self.device), c.batch_size, augment=True, flip=d.flip,
                                  seed=c.seed, channels_last=c.channels_last, device=self.device,
                                  workers=getattr(train_x, "workers", 0), **augmentation_for(*train_x.shape[-2:]))
        torch.manual_seed(c.seed)
        model = build_model(c.arch, c.norm, d.num_classes, d.channels, c.width, d.mean, d.std).to(self.device)
        if state is not None:
            self._load_weights(model, state)
        saved_sync = bool((state or {}).get("distributed", {}).get("sync_bn", False))
        self.sync_bn = bool(sync_bn) if sync_bn is not None else saved_sync or bool(getattr(c, "sync_bn", False))
        if self.sync_bn:
            dist_.convert_sync_batchnorm(model)
        if c.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum,
                                         weight_decay=c.weight_decay, foreach=True)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        self.forward_model = torch.compile(model) if c.compile else model  # attacks run on this (no DDP)
        dual = is_dual_route(model)
        self.loss_model = self.forward_model  # wrapped in DDP by _wrap, after every rank set up
        self.settings = StepSettings(
            method=c.resolved_method, dual=dual, eps=c.eps_value, alpha=c.step_size_value,
            steps=c.steps, clean_weight=c.clean_weight, attack_train_mode=c.attack_bn == "train",
            fused=c.fused, amp=self.amp, device=self.device,
        )
        self.start_epoch, self.start_batch, self.step, self.best = 0, 0, 0, None
        self.resume_tally: dict[str, float] | None = None
        self.last_saved = "nothing yet"
        if state is not None:
            self._load_state(state)

    def _load_weights(self, model: nn.Module, state: dict[str, Any]) -> None:
        c, path = self.config, self.run_dir / "last.pt"
        saved = state.get("model_args", {})
        asked = {"arch": c.arch, "norm": c.norm}
        differ = [f"{k} {saved.get(k)!r} (asked: {v!r})" for k, v in asked.items() if saved.get(k) != v]
        if c.width is not None and saved.get("width") not in (None, c.width):
            differ.append(f"width {saved.get('width')} (asked: {c.width})")
        if differ:
            raise ckpt.CheckpointError(f"{path} holds another model: {', '.join(differ)}; drop those flags to resume it, or start a new run with --out NEW")
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, KeyError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ckpt.CheckpointError(f"{path} does not fit the configured model ({first}); resume with the run's own settings or start a new run") from None

    def _load_state(self, state: dict[str, Any]) -> None:
        path = self.run_dir / "last.pt"
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.step = int(state["scheduler"]["step"])
            completed = int(state["epoch"]) + 1
            self.best = state.get("best")
            position = state.get("position")
        except (KeyError, TypeError, ValueError) as exc:
            raise ckpt.CheckpointError(f"{path} lacks training state ({type(exc).__name__}: {exc}); it is not a last.pt of robust train, start a new run") from None
        if position:
            self.start_epoch, self.start_batch = int(position["epoch"]), int(position["batch"])
            self.resume_tally = position
        else:
            self.start_epoch, self.start_batch = completed, 0
        self.last_saved = self._describe(self.start_epoch, self.start_batch)
        where = f", step {self.start_batch}" if self.start_batch else ""
        self.log(f"resumed {self.run_dir} at epoch {self.start_epoch + 1}{where}")

    def _checkpoint_bytes(self) -> int:
        """About one checkpoint's size: the weights plus the optimizer's momentum buffers."""
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return weights + params

    def _check_writable(self) -> None:
        """Refuse before training when the run folder cannot take our files (probe write, free space)."""
        need = 3 * self._checkpoint_bytes() + (1 << 20)  # last.pt, best.pt and one temporary copy
        outputs.probe_folder(self.run_dir, "--out", need, what="the checkpoints")

    # ---- files (rank 0 writes, every rank agrees) ----------------------------------------------------
    def _on_main(self, write: Callable[[], None], what: str) -> None:
        """Run ``write`` on rank 0 only; a failed write becomes CheckpointWriteError on every rank."""
        error = None
        if self.dist.is_main:
            try:
                write()
            except OSError as exc:
                kept = (f"{self.run_dir / 'last.pt'} ({self.last_saved}) is kept"
                        if (self.run_dir / "last.pt").is_file() else "no last.pt was written yet")
                error = CheckpointWriteError(f"could not write {what} in {self.run_dir}: {exc.strerror or exc}; {kept}; "
                                             "free space or fix the folder, then rerun with --resume")
        dist_.agree(self.dist, error)

    def _prepare_run_dir(self) -> None:
        run = self.run_dir
        run.mkdir(parents=True, exist_ok=True)
        for name in ("last.pt", "best.pt", "metrics.jsonl", "config.json"):
            for stale in run.glob(f".{name}.*.tmp"):  # the temporary file of a write a kill -9 interrupted
                stale.unlink(missing_ok=True)
        if not self.resume:
            for name in ("metrics.jsonl", "last.pt", "best.pt"):
                (run / name).unlink(missing_ok=True)
        else:  # drop metric lines of epochs after the checkpoint (a crash between the two writes)
            path = run / "metrics.jsonl"
            if path.exists():
                lines = [l for l in path.read_text().splitlines() if _line_epoch(l) <= self.start_epoch]
                _write_text_atomic(path, "".join(l + "\n" for l in lines))
        _write_text_atomic(run / "config.json", json.dumps(self.config.to_dict(), indent=2) + "\n")

    def _checkpoint(self, completed_epoch: int, metrics: dict[str, Any] | None,
                    position: dict[str, Any] | None) -> dict[str, Any]:
        c = self.config
        return ckpt.build_checkpoint(
            self.model, optimizer=self.optimizer.state_dict(),
            scheduler={"step": self.step}, epoch=completed_epoch, best=self.best, metrics=metrics,
            config=c.to_dict(), dataset=c.dataset, data=self.data.record(), eps=c.eps_value, method=c.resolved_method,
            scaler=self.scaler.state_dict() if self.scaler is not None else None, position=position,
            distributed={"world_size": self.dist.world_size, "sync_bn": self.sync_bn},
        )

    @staticmethod
    def _describe(epoch: int, batch: int) -> str:
        """Where a last.pt stands, in words: before epoch ``epoch`` (0-based) batch ``batch``."""
        if batch:
            return f"epoch {epoch + 1}, step {batch}"
        return f"end of epoch {epoch}" if epoch else "start of training"

    def _save_position(self, epoch: int, batch: int, tally: EpochTally, elapsed: float) -> None:
        """last.pt at a point inside epoch ``epoch`` (0-based) before batch ``batch``."""
        position = {"epoch": epoch, "batch": batch, **tally.totals(self.dist), "seconds": elapsed}
        state = self._checkpoint(epoch - 1, None, position) if self.dist.is_main else None
        self._on_main(lambda: ckpt.save_checkpoint(state, self.run_dir / "last.pt"), "last.pt")
        self.last_saved = self._describe(epoch, batch)
        self._last_save_time = time.monotonic()

    def _save_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        key = "val_adv_robust"
        improved = key not in metrics or self.best is None or metrics[key] > self.best["value"]
        if improved:
            self.best = {"epoch": epoch + 1, "metric": key if key in metrics else "last_epoch",
                         "value": metrics.get(key, float(epoch + 1))}
        state = self._checkpoint(epoch, metrics, None) if self.dist.is_main else None

        def write() -> None:  # metrics first: a crash before last.pt redoes the epoch, and resume drops the line
            log = self.run_dir / "metrics.jsonl"
            size = log.stat().st_size if log.exists() else 0
            _append_line(log, json.dumps(metrics) + "\n")
            try:
                if improved:
                    ckpt.save_checkpoint(state, self.run_dir / "best.pt")
                ckpt.save_checkpoint(state, self.run_dir / "last.pt")
            except OSError:
                os.truncate(log, size)  # keep metrics.jsonl in step with last.pt
                raise

        self._on_main(write, f"the epoch {epoch + 1} checkpoint")
        self.last_saved = self._describe(epoch + 1, 0)
        self._last_save_time = time.monotonic()

    # ---- signals --------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        self._signal, self._signal_count, self._saved_handlers = 0, 0, {}
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNAL_NAMES:
            self._saved_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        """Note the signal; the loop stops after the current step. A third signal stops at once.

        (torchrun forwards the signal a terminal already sent to every worker, so two are normal.)
        """
        self._signal_count += 1
        if self._signal_count >= 3:
            self._restore_signal_handlers()
            raise KeyboardInterrupt
        self._signal = self._signal or signum

    def _restore_signal_handlers(self) -> None:
        for sig, handler in getattr(self, "_saved_handlers", {}).items():
            signal.signal(sig, handler)
        self._saved_handlers = {}

    # ---- training -----------------------------------------------------------------------------
    def _local_part(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's rows of the global batch and its loss weight; None when a rank would get no row."""
        if not self.dist.enabled:
            return x, y, 1.0
        n = len(y)
        if n < self.dist.world_size:
            return None
        rows = dist_.shard_rows(n, self.dist)
        return x[rows], y[rows], (rows.stop - rows.start) * self.dist.world_size / n

    def _check_finite(self, epoch: int, steps: int, watch: FiniteWatch, next_batch: int) -> None:
        """Raise NonFiniteLoss naming the first bad step (on every rank); restart the watch otherwise."""
        bad = watch.first_bad()
        if self.dist.enabled:  # the earliest bad step of any rank, through a max over (big - step)
            big = 1 << 40
            worst = dist_.control_max([big - bad if bad is not None else 0], self.dist)[0]
            bad = big - worst if worst else None
        if bad is not None:
            global_step = watch.step + (bad - watch.batch) + 1
            raise NonFiniteLoss(
                f"non-finite training loss at epoch {epoch + 1}, step {bad + 1} of {steps} (global step {global_step}); "
                f"training stopped and {self.run_dir / 'last.pt'} ({self.last_saved}) is kept; "
                "lower --lr, use --precision fp32, or check the data")
        watch.restart(next_batch, self.step)

    def _between_steps(self, epoch: int, next_batch: int, steps: int, tally: EpochTally, watch: FiniteWatch,
                       elapsed: float) -> None:
        """Agree on stop/save across ranks, check the loss every ``check_every`` steps, act."""
        due = (self.dist.is_main and self.save_every_s is not None and next_batch < steps
               and time.monotonic() - self._last_save_time >= self.save_every_s)
        signum, save = dist_.control_max([self._signal, int(due)], self.dist)
        if signum or save or watch.count >= self.check_every:
            self._check_finite(epoch, steps, watch, next_batch)
        if signum or save:
            self._save_position(epoch, next_batch, tally, elapsed)
        if signum:
            name = SIGNAL_NAMES.get(signum, f"signal {signum}")
            launcher = f" --nproc {self.dist.world_size}" if self.dist.enabled else ""
            raise TrainingInterrupted(signum, (
                f"stopped by {name} at epoch {epoch + 1}, step {next_batch} of {steps}; saved {self.run_dir / 'last.pt'}. "
                f"Resume with: robust train --out {self.run_dir} --resume{launcher}"))

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns loss, adv accuracy, images/s, seconds."""
        c = self.config
        steps = len(self.loader)
        first = self.start_batch if epoch == self.start_epoch else 0
        self.loader.set_epoch(epoch, skip=first)  # resuming inside the epoch: skipped batches are not read
        saved = self.resume_tally if epoch == self.start_epoch and self.resume_tally and self.dist.is_main else {}
        tally = EpochTally(self.device, saved.get("loss_sum", 0.0), saved.get("correct", 0), saved.get("seen", 0),
                           saved.get("seconds", 0.0) if epoch == self.start_epoch and self.resume_tally else 0.0)
        watch = FiniteWatch(self.device, first, self.step)
        progress = Progress(steps - first, f"epoch {epoch + 1}/{c.epochs}", not c.quiet and self.dist.is_main)
        start = time.perf_counter()
        lr = lr_at(self.step, c, steps)
        for i, (x, y) in enumerate(self.loader):
            if i < first:  # resuming inside the epoch: the loader yields (None, None) for these
                continue
            part = self._local_part(x, y)
            if part is None:
                break
            x, y, weight = part
            lr = lr_at(self.step, c, steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(step_seed(c.seed, epoch, i, self.dist.rank))
            loss, adv_logits = train_step(self.loss_model, self.optimizer, self.scaler, x, y, self.settings,
                                          attack_model=self.forward_model, loss_scale=weight)
            tally.add(loss, adv_logits, y)
            watch.update(loss)
            self.step += 1
            if progress.bar is not None and (i % 10 == 0 or i == steps - 1):
                progress.show(loss=f"{tally.loss_sum.item() / tally.seen:.3f}",
                              adv_acc=f"{100 * tally.correct.item() / tally.seen:.1f}")
            progress.update()
            self._between_steps(epoch, i + 1, steps, tally, watch, tally.seconds_before + time.perf_counter() - start)
        progress.close()
        self._check_finite(epoch, steps, watch, steps)
        totals = tally.totals(self.dist)
        dist_.average_running_stats(self.model, self.dist)
        seconds = tally.seconds_before + time.perf_counter() - start
        seen = max(totals["seen"], 1)
        return {"lr": lr, "train_loss": totals["loss_sum"] / seen, "train_adv_acc": 100.0 * totals["correct"] / seen,
                "seconds": seconds, "images_per_s": totals["seen"] / max(seconds, 1e-9)}

    def validate(self) -> dict[str, float]:
        """Clean and PGD-``val_steps`` accuracy of every route on the validation split (sharded over ranks)."""
        if self.val is None:
            return {}
        c, s = self.config, self.settings
        routes = ROUTES if s.dual else ("adv",)
        rows = slice(self.dist.rank, None, self.dist.world_size)
        x, y = self.val[0][rows], self.val[1][rows]
        counts = torch.stack([route_correct_counts(self.model, x, y, route, s.eps, s.alpha, c.val_steps,
                                                   max(c.batch_size, 256), self.device, self.amp, c.channels_last)
                              for route in routes])
        counts = dist_.all_reduce_sum(counts, self.dist).tolist()
        n = max(len(self.val[1]), 1)
        out = {}
        for route, (clean, robust) in zip(routes, counts):
            out[f"val_{route}_clean"], out[f"val_{route}_robust"] = 100.0 * clean / n, 100.0 * robust / n
        return out

    def fit(self) -> dict[str, Any]:
        """Train to ``config.epochs``; write config.json, metrics.jsonl, last.pt, best.pt; return the final metrics."""
        c = self.config
        self._lock_run_dir()  # nothing is written before this process is the folder's only writer
        self._install_signal_handlers()
        try:
            self._on_main(self._prepare_run_dir, "config.json")
            ranks = f" x {self.dist.world_size} ranks (DDP{', sync-bn' if self.sync_bn else ''})" if self.dist.enabled else ""
            width = f", width {self.model.build_args['width']}" if self.model.build_args.get("width") else ""
            streamed = f", streamed by {self.loader.workers} workers" if self.loader.streamed else ""
            n_val = 0 if self.val is None else len(self.val[1])
            self.log(f"training {c.arch} ({c.norm}{width}) on {c.dataset} "
                     f"[{len(self.loader.y)} training, {n_val} validation examples, {'x'.join(map(str, self.loader.x.shape[1:]))}{streamed}], "
                     f"method {c.resolved_method}, eps {c.eps}, device {self.device}{ranks}, "
                     f"precision {precision_name(self.amp)} -> {self.run_dir}")
            self._last_save_time = time.monotonic()
            if not self.resume:  # from now on a loadable last.pt always exists
                self._save_position(0, 0, EpochTally(self.device), 0.0)
            metrics: dict[str, Any] = {}
            for epoch in range(self.start_epoch, c.epochs):
                metrics = {"epoch": epoch + 1, **self.train_one_epoch(epoch), **self.validate()}
                self._save_epoch(epoch, metrics)
                self.log(format_epoch(metrics))
            return {"run_dir": str(self.run_dir), "best": self.best, **metrics}
        finally:
            self._restore_signal_handlers()
            self._unlock()


def format_epoch(m: dict[str, Any]) -> str:
    """One plain line per epoch."""
    parts = [f"epoch {m['epoch']}", f"lr {m['lr']:.4g}", f"loss {m['train_loss']:.3f}", f"train adv acc {m['train_adv_acc']:.1f}%"]
    for route in ROUTES:
        if f"val_{route}_clean" in m:
            parts.append(f"val {route}: clean {m[f'val_{route}_clean']:.1f}% robust {m[f'val_{route}_robust']:.1f}%")
    parts.append(f"{m['images_per_s']:.0f} img/s, {m['seconds']:.0f}s")
    return " | ".join(parts)
