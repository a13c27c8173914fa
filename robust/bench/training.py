"""Training-throughput benchmark: the project's trainer step against a textbook adversarial-training loop.

Two variants train the same model (same architecture, width, init seed), on the same batch size,
with the same attack steps:

- ``project``  the trainer's own pieces: :func:`robust.train.build.build_training` builds the data loader
  (uint8 tensors on the device, batched crop/flip), the channels_last model and the foreach SGD, and
  :meth:`robust.train.step.StepSettings.from_plan` the step settings, as for a run; each step is :func:`robust.train.step.train_step`, the trainer's
  (input-only attack gradients, fused split-route hybrid forward, one backward, the configured precision).
- ``textbook`` written the way research code does it: fp32, NCHW, a ``torch.utils.data.DataLoader``
  over a Dataset that turns each image into a PIL image and applies torchvision's
  RandomCrop(padding 4) + RandomHorizontalFlip + ToTensor, a plain PGD loop that calls
  ``loss.backward()`` (so every attack step also computes parameter gradients), then a clean-route
  forward and an adv-route forward as two passes, ``optimizer.zero_grad()``, one backward.

Timing: one warm-up run per variant, then ``repeats`` runs alternating project, textbook, project,
... in one process; each run times ``iters`` training steps (device synchronized before the clock
is read). Throughput is images/s per run; the figures are medians and ``speedup`` is the ratio of
the two medians.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` around one step in this process. On the
CPU torch has no allocator statistics, so each variant runs in a fresh subprocess that builds it,
runs ``iters`` steps, and reports the peak resident set size (``ru_maxrss``) of
that process; both the whole-process peak and its rise over the resident size right after setup
(the training step's own working memory) are reported.

Achieved GFLOP/s: the FLOPs of one step of each variant are counted with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products, forward and
backward; elementwise work is not counted) and divided by that variant's median step time. "Of
peak" divides by the machine's peak **in the precision the variant ran**: the best time of a large
matmul in that dtype on the same device (fp32 for the textbook loop; bf16 when the project variant
autocasts to bf16, whose peak on AMX CPUs is several times the fp32 one).

On CUDA the clock is CUDA events around the steps (recorded on the stream, read after a synchronize).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from robust.config import TrainConfig
from robust.data.types import DATASET_INFO, ImageData
from robust.errors import ConfigError
from robust.nn.factory import build_model
from robust.nn.norms import use_route
from robust.plan import TrainPlan
from robust.runtime import precision_name, resolve_device
from robust.threat import parse_eps
from robust.train.build import build_training, training_precision
from robust.train.step import StepSettings, train_step

VARIANTS = ("project", "textbook")


BENCH_METHODS = ("pgd", "hybrid", "fast")  # what the textbook loop implements


# name: (channels, height, width, training-set size)
DATASET_SHAPES = {
    "cifar10": (3, 32, 32, 50_000),
    "cifar100": (3, 32, 32, 50_000),
    "svhn": (3, 32, 32, 73_257),
    "mnist": (1, 28, 28, 60_000),
    "fashion-mnist": (1, 28, 28, 60_000),
}


@dataclass
class BenchConfig:
    """One benchmark configuration; both variants use all of it (the textbook loop is always fp32 NCHW)."""

    arch: str = "preact_resnet18"
    norm: str = "sabn"
    width: int | None = 16
    dataset: str = "cifar10"
    images: int | None = None  # synthetic training-set size (default: the dataset's real size)
    batch_size: int = 128
    method: str = "hybrid"
    eps: str = "8/255"
    steps: int = 7  # attack steps
    precision: str = "auto"
    device: str = "auto"
    channels_last: bool = True
    compile: bool = False  # torch.compile the project variant's model (the textbook loop stays eager)
    iters: int = 2  # training steps per timed run
    repeats: int = 3  # timed runs per variant
    memory: bool = True
    flops: bool = True
    seed: int = 0

    def validate(self) -> "BenchConfig":
        if self.method not in BENCH_METHODS:
            raise ConfigError(f"bench compares methods its textbook loop also has: {', '.join(BENCH_METHODS)}; "
                              f"got {self.method!r}, pass one of those")
        if self.dataset not in DATASET_SHAPES:
            raise ConfigError(f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASET_SHAPES)}")
        for name in ("batch_size", "steps", "iters", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.images is not None and self.images < self.batch_size:
            raise ConfigError(f"images ({self.images}) must be at least the batch size ({self.batch_size})")
        parse_eps(self.eps)
        self.train_plan()  # the project variant's settings, checked
        return self

    @property
    def num_images(self) -> int:
        return self.images or DATASET_SHAPES[self.dataset][3]

    def train_plan(self) -> TrainPlan:
        """The resolved plan the project variant trains with (ConfigError for a bad setting)."""
        return TrainPlan.of(self.train_config())

    def train_config(self, out: str | None = None) -> TrainConfig:
        """The TrainConfig the project variant trains with."""
        return TrainConfig(
            dataset=self.dataset, val_split=0.0, arch=self.arch, norm=self.norm, width=self.width,
            batch_size=self.batch_size, method=self.method, eps=self.eps, steps=self.steps,
            device=self.device, precision=self.precision, channels_last=self.channels_last, compile=self.compile,
            seed=self.seed, quiet=True, warmup_steps=0, out=out,
        )


def synthetic_data(config: BenchConfig) -> ImageData:
    """Random uint8 images and labels of the dataset's shape, so the benchmark runs offline."""
    c, h, w, _ = DATASET_SHAPES[config.dataset]
    g = torch.Generator().manual_seed(config.seed)
    n = config.num_images
    x = torch.empty((n, c, h, w), dtype=torch.uint8).random_(0, 256, generator=g)  # in place: no int64 temporary
    y = torch.randint(0, DATASET_INFO[config.dataset].num_classes, (n,), generator=g)
    return ImageData(config.dataset, x, y, x[:1], y[:1])


