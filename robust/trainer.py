"""PGD adversarial training of dual-route models: one step, one epoch, one validation.

Methods:
- ``pgd``    Madry et al.: cross-entropy of the adv route on PGD examples only.
- ``hybrid`` the SaBN reference: ``w * CE(clean route, x) + (1 - w) * CE(adv route, x_adv)``.
- ``fast``   FGSM with random start (Wong et al. 2020); hybrid loss for auxbn/sabn,
             adversarial loss only for bn.

Training attacks run through the adv route with the model in train mode by default
(``attack_bn="train"``, as the reference: the attack's forwards also update the adv route's
running statistics); ``attack_bn="eval"`` generates them with frozen statistics instead.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks import fgsm_rs, pgd

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .data import BatchLoader, ImageData, load_dataset, split_train_val, to_float
from .engine import autocast, autocast_dtype, bn_mode, lr_at, resolve_device
from .models import build_model
from .norms import ROUTES, is_dual_route, split_routes, use_route


class RunExistsError(ConfigError):
    """The run folder already holds a run; pass --resume or --force."""


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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, x: torch.Tensor, y: torch.Tensor, s: StepSettings):
    """One optimizer step; returns the loss and the adv-route logits, both still on the device."""
    x_adv = make_adversarial(model, x, y, s)
    model.train()
    loss, adv_logits = step_loss(model, x, x_adv, y, s)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), adv_logits.detach()


@torch.no_grad()
def _count_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).sum()


def evaluate_route(model: nn.Module, x: torch.Tensor, y: torch.Tensor, route: str, eps: float, alpha: float,
                   steps: int, batch_size: int, device: torch.device, amp: torch.dtype | None = None,
                   channels_last: bool = False) -> dict[str, float]:
    """Clean and PGD robust accuracy (%) of one route, attacked and scored through that route in eval mode."""
    correct_clean = torch.zeros((), device=device, dtype=torch.long)
    correct_adv = torch.zeros((), device=device, dtype=torch.long)
    with use_route(model, route), bn_mode(model, False):
        for i in range(0, len(y), batch_size):
            xb = to_float(x[i:i + batch_size].to(device), channels_last)
            yb = y[i:i + batch_size].to(device)
            with autocast(device, amp):
                with torch.no_grad():
                    correct_clean += _count_correct(model(xb), yb)
                x_adv = pgd(model, xb, yb, eps, alpha, steps, random_start=True)
                with torch.no_grad():
                    correct_adv += _count_correct(model(x_adv), yb)
    n = max(len(y), 1)
    return {"clean": 100.0 * correct_clean.item() / n, "robust": 100.0 * correct_adv.item() / n}


class Progress:
    """A tqdm bar per epoch on a terminal; nothing per batch otherwise (the epoch line is logged)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """Adversarial training from a :class:`TrainConfig`: ``Trainer(config).fit()`` returns the final metrics.

    ``data`` may be passed to skip loading (tests, notebooks); ``resume`` continues from the run
    folder's last.pt; ``force`` replaces an existing run folder's files.
    """

    def __init__(self, config: TrainConfig, data: ImageData | None = None, resume: bool = False,
                 force: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.config = config.validate()
        self.resume, self.force = resume, force
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.run_dir = config.run_dir
        self._check_run_dir()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.amp = autocast_dtype(config.precision, self.device)
        self.data = data if data is not None else load_dataset(config.dataset, config.data_dir)
        self._build()

    # ---- setup ------------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        exists = self.run_dir.exists() and any(self.run_dir.iterdir())
        if self.resume:
            if not (self.run_dir / "last.pt").is_file():
                raise ConfigError(f"cannot resume: {self.run_dir}/last.pt does not exist; start a new run without --resume")
        elif exists and not self.force:
            raise RunExistsError(f"run folder {self.run_dir} already exists; pass --resume to continue it, --force to replace it, or --out NEW")

    def _build(self) -> None:
        c, d = self.config, self.data
        (train_x, train_y), val = split_train_val(d, c.val_split, c.seed)
        if c.limit:
            train_x, train_y = train_x[: c.limit], train_y[: c.limit]
        if val is not None and c.val_limit:
            val = (val[0][: c.val_limit], val[1][: c.val_limit])
        self.val = val
        self.loader = BatchLoader(train_x.to(self.device), train_y.to(self.device), c.batch_size, augment=True,
                                  flip=d.flip, seed=c.seed, channels_last=c.channels_last)
        torch.manual_seed(c.seed)
        model = build_model(c.arch, c.norm, d.num_classes, d.channels, c.width, d.mean, d.std).to(self.device)
        if c.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum,
                                         weight_decay=c.weight_decay, foreach=True)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        self.forward_model = torch.compile(model) if c.compile else model
        self.settings = StepSettings(
            method=c.resolved_method, dual=is_dual_route(model), eps=c.eps_value, alpha=c.step_size_value,
            steps=c.steps, clean_weight=c.clean_weight, attack_train_mode=c.attack_bn == "train",
            fused=c.fused, amp=self.amp, device=self.device,
        )
        self.start_epoch, self.step, self.best = 0, 0, None
        if self.resume:
            self._load_state(ckpt.load_checkpoint(self.run_dir / "last.pt", map_location=self.device))

    # ---- checkpoints --------------------------------------------------------------------------
    def _checkpoint(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        return ckpt.build_checkpoint(
            self.model, optimizer=self.optimizer.state_dict(),
            scheduler={"step": self.step}, epoch=epoch, best=self.best, metrics=metrics,
            config=c.to_dict(), dataset=c.dataset, eps=c.eps_value, method=c.resolved_method,
            rng={"torch": torch.get_rng_state()},
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
        )

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["scheduler"]["step"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best = state.get("best")
        torch.set_rng_state(state["rng"]["torch"])
        self.log(f"resumed {self.run_dir} at epoch {self.start_epoch + 1}")

    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            for name in ("metrics.jsonl", "last.pt", "best.pt"):
                (self.run_dir / name).unlink(missing_ok=True)
        else:  # drop metric lines of epochs after the checkpoint (a crash between the two writes)
            path = self.run_dir / "metrics.jsonl"
            if path.exists():
                lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["epoch"] <= self.start_epoch]
                path.write_text("".join(l + "\n" for l in lines))
        (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    # ---- training -----------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns loss, adv accuracy, images/s, seconds."""
        c, model = self.config, self.forward_model
        self.loader.set_epoch(epoch)
        torch.manual_seed(c.seed * 100_003 + epoch)  # attack starts: same on resume as uninterrupted
        steps_per_epoch = len(self.loader)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        progress = Progress(steps_per_epoch, f"epoch {epoch + 1}/{c.epochs}", not c.quiet)
        start = time.perf_counter()
        for i, (x, y) in enumerate(self.loader):
            lr = lr_at(self.step, c, steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, adv_logits = train_step(model, self.optimizer, self.scaler, x, y, self.settings)
            loss_sum += loss * len(y)
            correct += _count_correct(adv_logits, y)
            seen += len(y)
            self.step += 1
            if progress.bar is not None and (i % 10 == 0 or i == steps_per_epoch - 1):
                progress.bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", adv_acc=f"{100 * correct.item() / seen:.1f}",
                                         img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
            progress.update()
        progress.close()
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}; lower --lr or use --precision fp32 (last good checkpoint kept)")
        seconds = time.perf_counter() - start
        return {"lr": lr, "train_loss": loss_sum.item() / seen, "train_adv_acc": 100.0 * correct.item() / seen,
                "seconds": seconds, "images_per_s": seen / seconds}

    def validate(self) -> dict[str, float]:
        """Clean and PGD-``val_steps`` accuracy of every route on the validation split."""
        if self.val is None:
            return {}
        c, s = self.config, self.settings
        routes = ROUTES if s.dual else ("adv",)
        out = {}
        for route in routes:
            acc = evaluate_route(self.model, self.val[0], self.val[1], route, s.eps, s.alpha, c.val_steps,
                                 max(c.batch_size, 256), self.device, self.amp, c.channels_last)
            out[f"val_{route}_clean"], out[f"val_{route}_robust"] = acc["clean"], acc["robust"]
        return out

    def fit(self) -> dict[str, Any]:
        """Train to ``config.epochs``; write config.json, metrics.jsonl, last.pt, best.pt; return the final metrics."""
        c = self.config
        self._prepare_run_dir()
        self.log(f"training {c.arch} ({c.norm}, width {self.model.build_args['width']}) on {c.dataset} "
                 f"[{len(self.loader.y)} examples], method {c.resolved_method}, eps {c.eps}, device {self.device}, "
                 f"precision {self.amp or 'fp32'} -> {self.run_dir}")
        metrics: dict[str, Any] = {}
        for epoch in range(self.start_epoch, c.epochs):
            metrics = {"epoch": epoch + 1, **self.train_one_epoch(epoch), **self.validate()}
            self._save_epoch(epoch, metrics)
            self.log(format_epoch(metrics))
        return {"run_dir": str(self.run_dir), "best": self.best, **metrics}

    def _save_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        key = "val_adv_robust"
        improved = key not in metrics or self.best is None or metrics[key] > self.best["value"]
        if improved:
            self.best = {"epoch": epoch + 1, "metric": key if key in metrics else "last_epoch",
                         "value": metrics.get(key, float(epoch + 1))}
        state = self._checkpoint(epoch, metrics)
        if improved:
            ckpt.save_checkpoint(state, self.run_dir / "best.pt")
        ckpt.save_checkpoint(state, self.run_dir / "last.pt")
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")


def format_epoch(m: dict[str, Any]) -> str:
    """One plain line per epoch."""
    parts = [f"epoch {m['epoch']}", f"lr {m['lr']:.4g}", f"loss {m['train_loss']:.3f}", f"train adv acc {m['train_adv_acc']:.1f}%"]
    for route in ROUTES:
        if f"val_{route}_clean" in m:
            parts.append(f"val {route}: clean {m[f'val_{route}_clean']:.1f}% robust {m[f'val_{route}_robust']:.1f}%")
    parts.append(f"{m['images_per_s']:.0f} img/s, {m['seconds']:.0f}s")
    return " | ".join(parts)
