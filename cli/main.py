"""The `robust` command group; turns library errors into one-line messages with exit code 2."""

from __future__ import annotations

import click

from robust import __version__

from .bench import bench
from .common import BAD_INPUT_ERRORS, BadInput
from .compare import analyze, compare, plot
from .demo import demo
from .evaluate import evaluate_command
from .export import export_command
from .train import train


class RobustGroup(click.Group):
    """A click group whose subcommands report bad input in one line, never with a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BAD_INPUT_ERRORS as exc:
            raise BadInput(str(exc)) from None


@click.group(cls=RobustGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="robust")
def cli() -> None:
    """Adversarial robustness training with dual-route Sandwich Batch Normalization.

    \b
      robust train --norm sabn --eps 8/255     PGD adversarial training (CIFAR-10 by default)
      robust eval RUN_DIR --attack pgd20       clean and robust accuracy per route
    """


cli.add_command(train)
cli.add_command(bench)
cli.add_command(compare)
cli.add_command(plot)
cli.add_command(analyze)
cli.add_command(evaluate_command)
cli.add_command(export_command)
cli.add_command(demo)


def main() -> None:
    cli(prog_name="robust")


if __name__ == "__main__":
    main()