def _endless(loader, set_epoch: Callable[[int], None] | None = None) -> Iterator:
    epoch = 0
    while True:
        if set_epoch is not None:
            set_epoch(epoch)
        yield from loader
        epoch += 1


def project_runner(config: BenchConfig, data: ImageData) -> tuple[Callable[[], None], nn.Module]:
    """A closure running one training step exactly as ``Trainer.train_one_epoch`` does (no run folder)."""

    tc = config.train_plan()
    device = resolve_device(config.device)
    amp = _project_precision(tc, data, device)
    parts = build_training(tc, data, device, amp)
    settings = StepSettings.from_plan(tc, amp, device)
    batches = _endless(parts.loader, parts.loader.set_epoch)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)

    def step() -> None:
        nonlocal loss_sum, correct
        x, y = next(batches)
        loss, adv_logits = train_step(parts.attack_model, parts.optimizer, parts.scaler, x, y, settings)
        loss_sum += loss * len(y)
        correct += (adv_logits.argmax(1) == y).sum()

    return step, parts.model


class PILImageDataset(torch.utils.data.Dataset):
    """Images kept as an (N, H, W, C) uint8 array and turned into PIL images one at a time (like torchvision.datasets.CIFAR10)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):

        img = self.images[i]
        img = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        return self.transform(img), int(self.labels[i])


def textbook_loader(data: ImageData, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """A DataLoader with per-image torchvision transforms (RandomCrop pad 4, flip, ToTensor)."""

    size = tuple(data.train_x.shape[-2:])
    transform = T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    images = data.train_x.permute(0, 2, 3, 1).numpy()
    dataset = PILImageDataset(images, data.train_y.numpy(), transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       generator=torch.Generator().manual_seed(seed))


def textbook_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """The common research-code PGD: ``loss.backward()`` fills parameter gradients too, then a sign step."""
    delta = torch.zeros_like(x).uniform_(-eps, eps)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()
        with torch.no_grad():
            delta += alpha * delta.grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp(0, 1) - x)
        delta.grad.zero_()
    return (x + delta).detach()


def textbook_runner(config: BenchConfig, data: ImageData) -> tuple[Callable[[], None], nn.Module]:
    """A closure running one textbook training step (fp32, NCHW, two forwards, naive PGD)."""
    tc = config.train_plan()
    device = resolve_device(config.device)
    torch.manual_seed(tc.seed)
    model = build_model(tc.arch, tc.norm, data.num_classes, data.channels, tc.width, data.mean, data.std).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    batches = _endless(textbook_loader(data, tc.batch_size, tc.seed))
    eps = tc.eps
    steps, alpha = (1, 1.25 * eps) if tc.objective_name == "fast" else (tc.steps, tc.step_size)
    w = tc.clean_weight

    def step() -> None:
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        model.train()
        with use_route(model, "adv"):
            x_adv = textbook_pgd(model, x, y, eps, alpha, steps)
            adv_loss = F.cross_entropy(model(x_adv), y)
        if w > 0:
            with use_route(model, "clean"):
                clean_loss = F.cross_entropy(model(x), y)
            loss = w * clean_loss + (1 - w) * adv_loss
        else:
            loss = adv_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, model


RUNNERS = {"project": project_runner, "textbook": textbook_runner}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_run(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` steps: CUDA events on a GPU, a synchronized wall clock elsewhere."""
    synchronize(device)
    if device.type == "cuda":
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_event.record()
        for _ in range(iters):
            step()
        end_event.record()
        end_event.synchronize()
        return start_event.elapsed_time(end_event) / 1000.0
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return time.perf_counter() - start


class _FlopCount(TorchDispatchMode):
    """Adds up the registered FLOP formulas of torch.utils.flop_counter for every op that runs.

    FlopCounterMode itself cannot wrap our step: its module tracker installs backward hooks that
    ``torch.autograd.grad`` (our input-only attack gradients) rejects. Same formulas, no module tracking.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one step (convolutions and matmuls, forward and backward), flop_counter's formulas."""
    with _FlopCount() as counter:
        step()
    return counter.total


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                       tries: int = 5) -> float:
    """The machine's measured matmul rate in ``dtype``: best of ``tries`` timings of an n x n product.

    n defaults to 1024 on the CPU and 8192 on a GPU (a 1024^3 product is launch-bound there). On a GPU
    an fp32 product uses TF32 exactly when cuDNN's convolutions do, so the peak is the one the
    trainer's convolutions can reach, not a stricter fp32 than they run in.
    """
    n = n or (8192 if device.type == "cuda" else 1024)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(tries):
            best = min(best, time_run(lambda: a @ b, 1, device))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2 * n ** 3 / best / 1e9


