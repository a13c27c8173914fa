"""The `robust` command group; turns library errors into one-line messages with exit code 2."""

from __future__ import annotations

import functools

import click

from robust.cli.analyze import analyze
from robust.cli.bench import bench
from robust.cli.common import BAD_INPUT_ERRORS, BadInput, ascii_numbers
from robust.cli.compare import compare
from robust.cli.demo import demo
from robust.cli.evaluate import evaluate_command
from robust.cli.export import export_command
from robust.cli.plot import plot
from robust.cli.pseudo_label import pseudo_label
from robust.cli.report import report
from robust.cli.train import train
from robust.errors import ConfigError, TrainingInterrupted
from robust.runtime import __version__
from robust.train.distributed import env_rank


class RobustGroup(click.Group):
    """A click group whose subcommands report bad input in one line, never with a traceback.

    Also, for every subcommand: an empty value (``--out ''``) is bad input rather than a silent
    default, a number written with other than the digits 0-9 (``--epochs ３``) is bad input, and Ctrl-C exits 130 (as `robust train` does) instead of click's "Aborted!" with 1.
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.callback = _refusing_empty_values(cmd, cmd.callback)
        ascii_numbers(cmd)  # --epochs ３ is refused, not read as 3
        super().add_command(cmd, name)

    def main(self, *args, **kwargs):
        """Under torchrun only rank 0 reports a refusal or failure; the other ranks exit with the same code, silently
        (each would print the same line)."""
        if kwargs.get("standalone_mode", True) is False or _rank() == 0:
            return super().main(*args, **kwargs)
        try:
            super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.exceptions.Exit as exc:
            raise SystemExit(exc.exit_code) from None
        except click.ClickException as exc:
            raise SystemExit(exc.exit_code) from None
        except click.Abort:
            raise SystemExit(1) from None
        raise SystemExit(0)

    def invoke(self, ctx: click.Context):

        try:
            return super().invoke(ctx)
        except BAD_INPUT_ERRORS as exc:
            raise BadInput(str(exc)) from None
        except TrainingInterrupted as exc:  # a Trainer inside another command (compare, demo)
            click.echo(str(exc), err=True)
            raise click.exceptions.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            click.echo("Aborted (SIGINT).", err=True)
            raise click.exceptions.Exit(130) from None


def _rank() -> int:
    """torchrun's RANK of this process (0 outside torchrun, and where RANK is no number: rank 0 then explains)."""
    try:
        return env_rank()
    except ConfigError:
        return 0


def _refusing_empty_values(cmd: click.Command, callback):
    """``callback`` that first refuses an empty or blank text value of any of ``cmd``'s parameters."""
    if callback is None or getattr(callback, "refuses_empty", False):
        return callback

    @functools.wraps(callback)
    def checked(**params):
        for param in cmd.params:
            value = params.get(param.name)
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, str) and not v.strip() for v in values):
                name = "/".join(param.opts) if isinstance(param, click.Option) else param.human_readable_name
                raise BadInput(f"{name} is empty; give a value, or leave the option out for its default")
        return callback(**params)

    checked.refuses_empty = True
    return checked


@click.group(cls=RobustGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="robust")
def cli() -> None:
    """Adversarial robustness training with dual-route Sandwich Batch Normalization.

    \b
      robust train --norm sabn --eps 8/255     PGD adversarial training (CIFAR-10 by default)
      robust eval RUN_DIR --attack pgd20       clean and robust accuracy per route
    """


cli.add_command(train)
cli.add_command(pseudo_label)
cli.add_command(bench)
cli.add_command(compare)
cli.add_command(plot)
cli.add_command(analyze)
cli.add_command(evaluate_command)
cli.add_command(export_command)
cli.add_command(report)
cli.add_command(demo)


def main() -> None:
    cli(prog_name="robust")


if __name__ == "__main__":
    main()
