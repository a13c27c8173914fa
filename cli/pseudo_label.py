"""`robust pseudo-label`: a standard model labels unlabelled images; the result is an --extra-data file."""

from __future__ import annotations

import os
from pathlib import Path

import click
import torch

from robust.checkpoint import load_model, read_checkpoint
from robust.cli.common import BadInput, check_output_file, model_file
from robust.config import TrainConfig
from robust.data.unlabelled import SLICE, load_unlabelled
from robust.pseudo_label import select_confident, teacher_probabilities, why_nothing_kept, write_extra_file
from robust.nn.norms import routes_for
from robust.outputs import check_output_dir, same_file
from robust.run import Run
from robust.runtime import PRECISIONS, resolve_device
from robust.train.trainer import Trainer


def check_unlabelled_spec(spec: str) -> None:
    """Refuse an --unlabelled that names nothing readable before any teacher trains (its images are read after)."""
    if SLICE.match(spec.strip()) or Path(spec).is_dir() or (Path(spec).suffix in (".npz", ".pt") and Path(spec).is_file()):
        return
    raise BadInput(f"--unlabelled {spec}: not a folder, an existing .npz/.pt file or NAME[START:END] of a built-in "
                   "set; e.g. --unlabelled 'fashion-mnist[10000:]'")


def check_teacher_folder(folder: Path, target: Path) -> None:
    """The teacher's run folder, before it trains: not the -o file nor a folder that holds it, and a folder
    where a run can be written."""
    if same_file(folder, target) or os.path.realpath(target).startswith(os.path.realpath(folder) + os.sep):
        raise BadInput(f"--teacher-out {folder} and -o {target} collide (the teacher's run folder would hold or be the "
                       "extra-data file); choose another --teacher-out or -o")
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"--teacher-out {folder} is a file; give a folder for the teacher's run")
    check_output_dir(folder, "--teacher-out")


@click.command("pseudo-label")
@click.option("--unlabelled", required=True,
              help="the images to label: a folder of image files, an .npz/.pt file with x, or NAME[START:END] of a "
                   "built-in training set, e.g. 'fashion-mnist[10000:]'")
@click.option("-o", "--out", required=True, help="the --extra-data file to write (.npz: x, y, confidence, index)")
@click.option("--model", "model_path", default=None,
              help="the teacher: a run folder or checkpoint of a standard model (robust train --method standard)")
@click.option("--teacher-epochs", type=click.IntRange(min=1), default=None,
              help="instead of --model: train a standard model (--method standard --norm bn) on --dataset's first "
                   "--limit training images for this many epochs, into --teacher-out")
@click.option("--teacher-out", default=None, help="run folder of the trained teacher  [default: <out>-teacher]")
@click.option("--dataset", default="fashion-mnist", show_default=True, help="with --teacher-epochs: the labelled set")
@click.option("--limit", type=click.IntRange(min=2), default=10000, show_default=True,
              help="with --teacher-epochs: the labelled set is the first N training images")
@click.option("--teacher-width", type=click.IntRange(min=1), default=16, show_default=True,
              help="with --teacher-epochs: the PreAct ResNet-18's width")
@click.option("--data-dir", default=None, help="folder with the dataset files")
@click.option("--route", type=click.Choice(["clean", "adv"]), default="adv", show_default=True,
              help="the teacher's route that labels (a dual-route teacher's clean route is its standard one)")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="keep only images whose top probability is at least this")
@click.option("--per-class", type=click.IntRange(min=1), default=None,
              help="keep at most N images per predicted class, the most confident first")
@click.option("--balanced", is_flag=True,
              help="keep the same number of images for every class (the smallest class's count)")
