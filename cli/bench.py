"""`robust bench`: training throughput and peak memory of our trainer step against a textbook loop."""

from __future__ import annotations

import json
from typing import Any

import click
import torch

from robust.checks import check_fields
from robust.cli.common import check_output_file
from robust.config import TrainConfig
from robust.bench.training import BENCH_METHODS, BenchConfig, run_bench
from robust.data.types import DATASET_INFO
from robust.nn.norms import NORMS, norms_help
from robust.nn.resnet import ARCH_SPECS, available_archs
from robust.outputs import write_json
from robust.runtime import DEVICES, PRECISIONS


@click.command()
@click.option("--arch", type=click.Choice(available_archs()), default="preact_resnet18", show_default=True,
              help=f"architecture: {ARCH_SPECS.help()}")
@click.option("--norm", type=click.Choice(NORMS), default="sabn", show_default=True, help=f"norm kind: {norms_help()}")
@click.option("--width", type=click.IntRange(min=1), default=16, show_default=True, help="channels of the first stage")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=7, show_default=True, help="PGD attack steps (both variants)")
@click.option("--method", type=click.Choice(BENCH_METHODS), default="hybrid", show_default=True,
              help="methods the textbook loop also implements")
@click.option("--eps", default="8/255", show_default=True, help="Linf radius; PGD step is eps/4")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="the project variant's precision (the textbook loop is always fp32)")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--compile/--no-compile", default=False, show_default=True,
              help="torch.compile the project variant's model (the warm-up run pays the compilation)")
@click.option("--dataset", type=click.Choice(list(DATASET_INFO)), default="cifar10",
              show_default=True, help="shape of the synthetic uint8 data (no files are read)")
@click.option("--images", type=click.IntRange(min=1), default=None, help="synthetic training-set size [default: the dataset's]")
@click.option("--iters", type=click.IntRange(min=1), default=2, show_default=True, help="training steps per timed run")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="timed runs per variant, alternating")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch [default: torch's choice]")
@click.option("--memory/--no-memory", default=True, show_default=True, help="measure peak memory (a subprocess per variant on the CPU)")
@click.option("--flops/--no-flops", default=True, show_default=True, help="count FLOPs and time the matmul peak")
@click.option("--json", "json_path", default=None,
              help="also write every figure to this JSON file ('-' for stdout; a folder ending in / gets bench.json)")
@click.option("--force", is_flag=True, help="overwrite an existing --json file")
@click.option("--quiet", is_flag=True, help="no per-run progress lines")
def bench(threads: int | None, json_path: str | None, force: bool, quiet: bool, **options: Any) -> None:
    """Images/s, peak memory and GFLOP/s of our trainer step vs a textbook adversarial-training loop.

    Both variants train the same model with the same batch and attack steps on synthetic data;
    runs alternate (ours, textbook, ...) after a warm-up and the medians are compared. The last
    line is `speedup: X.XXx`.

    \b
    Examples:
      robust bench --width 16 --batch-size 128 --steps 7
      robust bench --width 64 --iters 1 --repeats 2 --json bench.json
    """

    json_file = check_output_file(json_path, "--json", force, "bench.json") if json_path not in (None, "-") else None
    check_fields(TrainConfig, {"threads": threads}, partial=True)
    config = BenchConfig(**options).validate()
    if threads:
        torch.set_num_threads(threads)
    progress = None if quiet else (lambda msg: click.echo(msg, err=True))
    result = run_bench(config, progress=progress)
    if json_path == "-":
        click.echo(json.dumps(result, indent=2))
    elif json_file:
        write_json(json_file, result, overwrite=force)
    if json_path != "-":
        click.echo(format_report(result))
    else:
        click.echo(f"speedup: {result['speedup']:.2f}x", err=True)


def format_report(r: dict[str, Any]) -> str:
    """The human-readable table; the last line is the speedup."""
    c = r["config"]
    lines = [
        f"machine: {r['machine']}",
        f"{c['arch']} {c['norm']} width {c['width']}, {c['method']} PGD-{c['steps']}, batch {c['batch_size']}, "
        f"device {r['device']}, project precision {r['precision']}, {c['repeats']} runs x {c['iters']} steps per variant",
    ]
    peaks = r.get("matmul_peak_gflops") or {}
    if peaks:
        lines.append("matmul peak: " + ", ".join(f"{p} {g:.1f} GFLOP/s" for p, g in peaks.items())
                     + " (each variant's 'of peak' is against the peak of its own precision)")
    header = f"{'variant':<10}{'precision':>10}{'img/s (median)':>16}{'runs':>28}{'GFLOP/step':>12}{'GFLOP/s':>10}{'of peak':>9}{'peak mem MiB':>14}{'step mem MiB':>14}"
    lines.append(header)
    for name, v in r["variants"].items():
        runs = ", ".join(_rate(x) for x in v["images_per_s"])
        flops = f"{v['flops_per_step'] / 1e9:.1f}" if v["flops_per_step"] else "-"
        gfs = f"{v['achieved_gflops']:.1f}" if v["achieved_gflops"] else "-"
        frac = f"{100 * v['peak_fraction']:.0f}%" if v["peak_fraction"] else "-"
        mem = v.get("memory") or {}
        peak_mem = f"{mem['peak_mb']:.0f}" if mem else "-"
        step_mem = f"{mem['step_mb']:.0f}" if mem else "-"
        lines.append(f"{name:<10}{v.get('precision', '-'):>10}{_rate(v['median_images_per_s']):>16}{runs[:27]:>28}{flops:>12}{gfs:>10}{frac:>9}{peak_mem:>14}{step_mem:>14}")
    if r["variants"]["project"].get("memory"):
        lines.append(f"memory: {r['variants']['project']['memory']['kind']}")
    lines.append(f"speedup: {r['speedup']:.2f}x")
    return "\n".join(lines)


def _rate(images_per_s: float) -> str:
    """Images/s with three significant digits (slow CPU runs are well under 1 img/s)."""
    return f"{images_per_s:.3g}"
