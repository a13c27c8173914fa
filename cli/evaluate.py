"""`robust eval`: clean and robust accuracy per route, a table on stdout, optional JSON and plot."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import click

from robust.attacks.registry import PerturbationError
from robust.checkpoint import load_model, read_checkpoint, weights_of
from robust.cli.common import SEED, BadInput, check_output_file, model_file, newest_run
from robust.cli.plain_model import load_plain_model, plain_model_options, wants_plain_model
from robust.data.corruptions import check_corruption_names, check_severities, official_layout
from robust.eval.accuracy import ATTACK_PRECISIONS
from robust.eval.corruptions import format_corruptions
from robust.eval.estimate import PROBED, estimate_lines
from robust.eval.evaluation import NO_STATE_ACROSS_RANKS, check_attack_names, check_threads, evaluate, load_test_split
from robust.eval.evaluation import eps_sweep as run_sweep
from robust.eval.sanity import eps_monotonic_checks, sanity_checks
from robust.curves import plot_sweep
from robust.export.robustbench import eps_beside
from robust.nn.norms import routes_for
from robust.outputs import write_output
from robust.runtime import resolve_device
from robust.threat import parse_eps_list, resolve_eps
from robust.train.distributed import SINGLE, env_world_size, setup, shutdown


COLUMN_TITLES = {"clean": "natural", "worst_case": "worst_case"}  # the accuracy without attack is "natural"


def format_table(result: dict[str, Any]) -> str:
    """One row per route: natural accuracy (no attack; the JSON's "clean"), each attack, and the worst case when
    several attacks ran. "clean" and "adv" name the routes only."""
    attacks = list(result["attacks"])
    columns = ["clean", *attacks] + (["worst_case"] if len(attacks) > 1 else [])
    titles = [COLUMN_TITLES.get(c, c) for c in columns]
    width = max(10, *(len(c) + 2 for c in titles))
    lines = [f"{'route':<8}" + "".join(f"{c:>{width}}" for c in titles)]
    for route, acc in result["routes"].items():
        lines.append(f"{route:<8}" + "".join(f"{acc[c]:>{width}.2f}" for c in columns))
    return "\n".join(lines)


def describe_weights(weights: str | None) -> str:
    """The scored weights for the header line: the averaged (EMA) ones or the live ones; nothing when unrecorded."""
    return {"ema": ", averaged weights (EMA)", "live": ", live weights"}.get(weights or "", "")


def describe_eps(eps: float, threat: str) -> str:
    pixels = f" (= {eps * 255:.3g}/255)" if threat == "linf" else ""
    return f"{threat} eps {eps:.6g}{pixels}"


def format_sweep(sweep: Sequence[dict[str, Any]]) -> str:
    """Worst-case accuracy per route (columns) at each eps (rows)."""
    routes = list(sweep[0]["routes"])
    lines = [f"{'eps':>12}" + "".join(f"{r:>10}" for r in routes)]
    for s in sweep:
        lines.append(f"{s['eps']:>12.6g}" + "".join(f"{s['routes'][r]['worst_case']:>10.2f}" for r in routes))
    return "\n".join(lines)


def print_checks(checks) -> None:
    """Passed checks as OK lines on stdout, failed ones as warnings on stderr."""
    for c in checks:
        if c.passed:
            click.echo(f"  ok    {c.name}: {c.detail}")
        else:
            click.echo(f"WARNING {c.name} failed: {c.detail}", err=True)


@click.command("eval")
@click.argument("checkpoint", required=False)
@click.option("--attack", "attacks", default=None,
              help="comma-separated attacks: clean, fgsm, pgdN, cwN, apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square, autoattack  "
                   "[default: pgd20; clean with --corruptions]")
@click.option("--corruptions", default=None,
              help="also score the common corruptions: all, or names such as gaussian_noise,fog (generated from the test "
                   "images unless --corruptions-dir)")
@click.option("--severities", default=None, help="with --corruptions: severities among 1..5  [default: 1,2,3,4,5]")
@click.option("--corruptions-dir", "corruptions_dir", default=None,
              help="with --corruptions: the official files, CIFAR-10-C/CIFAR-100-C's <name>.npy and labels.npy, or "
                   "ImageNet-C's <name>/<severity>/<class>/ folders")
@click.option("--eps", default=None, help="attack radius in pixel units, e.g. 8/255  [default: the checkpoint's training eps]")
@click.option("--route", type=click.Choice(["clean", "adv", "both"]), default=None,
              help="route to attack and score  [default: both for dual-route models]")
@click.option("--weights", type=click.Choice(["ema", "live"]), default=None,
              help="ema: the averaged weights of a run trained with --ema; live: the optimizer's  [default: ema where kept]")
@click.option("--per-example", "per_example", default=None,
              help="also write one JSON line per route and image (index, label, prediction, the first attack that broke it "
                   "or 'clean' or null, robust) to this file, to compare two evaluations image by image")
@click.option("--attack-precision", "attack_precision", type=click.Choice(list(ATTACK_PRECISIONS)), default="auto",
              show_default=True,
              help="precision of the attacks' iterations: bf16 (autocast) or fp32; auto is bf16 on CUDA, and on a CPU where "
                   "bf16 ran this model's attack step at least 1.2x faster than fp32 (timed once, cached). Every "
                   "adversarial example is checked again in fp32 before it counts as broken")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="split the images across this many processes (whole batches each); the verdicts equal one process's, "
                   "example for example, since each attack on each batch has its own seed")
@click.option("--threads", type=int, default=None,
              help="torch threads per process  [default: the CPUs available divided by --jobs]")
@click.option("--state", "state_path", default=None,
              help="write each batch's verdicts to this file after every attack on it (atomically), so an interrupted "
                   "evaluation can be finished with --resume; an existing file is kept unless --resume or --force")
@click.option("--resume", is_flag=True,
              help="finish the evaluation whose --state file is given, running only what it lacks (refused when the "
                   "model, images, eps, attacks or settings differ)")
@click.option("--threat", type=click.Choice(["linf", "l2"]), default="linf", show_default=True, help="threat model")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="evaluate the first N test examples only")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of the attacks' random starts")
@click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True, help="random restarts per attack")
@click.option("--queries", type=click.IntRange(min=1), default=5000, show_default=True, help="Square: query budget")
@click.option("--data-dir", default=None, help="folder with the dataset files")
@click.option("--sanity", is_flag=True, help="run the honesty checks of evaluation.md and warn on failures")
@click.option("--eps-sweep", default=None, help="comma-separated eps values, e.g. 0,2/255,4/255,8/255,16/255")
@click.option("--plot", default=None, help="with --eps-sweep: write accuracy vs eps as PNG (a folder ending in / gets eps_sweep.png)")
@click.option("--json", "json_path", default=None, help="write every figure to this JSON file (a folder ending in / gets eval.json)")
@click.option("--force", is_flag=True, help="overwrite existing --json / --plot / --per-example files, and start a --state file again")
@click.option("--quiet", is_flag=True, help="no progress bar")
@plain_model_options
def evaluate_command(checkpoint: str, attacks: str, eps: str | None, route: str | None, threat: str,
                     limit: int | None, batch_size: int, device: str, seed: int, restarts: int, queries: int,
                     data_dir: str | None, sanity: bool, eps_sweep: str | None, plot: str | None,
                     json_path: str | None, force: bool, quiet: bool, weights: str | None, per_example: str | None,
                     attack_precision: str, jobs: int, threads: int | None, state_path: str | None,
                     resume: bool, corruptions: str | None, severities: str | None, corruptions_dir: str | None,
                     **plain: str | None) -> None:
    """Clean and robust accuracy of CHECKPOINT (a file, a run folder meaning its best.pt, or an export).

    Without CHECKPOINT, the newest run folder under ./runs is scored (and named).

    The output files are checked before any attack runs and written atomically at the end;
    existing ones are kept unless --force. --threat l2 needs an explicit --eps (the checkpoint's
    eps is a Linf radius).

    Each route is attacked and scored through itself, with the model in eval mode; with several
    attacks the worst case per example is reported too. An attack that returns an input outside
    the eps ball or outside [0, 1] stops the run with an error (exit code 1).

    Attacks may search in bf16 (--attack-precision), but every verdict is an fp32 forward. --jobs
    splits the batches across processes and --state/--resume make a long evaluation resumable;
    neither changes a verdict. Under torchrun each rank scores its share of the batches (rank 0
    prints and writes), for several machines or GPUs: again the verdicts of one process.

    \b
    Examples:
      robust eval runs/fashion-mnist-sabn-hybrid-s0 --attack pgd20 --limit 1000
      robust eval model.pt --attack pgd20,autoattack --eps 8/255 --json eval.json
      robust eval runs/a --eps-sweep 0,2/255,4/255,8/255,16/255 --plot curve.png
      robust eval runs/a --corruptions all --severities 1,2,3,4,5 --json runs/a/
      robust eval runs/a --attack autoattack --jobs 2 --state aa.state --json aa.json
      robust eval runs/a --attack autoattack --jobs 2 --state aa.state --json aa.json --resume
      torchrun --nproc-per-node 4 -m robust.cli eval runs/a --attack autoattack --json aa.json
    """

    if checkpoint is None:
        checkpoint = newest_run()
        click.echo(f"no CHECKPOINT given: evaluating the newest run, {checkpoint}", err=True)
    if env_world_size() > 1 and (state_path is not None or resume):
        raise BadInput(NO_STATE_ACROSS_RANKS)  # before the process group and any file
    ctx, rank_device = setup(device) if env_world_size() > 1 else (SINGLE, None)
    try:
        with only_rank_zero_speaks(ctx.is_main):
            run_eval(checkpoint, attacks, eps, route, threat, limit, batch_size,
                     device if rank_device is None else str(rank_device), seed, restarts, queries,
                     data_dir, sanity, eps_sweep, plot, json_path, force, quiet, weights=weights, per_example=per_example,
                     attack_precision=attack_precision, jobs=jobs, threads=threads, state_file=state_path, resume=resume,
                     plain=plain, writes=ctx.is_main,
                     corruption_options=corruption_settings(corruptions, severities, corruptions_dir))
    except PerturbationError as exc:
        raise click.ClickException(f"{exc}; this is a bug in the attack, so no figures were reported") from None
    finally:
        shutdown()


@contextlib.contextmanager
def only_rank_zero_speaks(main: bool):
    """Under torchrun every rank computes the same figures; the other ranks' stdout and stderr go nowhere."""
    if main:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def run_eval(checkpoint: str, attacks: str, eps: str | None, route: str | None, threat: str, limit: int | None,
             batch_size: int, device: str, seed: int, restarts: int, queries: int, data_dir: str | None,
             sanity: bool, eps_sweep: str | None, plot: str | None, json_path: str | None, force: bool,
             quiet: bool, weights: str | None = None, per_example: str | None = None,
             attack_precision: str = "auto", jobs: int = 1, threads: int | None = None, state_file: str | None = None,
             resume: bool = False, plain: dict[str, Any] | None = None, writes: bool = True,
             corruption_options: dict[str, Any] | None = None) -> None:
    """The body of `robust eval` (see its help); ``writes`` False (a torchrun rank other than 0) writes no file."""

    if jobs < 1:
        raise BadInput(f"--jobs must be >= 1, got {jobs}")
    check_threads(threads)
    if resume and state_file is None:
        raise BadInput("--resume needs --state FILE, the state file of the evaluation to finish")

    if plot is not None and eps_sweep is None:
        raise BadInput("--plot needs --eps-sweep, e.g. --eps-sweep 0,2/255,4/255,8/255 --plot curve.png")
    json_file = check_output_file(json_path, "--json", force, "eval.json") if json_path is not None else None
    plot_file = check_output_file(plot, "--plot", force, "eps_sweep.png") if plot is not None else None
    examples_file = check_output_file(per_example, "--per-example", force, "per_example.jsonl") if per_example else None
    names = check_attack_names(attacks if attacks is not None else "clean" if corruption_options else "pgd20")
    if eps is not None:  # refused before any file is read
        resolve_eps(eps, threat)
    sweep_values = parse_eps_list(eps_sweep, threat) if eps_sweep is not None else None
    scored = model_file(checkpoint)
    written = {"--json": json_file, "--plot": plot_file, "--per-example": examples_file}
    if state_file is not None:  # never the checkpoint, a run's file or another output
        check_state_file(state_file, resume, force, inputs=(scored,), outputs=written)
    for flag, target in written.items():  # never the checkpoint it reads (even outside a run) nor another output
        if target is not None:
            others = {f: t for f, t in written.items() if f != flag}
            check_output_file(target, flag, force, inputs=(scored,), outputs=others)
    plain_model = None
    if wants_plain_model(scored, plain or {}):
        state, plain_model, test = load_plain_model(scored, plain, data_dir, limit, weights)
    else:
        state = read_checkpoint(scored)
    beside = eps_beside(scored) if plain_model is not None and eps is None else None
    if beside is not None:  # a RobustBench entry: its model_info names the eps
        state.update(eps=beside[0], threat=beside[1])
        click.echo(f"eps {beside[0]:.6g} ({beside[1]}) from {beside[2]}", err=True)
    trained_threat = state.get("threat", "linf")
    if eps is None and "eps" not in state:
        raise BadInput(f"{checkpoint} records no training eps; pass --eps, e.g. --eps 8/255")
    if eps is None and threat != trained_threat:
        raise BadInput(f"{checkpoint} was trained with a {trained_threat} eps of {state['eps']:.6g}, which is no {threat} radius; "
                       f"pass --eps for --threat {threat}, e.g. --eps 0.5")
    eps_value = resolve_eps(eps if eps is not None else state["eps"], threat)
    if "dataset" not in state:
        raise BadInput(f"{checkpoint} records no dataset; re-export it with `robust export`")
    model = plain_model if plain_model is not None else load_model(state, weights=weights)
    if plain_model is None:
        test = load_test_split(state, data_dir, limit)
    options = dict(route=route, batch_size=batch_size, limit=limit, device=device, seed=seed, threat=threat,
                   restarts=restarts, queries=queries, progress=not quiet,
                   attack_precision=attack_precision, jobs=jobs, threads=threads)

    if not quiet and writes and any(n in PROBED for n in names):  # say minutes or hours before the wait
        model.to(resolve_device(device))
        x_test, y_test = test[0][:limit], test[1][:limit]
        for line in estimate_lines(model, x_test, y_test, names, routes_for(model, route), dict(
                eps=eps_value, threat=threat, seed=seed, restarts=restarts, queries=queries,
                num_classes=int(model.build_args.get("num_classes", 10)))):
            click.echo(line, err=True)
    result = evaluate(model, test, attacks=names, eps=eps_value, per_example=examples_file is not None,
                      state=state_file, resume=resume, force=force, **options, **(corruption_options or {}))
    examples = result.pop("per_example", None)
    corruption_examples = result.pop("corruption_per_example", None)
    args = model.build_args
    width = f", width {args['width']}" if args.get("width") else ""
    scored_weights = weights_of(state, weights) if plain_model is None else None
    click.echo(f"{scored}: {args['arch']} ({args['norm']}{width}{describe_weights(scored_weights)}), {state['dataset']} test, "
               f"{result['n']} examples, {describe_eps(eps_value, threat)}, seed {seed}, "
               f"attacks in {result['attack_precision']} ({result['attack_precision_why']}; verdicts in fp32)")
    click.echo(format_table(result))
    if "corruptions" in result:
        click.echo(format_corruptions(result))
    ranks = f" on each of {result['ranks']} torchrun ranks" if result["ranks"] > 1 else ""
    click.echo(f"{result['seconds']:.1f} s ({result['jobs']} process(es) of {result['threads']} thread(s){ranks}); per attack: "
               + ", ".join(f"{k} {v:.1f} s" for k, v in result["attack_seconds"].items()))
    report: dict[str, Any] = {"checkpoint": str(scored), "dataset": state["dataset"], "model": args,
                              "weights": scored_weights, **result}

    checks = []
    if sanity:
        click.echo("sanity checks:")
        checks = sanity_checks(model, test, eps_value, reuse=result, **options)
    if sweep_values:
        sweep = run_sweep(model, test, sweep_values, attacks=names, **options)
        click.echo("eps sweep (worst case over the attacks, %):")
        click.echo(format_sweep(sweep))
        report["eps_sweep"] = sweep
        checks += eps_monotonic_checks(sweep)
        if plot_file and writes:
            plot_sweep(sweep, plot_file, f"{Path(checkpoint).name}: {', '.join(names)}", overwrite=force)
            click.echo(f"wrote {plot_file}")
    if checks:
        print_checks(checks)
        report["checks"] = [c._asdict() for c in checks]
    if json_file and writes:
        write_output(json_file, json.dumps(report, indent=2) + "\n", overwrite=force)
        click.echo(f"wrote {json_file}")
    if examples_file and writes:
        write_output(examples_file, per_example_lines(examples, test[1]) + corruption_lines(corruption_examples),
                     overwrite=force)
        click.echo(f"wrote {examples_file}")


def check_state_file(path: str, resume: bool, force: bool, inputs: tuple, outputs: dict) -> None:
    """Refuse a --state path before any work: unwritable, a file this command reads or writes, an existing
    file without --resume or --force (an unfinished evaluation's work), a missing one with --resume."""
    exists = Path(path).is_file()
    if exists and not (resume or force):
        raise BadInput(f"{path} already exists; pass --resume to finish that evaluation, --force to start it again, "
                       "or choose another --state")
    if resume and not exists:
        raise BadInput(f"--resume: the state file {path} does not exist; run without --resume to start one")
    check_output_file(path, "--state", True, inputs=inputs, outputs=outputs)


def per_example_lines(examples: dict[str, dict[str, list]], labels) -> str:
    """One JSON line per route and image: index, label, clean prediction, first attack that broke it, robust."""
    lines = []
    for route, e in examples.items():
        for i, (label, pred, broken, robust) in enumerate(zip(labels.tolist(), e["prediction"], e["broken_by"], e["robust"])):
            lines.append(json.dumps({"route": route, "index": i, "label": label, "prediction": pred,
                                     "broken_by": broken, "robust": robust}))
    return "\n".join(lines) + "\n"


def corruption_settings(corruptions: str | None, severities: str | None, folder: str | None) -> dict[str, Any] | None:
    """evaluate's corruption keywords from the flags, refused before any file is read (None without --corruptions)."""
    if corruptions is None:
        if folder is not None or severities is not None:
            raise BadInput("--severities and --corruptions-dir need --corruptions, e.g. --corruptions all")
        return None
    names, levels = check_corruption_names(corruptions), check_severities(severities or "1,2,3,4,5")
    if folder is not None:
        official_layout(folder, names)
    return {"corruptions": names, "severities": levels, "corruptions_dir": folder}


def corruption_lines(examples: dict[str, Any] | None) -> str:
    """One JSON line per route, corruption, severity and image: index and prediction (the label: a generated image's
    is its clean line's, of the same index; the official files' are in their labels.npy)."""
    if not examples:
        return ""
    lines = [json.dumps({"route": route, "corruption": name, "severity": int(s), "index": i, "prediction": p})
             for route, table in examples.items() for name, levels in table.items()
             for s, predictions in levels.items() for i, p in enumerate(predictions)]
    return "\n".join(lines) + "\n"
