"""`robust train`: every flag is a field of TrainConfig, generated from the dataclass.

Multi-process training: ``robust train --nproc N ...`` (one machine) or torchrun started by hand,
``torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT
--rdzv-id JOB -m robust.cli train ...`` on every node (several machines).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click
import torch
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from robust.checks import format_duration
from robust.cli.common import BAD_INPUT_ERRORS, BadInput
from robust.config import TrainConfig
from robust.errors import CheckpointWriteError, ConfigError, NonFiniteLoss, PeerFailed, TrainingInterrupted
from robust.objectives import Option, all_options, method_names
from robust.plan import TrainPlan, command_words, load_config
from robust.runtime import resolve_device
from robust.train import distributed
from robust.train.budget import process_started
from robust.torchrun import env_rank, env_world_size
from robust.train.trainer import Trainer

_TYPES = {"int": int, "float": float, "str": str}


def _field_option(f: dataclasses.Field):
    """A click option for one TrainConfig field; its default is None so we see what was passed."""
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata["help"]  # a help that states its default itself says it once
    help_text += "" if "[default:" in help_text else f"  [default: {f.default}]"
    if f.type in ("bool", "bool | None"):
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
    choices = f.metadata.get("choices")
    choices = choices() if callable(choices) else choices
    base = f.type.replace(" | None", "")
    kind = click.Choice(choices) if choices else _TYPES.get(base, str)
    return click.option(flag, f.name, type=kind, default=None, help=help_text)


def _method_option(name: str, option: Option, methods: list[str]):
    """A click option for an option some methods declare (``--beta``): a shorthand for --method-options NAME=VALUE."""
    help_text = f"{', '.join(methods)}: {option.help} (--method-options {name}=VALUE)  [default: {option.default:g}]"
    return click.option("--" + name.replace("_", "-"), name, type=type(option.default), default=None, help=help_text)


def config_options(fn):
    """Decorate ``fn`` with one option per TrainConfig field and one per declared method option."""
    for name, (option, methods) in reversed(all_options().items()):
        fn = _method_option(name, option, methods)(fn)
    for f in reversed(dataclasses.fields(TrainConfig)):
        fn = _field_option(f)(fn)
    return fn


def resolve_config(flags: dict[str, Any], config_file: str | None, resume: bool) -> TrainConfig:
    """The settings :func:`robust.plan.load_config` resolves from these sources, as an editable TrainConfig."""
    return load_config(flags, config_file, resume).config()


TRAIN_HELP = f"""Adversarial training (--method {', '.join(method_names())}); defaults reproduce the SaBN reference recipe on CIFAR-10.

    Writes config.json, metrics.jsonl (one line per epoch), last.pt (for --resume) and best.pt
    (best adv-route validation robust accuracy, or --select-by corruption) into the run folder. Ctrl-C (SIGINT) or SIGTERM
    finishes the current step, writes last.pt and exits 130 / 143; --resume continues from there,
    with the run's own settings: a resume may change --epochs and how the run executes (device,
    threads, precision, ...), any other changed flag is refused (docs/methods.md).

    \b
    Examples:
      robust train --norm sabn --eps 8/255
      robust train --dataset fashion-mnist --eps 0.1 --width 16 --epochs 5 --limit 10000
      robust train --method trades --beta 6 --awp-gamma 0.005 --awp-warmup 10
      robust train --method nfgsm --clean-weight 0.5     (the catastrophic-overfitting guard is on)
      robust train --out runs/a --resume --epochs 300
      robust train --dataset fashion-mnist --eps 0.1 --recipe fast --time-budget 10m
      robust train --dataset imagefolder --data-dir pets --image-size 64 --arch torchvision:resnet18
      robust train --dataset tensors --data-dir mine.npz --eps 4/255
      robust train --nproc 4 --sync-bn                    DDP on 4 GPUs (or CPU processes)
      torchrun --nproc-per-node 4 -m robust.cli train --sync-bn  the same, started by torchrun
    """


@click.command(help=TRAIN_HELP)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of config fields; flags override it")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last.pt")
@click.option("--force", is_flag=True, help="replace an existing run folder")
@click.option("--nproc", type=int, default=None,
              help="train with N processes on this machine (starts torchrun --standalone); --batch-size stays the global batch")
@config_options
def train(config_file: str | None, resume: bool, force: bool, nproc: int | None, **flags: Any) -> None:
    """The help text is TRAIN_HELP (its method list read from the objectives' registry)."""
    if resume and force:
        raise click.UsageError("--resume and --force exclude each other; pick one")
    if nproc is not None and nproc < 1:
        raise BadInput(f"--nproc must be >= 1, got {nproc}; pass the number of processes to start")
    if nproc is not None and nproc > 1 and env_world_size() > 1:
        raise BadInput("--nproc cannot be used inside torchrun (WORLD_SIZE is already set); drop --nproc")
    try:
        plan = load_config(flags, config_file, resume)
    except BAD_INPUT_ERRORS as exc:
        _fail(exc, 2)
    if nproc is not None and nproc > 1:
        device = resolve_device(plan.device)
        if device.type == "cuda" and distributed.backend_for(device) == "nccl":
            try:
                distributed.check_gpu_count(nproc)
            except ConfigError as exc:
                _fail(exc, 2)
        switches = tuple(name for name, on in (("resume", resume), ("force", force)) if on)
        raise SystemExit(launch(nproc, command_words(flags, config_file, switches)))
    try:
        result = run_training(plan, resume=resume, force=force)
    finally:
        distributed.shutdown()
    if env_rank() == 0:
        click.echo(summary_table(result))


def run_training(plan: TrainPlan, resume: bool, force: bool) -> dict[str, Any]:
    """Train; turn the trainer's failures into one message from rank 0 and the right exit code."""

    try:
        return Trainer(plan, resume=resume, force=force, sync_bn=plan.sync_bn, started=process_started()).fit()
    except BAD_INPUT_ERRORS as exc:
        _fail(exc, 2)
    except PeerFailed as exc:
        _fail(exc, 2 if exc.bad_input else 1)
    except TrainingInterrupted as exc:
        if env_rank() == 0:
            click.echo(str(exc), err=True)
        raise SystemExit(exc.exit_code) from None
    except (NonFiniteLoss, CheckpointWriteError) as exc:
        _fail(exc, 1)
    except (MemoryError, torch.OutOfMemoryError) as exc:  # the folder is as it was, or last.pt is kept to resume
        first = str(exc).splitlines()[0] if str(exc) else "no detail"
        _fail(ConfigError(f"out of memory while training ({first}); lower --batch-size, --width or --epoch-size, "
                          "or train on a device with more memory"), 1)


def _fail(exc: Exception, code: int):
    """Rank 0 prints one ``Error: ...`` line; other ranks (and empty messages) exit quietly."""
    message = str(exc)
    if env_rank() != 0 or not message:
        raise SystemExit(code)
    error = BadInput(message) if code == 2 else click.ClickException(message)
    error.exit_code = code
    raise error from None


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m robust.cli train ARGV`` in ``nproc`` processes through torch.distributed.run; its exit code.

    The same launcher as ``torchrun --standalone --nproc-per-node N -m robust.cli train ...``; a worker's
    exit code comes back (2 bad input, 130/143 stopped by a signal after writing last.pt).
    """

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "robust.cli", "train", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = min(exc.failures.items())
        if failure.exitcode < 0:  # killed by a signal before it could save
            click.echo(f"Error: worker rank {rank} was killed by signal {-failure.exitcode}; "
                       "the last saved last.pt is intact: rerun with --resume", err=True)
            return 128 - failure.exitcode
        return failure.exitcode
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


def summary_table(result: dict[str, Any]) -> str:
    """The end-of-run summary: final validation figures per route and where the files are."""
    lines = [f"run folder: {result['run_dir']}"]
    if result.get("best"):
        b = result["best"]
        lines.append(f"best.pt: epoch {b['epoch']} ({b['metric']} = {b['value']:.2f})")
    rows = [(r, result.get(f"val_{r}_clean"), result.get(f"val_{r}_robust")) for r in ("clean", "adv")]
    rows = [r for r in rows if r[1] is not None]
    if rows:
        lines.append(f"{'route':<8}{'val natural %':>15}{'val PGD %':>12}")
        lines += [f"{r:<8}{c:>15.2f}{a:>12.2f}" for r, c, a in rows]
    if result.get("time_budget"):
        lines.append(f"took {format_duration(result['took_s'])} of the {result['time_budget']} time budget")
    return "\n".join(lines)