@click.option("--soft", is_flag=True, help="write the teacher's probabilities as soft labels instead of its argmax")
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="with --teacher-epochs: the teacher's training precision")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="with --teacher-epochs")
@click.option("--force", is_flag=True, help="overwrite an existing output file (and teacher run folder)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def pseudo_label(unlabelled: str, out: str, model_path: str | None, teacher_epochs: int | None, teacher_out: str | None,
                 dataset: str, limit: int, teacher_width: int, data_dir: str | None, route: str, min_confidence: float,
                 per_class: int | None, balanced: bool, soft: bool, batch_size: int, device: str, precision: str,
                 seed: int, force: bool, quiet: bool) -> None:
    """Label unlabelled images with a standard model and write them as an --extra-data file.

    Carmon et al. 2019 ("Unlabeled data improves adversarial robustness") label 500,000 extra
    images with a standard (non-robust) model and train robustly on both sets; `robust train
    --extra-data FILE` does the second part.

    \b
    Examples:
      robust pseudo-label --teacher-epochs 5 --dataset fashion-mnist --limit 10000 \\
                          --unlabelled 'fashion-mnist[10000:]' -o runs/fm-extra.npz
      robust pseudo-label --model runs/teacher --unlabelled my_images/ --min-confidence 0.9 -o extra.npz
    """
    if (model_path is None) == (teacher_epochs is None):
        raise BadInput("pass the teacher: --model RUN (a standard model) or --teacher-epochs N (train one), not both")
    if not out.endswith(".npz"):
        raise BadInput(f"-o {out}: the extra-data file must end in .npz (uncompressed, memory-mapped by --extra-data)")
    if model_path is not None and teacher_out is not None:
        raise BadInput("--teacher-out names the folder of a teacher trained with --teacher-epochs; with --model drop it")
    check_unlabelled_spec(unlabelled)
    source = model_file(model_path) if model_path is not None else None
    teacher_dir = Path(teacher_out or f"{Path(out).with_suffix('')}-teacher") if model_path is None else None
    reads = (source, Path(unlabelled) if Path(unlabelled).is_file() else None)
    target = check_output_file(out, "-o", force, inputs=reads)
    if teacher_dir is not None:  # every output checked before the teacher trains
        check_teacher_folder(teacher_dir, target)
        if route != "adv":
            raise BadInput(f"--route {route}: the teacher --teacher-epochs trains is a bn model with a single route "
                           "(adv); drop --route")
    resolved = resolve_device(device)
    if source is not None:
        state = read_checkpoint(source)
        shape = tuple(state.get("data", {}).get("input_size") or ())
        model = load_model(state)
        routes_for(model, route)  # the rule export and eval apply: a single-route teacher has only its own
    else:
        config = TrainConfig.from_dict(dict(
            dataset=dataset, data_dir=data_dir, limit=limit, epochs=teacher_epochs, method="standard", norm="bn",
            width=teacher_width, batch_size=128, lr=0.1, schedule="onecycle", val_steps=1, seed=seed,
            precision=precision, quiet=quiet, device=device, out=str(teacher_dir),
        )).validate()
        Trainer(config, force=force).fit()
        state = read_checkpoint(Run(config.run_dir).checkpoint())
        shape = tuple(state["data"]["input_size"])
        model = load_model(state)
    if len(shape) != 3:
        raise BadInput(f"{model_path} does not record its input size; label with a run of robust train")
    images = load_unlabelled(unlabelled, shape, data_dir)
    click.echo(f"labelling {images.description} with {'the teacher' if model_path is None else model_path} "
               f"({route} route)", err=True)
    probs = teacher_probabilities(model, images.x, batch_size, resolved, route, progress=not quiet)
    keep = select_confident(probs, min_confidence, per_class, balanced)
    if len(keep) == 0:
        raise BadInput(why_nothing_kept(probs, min_confidence, balanced))
    write_extra_file(target, images.x, probs, keep, soft=soft, overwrite=force)
    counts = torch.bincount(probs[keep].argmax(1), minlength=probs.shape[1]).tolist()
    line = (f"wrote {target}: {len(keep)} of {len(images)} images, {'soft' if soft else 'hard'} labels, "
            f"per class {counts}, mean confidence {probs[keep].max(1).values.mean():.3f}")
    if images.true_y is not None:
        agree = (probs[keep].argmax(1) == images.true_y[keep]).float().mean().item()
        line += f", {100 * agree:.1f}% agree with the true labels"
    click.echo(line)
