"""The `robust` command group; turns library errors into one-line messages with exit code 2."""

from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import click

from robust.cli.refusals import BAD_INPUT_ERRORS, BadInput, ascii_numbers
from robust.errors import ConfigError, TrainingInterrupted
from robust.torchrun import env_rank
from robust.version import __version__


class Entry(NamedTuple):
    """Where a command is defined, and the summary `robust --help` shows for it without importing that module."""

    module: str
    attribute: str
    summary: str  # the first sentence of the command's docstring (a test keeps the two equal)


# Every command, loaded only when it runs (or its own --help is asked for): `robust --help` and
# `robust --version` import no command module and no torch. One line per command.
COMMANDS: dict[str, Entry] = {
    "analyze": Entry("robust.cli.analyze", "analyze",
                     "Per norm layer: gradient norms of the clean and adversarial losses and their cosine."),
    "bench": Entry("robust.cli.bench", "bench",
                   "Images/s, peak memory and GFLOP/s of our trainer step vs a textbook adversarial-training loop."),
    "compare": Entry("robust.cli.compare", "compare",
                     "Train one model per norm with the same seed, split and budget; evaluate every route."),
    "demo": Entry("robust.cli.demo", "demo",
                  "Train a small SaBN model on real Fashion-MNIST for as many steps as 2m20s buys, then report clean and "
                  "PGD-20 accuracy."),
    "eval": Entry("robust.cli.evaluate", "evaluate_command",
                  "Clean and robust accuracy of CHECKPOINT (a file, a run folder meaning its best.pt, or an export)."),
    "export": Entry("robust.cli.export", "export_command",
                    "Write ROUTE of CHECKPOINT (a file or run folder) as a plain single-route model."),
    "mix": Entry("robust.cli.mix", "mix",
                 "Mix a run's clean and adv routes into one model, calibrated on its validation images."),
    "plot": Entry("robust.cli.plot", "plot",
                  "Learning curves of runs from their metrics.jsonl: validation clean and robust accuracy per epoch."),
    "pseudo-label": Entry("robust.cli.pseudo_label", "pseudo_label",
                          "Label unlabelled images with a standard model and write them as an --extra-data file."),
    "report": Entry("robust.cli.report", "report",
                    "One HTML page of RUNS (run folders, a `robust compare` folder for every run in it, or "
                    "`robust mix` files): everything embedded, it opens from disk without network."),
    "train": Entry("robust.cli.train", "train",
                   "Adversarial training (--method pgd, hybrid, trades, mart, fast, nfgsm, standard); "
                   "defaults reproduce the SaBN reference recipe on CIFAR-10."),
}


class RobustGroup(click.Group):
    """A click group whose subcommands report bad input in one line, never with a traceback.

    Also, for every subcommand: an empty value (``--out ''``) is bad input rather than a silent
    default, a number written with other than the digits 0-9 (``--epochs ３``) is bad input, and Ctrl-C exits 130 (as `robust train` does) instead of click's "Aborted!" with 1.

    ``lazy`` names commands by where they are defined (:data:`COMMANDS`): each module is imported the first
    time its command is asked for, and the group's own help lists them from their summaries.
    """

    def __init__(self, *args, lazy: dict[str, Entry] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, importing its module on first use."""
        if cmd_name not in self.commands and cmd_name in self.lazy:
            entry = self.lazy[cmd_name]
            self.add_command(getattr(importlib.import_module(entry.module), entry.attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The Commands section as click writes it, the lazy commands shown by their summaries (nothing imported)."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names), default=0)
        rows = []
        for name in names:
            cmd = click.Command(name, help=self.lazy[name].summary) if name in self.lazy else self.commands[name]
            if not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

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


@click.group(cls=RobustGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="robust")
def cli() -> None:
    """Adversarial robustness training with dual-route Sandwich Batch Normalization.

    \b
      robust train --norm sabn --eps 8/255     PGD adversarial training (CIFAR-10 by default)
      robust eval RUN_DIR --attack pgd20       clean and robust accuracy per route
    """


def main() -> None:
    cli(prog_name="robust")


if __name__ == "__main__":
    main()
