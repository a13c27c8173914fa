"""`robust demo`: the main job in miniature, a time budget so it takes about 3 minutes on any machine."""

from __future__ import annotations

import click

from robust.checkpoint import load_model
from robust.cli.common import BadInput
from robust.cli.evaluate import format_table
from robust.config import TrainConfig
from robust.data.load import load_dataset
from robust.eval.evaluation import evaluate
from robust.outputs import holds_files
from robust.runtime import PRECISIONS
from robust.train.budget import process_started
from robust.train.trainer import Trainer

# Training gets 2m20s of the demo's ~3 minutes; loading and the PGD-20 evaluation of 1,000 images take the rest on
# two cores. The steps it buys (and so the figures) vary with the machine; config.json records them.
DEMO_BUDGET = "2m20s"
DEMO_TRAIN = dict(
    dataset="fashion-mnist", eps="0.1", recipe="fast", norm="sabn", limit=10000, time_budget=DEMO_BUDGET,
    val_limit=500, val_steps=10,
)


@click.command()
@click.option("--out", default="runs/demo", show_default=True, help="run folder")
@click.option("--force", is_flag=True, help="replace an existing demo run folder")
@click.option("--eval-limit", default=1000, show_default=True, help="test images scored with PGD-20")
@click.option("--data-dir", default=None, help="folder with the Fashion-MNIST files (default: the Debian package's)")
@click.option("--seed", default=0, show_default=True, help="random seed (split, order, augmentation, attack starts)")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="training precision: auto = bf16 on CUDA, and on a CPU where bf16 ran the model's step at least 1.2x faster than fp32 (timed once, cached), else fp32")
@click.option("--quiet", is_flag=True, help="no progress bars")
def demo(out: str, force: bool, eval_limit: int, data_dir: str | None, seed: int, precision: str, quiet: bool) -> None:
    """Train a small SaBN model on real Fashion-MNIST for as many steps as 2m20s buys, then report clean and PGD-20 accuracy.

    About 3 minutes in all on any machine; a faster one trains more steps.

    \b
    The same as:
      robust train --dataset fashion-mnist --eps 0.1 --recipe fast --norm sabn --limit 10000 \\
                   --time-budget 2m20s --val-limit 500 --out runs/demo
      robust eval runs/demo --attack pgd20 --limit 1000
    """

    if eval_limit < 1:
        raise BadInput(f"--eval-limit must be >= 1, got {eval_limit}")
    if holds_files(out) and not force:
        raise BadInput(f"run folder {out} already exists; pass --force to replace it or --out NEW")
    config = TrainConfig(**DEMO_TRAIN, data_dir=data_dir, out=out, quiet=quiet, seed=seed, precision=precision)
    data = load_dataset(config.dataset, data_dir)
    Trainer(config, data=data, force=force, started=process_started()).fit()
    model = load_model(out)
    click.echo(f"\nevaluating {out}/best.pt on {eval_limit} test images, Linf eps 0.1, PGD-20 (step eps/4, random start):")
    result = evaluate(model, (data.test_x, data.test_y), attacks=["pgd20"], eps=config.eps_value, route="both",
                      limit=eval_limit, progress=not quiet)
    click.echo(format_table(result))
    click.echo(f"({result['seconds']:.0f}s; the same: robust eval {out} --attack pgd20 --limit {eval_limit})")
