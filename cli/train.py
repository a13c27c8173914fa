"""`robust train`: every flag is a field of TrainConfig, generated from the dataclass."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from robust.config import ConfigError, TrainConfig, load_toml

_TYPES = {"int": int, "float": float, "str": str}


def _field_option(f: dataclasses.Field):
    """A click option for one TrainConfig field; its default is None so we see what was passed."""
    flag = "--" + f.name.replace("_", "-")
    help_text = f"{f.metadata['help']}  [default: {f.default}]"
    if f.type == "bool":
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
    choices = f.metadata.get("choices")
    base = f.type.replace(" | None", "")
    kind = click.Choice(choices) if choices else _TYPES.get(base, str)
    return click.option(flag, f.name, type=kind, default=None, help=help_text)


def config_options(fn):
    """Decorate ``fn`` with one option per TrainConfig field."""
    for f in reversed(dataclasses.fields(TrainConfig)):
        fn = _field_option(f)(fn)
    return fn


def resolve_config(flags: dict[str, Any], config_file: str | None, resume: bool) -> TrainConfig:
    """Defaults <- the run's config.json (with --resume) <- TOML file <- flags given on the command line."""
    values: dict[str, Any] = {}
    given = {k: v for k, v in flags.items() if v is not None}
    if config_file:
        values.update(load_toml(config_file))
    if resume:
        out = given.get("out") or values.get("out") or TrainConfig(**{**values, **given}).run_dir
        saved = Path(out) / "config.json"
        if not saved.is_file():
            raise ConfigError(f"cannot resume: {saved} does not exist; start a new run without --resume")
        values = {**json.loads(saved.read_text()), **values}
    values.update(given)
    return TrainConfig.from_dict(values).validate()


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of config fields; flags override it")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last.pt")
@click.option("--force", is_flag=True, help="replace an existing run folder")
@config_options
def train(config_file: str | None, resume: bool, force: bool, **flags: Any) -> None:
    """PGD adversarial training; defaults reproduce the SaBN reference recipe on CIFAR-10.

    Writes config.json, metrics.jsonl (one line per epoch), last.pt (for --resume) and best.pt
    (best adv-route validation robust accuracy) into the run folder.

    \b
    Examples:
      robust train --norm sabn --eps 8/255
      robust train --dataset fashion-mnist --eps 0.1 --width 16 --epochs 5 --limit 10000
      robust train --out runs/a --resume --epochs 300
    """
    if resume and force:
        raise click.UsageError("--resume and --force exclude each other; pick one")
    from robust.trainer import Trainer

    config = resolve_config(flags, config_file, resume)
    result = Trainer(config, resume=resume, force=force).fit()
    click.echo(summary_table(result))


def summary_table(result: dict[str, Any]) -> str:
    """The end-of-run summary: final validation figures per route and where the files are."""
    lines = [f"run folder: {result['run_dir']}"]
    if result.get("best"):
        b = result["best"]
        lines.append(f"best.pt: epoch {b['epoch']} ({b['metric']} = {b['value']:.2f})")
    rows = [(r, result.get(f"val_{r}_clean"), result.get(f"val_{r}_robust")) for r in ("clean", "adv")]
    rows = [r for r in rows if r[1] is not None]
    if rows:
        lines.append(f"{'route':<8}{'val clean %':>13}{'val PGD %':>12}")
        lines += [f"{r:<8}{c:>13.2f}{a:>12.2f}" for r, c, a in rows]
    return "\n".join(lines)
