"""The `robust` command group; turns library errors into one-line messages with exit code 2."""

from __future__ import annotations

import click

from robust import __version__

from .common import BAD_INPUT_ERRORS, BadInput
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


def main() -> None:
    cli(prog_name="robust")


if __name__ == "__main__":
    main()
