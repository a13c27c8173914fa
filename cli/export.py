"""`robust export`: one route of a dual-route checkpoint as a plain BatchNorm model file."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from robust.checkpoint import build_checkpoint, load_model, read_checkpoint, save_checkpoint, weights_of
from robust.cli.common import BadInput, check_output_file, model_file
from robust.export.robustbench import Scores, ZooEntry, check_name, write_robustbench
from robust.nn.external import constructor_call, is_external
from robust.nn.mixed import plain_mixture
from robust.nn.norms import use_route
from robust.outputs import check_output_dir
from robust.run import Run, RunFiles


@click.command("export")
@click.argument("checkpoint")
@click.option("--route", type=click.Choice(["clean", "adv"]), default="adv", show_default=True,
              help="the route to keep (adv is the robust one; a bn model has only that one)")
@click.option("-o", "--out", required=True,
              help="the model file to write: FILE.pt, or FILE.safetensors (no pickle; the model's description in its "
                   "metadata); a folder ending in / gets <run>-<route>.pt")
@click.option("--weights", type=click.Choice(["ema", "live"]), default=None,
              help="ema: the averaged weights of a run trained with --ema; live: the optimizer's  [default: ema where kept]")
@click.option("--robustbench", "robustbench", default=None, metavar="NAME",
              help="write a RobustBench zoo entry named NAME instead: -o is then a folder that gets "
                   "models/<dataset>/<Linf|L2>/NAME.pt (the state dict RobustBench's load_model reads) and "
                   "model_info/<dataset>/<Linf|L2>/NAME.json (its leaderboard fields, accuracies from --eval)")
@click.option("--eval", "eval_json", default=None,
              help="with --robustbench: the `robust eval --json` file whose clean and AutoAttack accuracy go into "
                   "model_info  [default: eval.json in the run folder, where there is one]")
@click.option("--force", is_flag=True, help="overwrite an existing output file")
def export_command(checkpoint: str, route: str, out: str, force: bool, weights: str | None,
                   robustbench: str | None, eval_json: str | None) -> None:
    """Write ROUTE of CHECKPOINT (a file or run folder) as a plain single-route model.

    The file holds the route's weights as a plain model's: every norm's state is an ordinary
    BatchNorm2d's (SaBN affines folded; a torchvision/timm model's norms are its own classes,
    LayerNorm or BatchNormAct2d say), so it loads into the architecture built with plain
    BatchNorm2d (norm bn; for torchvision/timm models, their own constructor). The input
    normalization stays inside: images in [0, 1] in, logits out, ready for torchattacks,
    AutoAttack or RobustBench. `robust eval` and `robust.load_model` read the file and rebuild the
    norms as SharedBatchNorm2d, a BatchNorm2d subclass that computes exactly what BatchNorm2d does.

    \b
    Example:
      robust export runs/cifar10-sabn-hybrid-s0 --route adv -o sabn_adv.pt
      robust export runs/a -o exports/                    writes exports/a-adv.pt
      robust export runs/a --robustbench Smith2026Sandwich -o zoo/

    With --robustbench the model is checked as RobustBench's rules ask (two eval forwards agree,
    input gradients are non-zero) and the weights file is read back as RobustBench's load_model
    reads it (torch.load, its 'state_dict', strict load) before anything is written.
    """

    if robustbench is not None:
        export_robustbench(checkpoint, route, out, force, weights, robustbench, eval_json)
        return
    if eval_json is not None:
        raise BadInput("--eval goes with --robustbench (it fills model_info); drop it or add --robustbench NAME")
    source = model_file(checkpoint)
    out_file = check_output_file(out, "-o", force, f"{_stem(source)}-{route}.pt", inputs=(source,))
    state = read_checkpoint(source)
    if state.get("kind") == "export":
        raise BadInput(f"{checkpoint} is already an export ({state.get('route')} route); export from the training checkpoint")
    if state.get("kind") == "mix":
        export_mixture(state, source, out_file, force)
        return
    model = load_model(state, weights=weights)
    exported = load_model(state, route, weights)
    input_size = (state.get("data") or {}).get("input_size")
    gap = _max_logit_gap(model, exported, route, input_size)
    if gap > 1e-3:
        raise click.ClickException(f"the exported {route} route differs from the checkpoint by {gap:.3g} in the logits; not written")
    meta = {k: state[k] for k in ("dataset", "data", "eps", "method", "epoch", "metrics") if k in state}
    meta["weights"] = weights_of(state, weights)
    args = exported.build_args
    if is_external(args["arch"]):  # the file also says how to use the weights without robust
        meta["constructor"] = constructor_call(args["arch"], args["num_classes"], args["in_channels"],
                                               args.get("image_size"), args.get("patch_size"))
        meta["input_normalization"] = {"mean": list(args["mean"]), "std": list(args["std"])}
    save_checkpoint(build_checkpoint(exported, kind="export", route=route, source=str(source), **meta), out_file,
                    overwrite=force)
    what = f"{args['arch']} (width {args['width']})" if args.get("width") else args["arch"]
    click.echo(f"wrote {out_file}: {what}, {route} route of a {model.build_args['norm']} model, "
               f"plain norm layers; inputs in [0, 1] (N, {args['in_channels']}, H, W), {args['num_classes']} logits out "
               f"(largest logit gap to the checkpoint's route: {gap:.2g})")
    if "constructor" in meta:
        click.echo(f"its state_dict (the file's 'model') loads into {meta['constructor']}; "
                   f"apply (x - mean) / std first, mean {_short(args['mean'])}, std {_short(args['std'])}")


def export_mixture(state: dict, source: Path, out_file: Path, force: bool) -> None:
    """A mixture file as a plain module: both routes exported to plain norm layers, the mixture kept around them."""
    model = load_model(state)
    exported = plain_mixture(model)
    input_size = (state.get("data") or {}).get("input_size")
    gap = _max_logit_gap(model, exported, "adv", input_size)
    if gap > 1e-3:
        raise click.ClickException(f"the exported mixture differs from the file by {gap:.3g} in the logits; not written")
    meta = {k: state[k] for k in ("dataset", "data", "eps", "threat", "method", "calibration") if k in state}
    save_checkpoint(build_checkpoint(exported, kind="export", route="mixture", source=str(source), **meta), out_file,
                    overwrite=force)
    click.echo(f"wrote {out_file}: the mixture with plain norm layers; inputs in [0, 1], log mixed probabilities out "
               f"(largest logit gap to the file's: {gap:.2g})")


def _stem(source: Path) -> str:
    """A name for the export: the run folder's for best.pt / last.pt, else the file's own."""
    return source.parent.name if source.name in RunFiles.CHECKPOINTS else source.stem


def _short(values) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def _max_logit_gap(model, exported, route: str, input_size=None) -> float:
    """Largest logit difference between the model's route and the export on a random batch (eval mode)."""

    channels, height, width = input_size or (model.build_args["in_channels"], 32, 32)
    x = torch.rand(8, channels, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), use_route(model, route):
        return (model.eval()(x) - exported.eval()(x)).abs().max().item()