def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (from /proc/self/statm; the peak so far elsewhere)."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
    except OSError:
        return _rss_mb()
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_here(variant: str, config: BenchConfig) -> dict[str, float]:
    """Peak memory of ``variant`` measured in this process (CUDA allocator or, on the CPU, ru_maxrss).

    On the CPU this is only meaningful in a fresh process: see :func:`peak_memory`.
    """
    device = resolve_device(config.device)
    data = synthetic_data(config)
    step, _ = RUNNERS[variant](config, data)
    if device.type == "cuda":
        step()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(config.iters):
            step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / 2**20, "step_mb": (peak - base) / 2**20, "kind": "cuda max_memory_allocated"}
    base = _current_rss_mb()
    for _ in range(config.iters):
        step()
    peak = _rss_mb()
    return {"peak_mb": peak, "step_mb": peak - base, "kind": "cpu peak RSS of a fresh process"}


def peak_memory(variant: str, config: BenchConfig) -> dict[str, float]:
    """Peak memory of ``variant``: in this process on CUDA, in a fresh subprocess on the CPU."""
    if resolve_device(config.device).type == "cuda":
        return peak_memory_here(variant, config)
    code = ("import json, sys\nfrom robust.bench.training import BenchConfig, peak_memory_here\n"
            "cfg = BenchConfig(**json.loads(sys.stdin.read()))\n"
            f"print(json.dumps(peak_memory_here({variant!r}, cfg)))\n")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(asdict(config)), capture_output=True,
                          text=True, check=False, env=_child_env())
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {variant} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_env() -> dict[str, str]:
    """The parent's environment, with its torch thread count, so the child runs like the parent."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def machine_description(device: torch.device) -> str:
    """CPU model and thread count, or the GPU name; with the torch version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"{name}, {torch.get_num_threads()} threads"
    return f"{name}; torch {torch.__version__}"


@dataclass
class VariantResult:
    """One variant's figures."""

    images_per_s: list[float] = field(default_factory=list)
    median_images_per_s: float = 0.0
    median_step_s: float = 0.0
    flops_per_step: int | None = None
    achieved_gflops: float | None = None
    peak_fraction: float | None = None  # of the matmul peak in this variant's precision
    precision: str = "fp32"
    memory: dict[str, Any] | None = None


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark both variants; returns every figure (see the module docstring for the method)."""
    config.validate()
    say = progress or (lambda msg: None)
    device = resolve_device(config.device)
    data = synthetic_data(config)
    runners = {}
    for name in VARIANTS:
        runners[name], _ = RUNNERS[name](config, data)
    results = {name: VariantResult() for name in VARIANTS}
    for name in VARIANTS:  # warm-up: allocator, kernels, first-touch
        seconds = time_run(runners[name], 1, device)
        say(f"warm-up {name}: {seconds:.2f}s/step")
    for r in range(config.repeats):
        for name in VARIANTS:
            seconds = time_run(runners[name], config.iters, device)
            results[name].images_per_s.append(config.iters * config.batch_size / seconds)
            say(f"run {r + 1}/{config.repeats} {name}: {results[name].images_per_s[-1]:.1f} img/s")
    precision = {"project": _precision_name(config, device), "textbook": "fp32"}
    peaks = ({p: matmul_peak_gflops(device, PEAK_DTYPES[p]) for p in sorted(set(precision.values()))}
             if config.flops else {})
    for name, res in results.items():
        res.precision = precision[name]
        res.median_images_per_s = statistics.median(res.images_per_s)
        res.median_step_s = config.batch_size / res.median_images_per_s
        if config.flops:
            res.flops_per_step = count_step_flops(runners[name])
            res.achieved_gflops = res.flops_per_step / res.median_step_s / 1e9
            res.peak_fraction = res.achieved_gflops / peaks[res.precision]
    runners.clear()
    if config.memory:
        for name in VARIANTS:
            say(f"memory {name} ...")
            results[name].memory = peak_memory(name, config)
    speedup = results["project"].median_images_per_s / results["textbook"].median_images_per_s
    return {
        "config": asdict(config),
        "device": str(device),
        "machine": machine_description(device),
        "precision": precision["project"],
        "matmul_peak_gflops": peaks,
        "variants": {name: asdict(res) for name, res in results.items()},
        "speedup": speedup,
    }


PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _project_precision(tc: TrainPlan, data: ImageData, device: torch.device) -> torch.dtype | None:
    """The precision the project's step runs in: what ``robust train`` would choose for this config."""
    return training_precision(tc, data, device).dtype


def _precision_name(config: BenchConfig, device: torch.device) -> str:
    """The project's precision by name (``auto`` resolved as training resolves it, from the cache it measured)."""
    return precision_name(_project_precision(config.train_plan(), synthetic_data(config), device))