def export_robustbench(checkpoint: str, route: str, out: str, force: bool, weights: str | None, name: str,
                       eval_json: str | None) -> None:
    """`robust export --robustbench NAME -o DIR`: a RobustBench zoo entry's weights and model_info."""
    check_name(name)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"-o {out} is a file; with --robustbench -o names a folder (it gets models/ and model_info/)")
    check_output_dir(folder, "-o")
    source = model_file(checkpoint)
    state = read_checkpoint(source)
    if state.get("kind") == "export":
        raise BadInput(f"{checkpoint} is already an export ({state.get('route')} route); export from the training checkpoint")
    if "eps" not in state or "dataset" not in state:
        raise BadInput(f"{checkpoint} records no eps or dataset; export from a run folder of `robust train`")
    evaluation, eval_source = _evaluation_for(source, eval_json)
    exported = load_model(state, route, weights)
    input_size = (state.get("data") or {}).get("input_size") or (exported.build_args["in_channels"], 32, 32)
    threat = state.get("threat", "linf")
    entry = ZooEntry(name, state["dataset"], threat, float(state["eps"]))
    written = write_robustbench(folder, entry, exported, route, input_size, Scores(evaluation, eval_source),
                                run=state, overwrite=force)
    for check in written["checks"]:
        click.echo(f"  ok    {check.name}: {check.detail}")
    info = written["info"]
    click.echo(f"wrote {written['weights']} and {written['model_info']}: clean {info['clean_acc'] or 'not evaluated'}, "
               f"AutoAttack {info['autoattack_acc'] or 'not evaluated'} (read back as RobustBench reads it: logit gap {written['gap']:.2g})")
    args = ", ".join(f"{k}={v!r}" for k, v in written["args"].items())
    click.echo(f"its zoo entry: ('{name}', {{'model': lambda: robust.build_model({args}), 'gdrive_id': None}})")


def _evaluation_for(source: Path, eval_json: str | None) -> tuple[dict | None, str | None]:
    """The evaluation whose figures go into model_info: --eval, else the run folder's eval.json, else none."""
    if eval_json is None:
        if source.name not in RunFiles.CHECKPOINTS or not Run.holds_run(source.parent):
            return None, None
        run = Run(source.parent)
        evaluation = run.evaluation
        return (evaluation, str(run.file(RunFiles.EVALUATION))) if evaluation is not None else (None, None)
    path = Path(eval_json)
    if not path.is_file():
        raise BadInput(f"--eval {eval_json} does not exist; write it with `robust eval RUN --attack autoattack --json FILE`")
    try:
        evaluation = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path} is not readable JSON ({type(exc).__name__}); write it with `robust eval --json`") from None
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("routes"), dict):
        raise BadInput(f"{path} is no `robust eval --json` file (no per-route table)")
    return evaluation, str(path)
