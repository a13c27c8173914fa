"""`robust eval`: clean and robust accuracy per route, a table on stdout, optional JSON and plot."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click

from robust.attacks.registry import PerturbationError, attack_help
from robust.checkpoint import load_model, read_checkpoint, weights_of
from robust.cli.common import SEED, BadInput, check_output_file, model_file, newest_run
from robust.cli.plain_model import PLAIN_OPTIONS, load_plain_model, plain_model_options, wants_plain_model
from robust.plain_model import is_torchscript, read_plain_model
from robust.eval.accuracy import ATTACK_PRECISIONS
from robust.eval.corruptions import format_corruptions
from robust.eval.estimate import PROBED, estimate_lines
from robust.eval.evaluation import NO_STATE_ACROSS_RANKS, evaluate, load_test_split, num_classes_of
from robust.eval.evaluation import eps_sweep as run_sweep
from robust.eval.plan import ALL_SEVERITIES, EvalPlan, ModelFacts
from robust.eval.sanity import eps_monotonic_checks, sanity_checks
from robust.curves import plot_sweep
from robust.nn.norms import routes_for
from robust.outputs import write_json, write_output
from robust.runtime import resolve_device
from robust.threat import THREATS, parse_eps_list
from robust.torchrun import env_world_size
from robust.train.distributed import SINGLE, setup, shutdown


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
    return "\n".join(lines + repeat_lines(result) + randomized_lines(result))


def repeat_lines(result: dict[str, Any]) -> list[str]:
    """Under the table: how many repeats ran with which seeds, and each route's worst case per repeat."""
    repeats = result.get("repeats")
    if not repeats:
        return []
    if repeats["count"] == 1:
        return [f"--repeats {repeats['asked']}: one pass, {repeats['why']}"]
    lines = [f"worst case over {repeats['count']} repeats (seeds {', '.join(map(str, repeats['seeds']))}): an example "
             "counts as robust only if it survived every repeat; attack columns: the lowest single repeat"]
    for route, figures in repeats["per_repeat"].items():
        spread = repeats["spread"][route]["worst_case"]
        lines.append(f"  {route}: per repeat " + ", ".join(f"{f['worst_case']:.2f}" for f in figures)
                     + f" (min {spread['min']:.2f}, mean {spread['mean']:.2f}, max {spread['max']:.2f})")
    return lines


def randomized_lines(result: dict[str, Any]) -> list[str]:
    """Under the table: a randomized forward, and what the evaluation did about it."""
    routes = result.get("randomized_routes")
    if not routes:
        return []
    where = f"randomized forward ({', '.join(routes)} route{'s' if len(routes) > 1 else ''})"
    repeats = (result.get("repeats") or {}).get("count", 1)
    if result.get("eot", 1) > 1 and repeats > 1:
        return [f"{where}: gradients averaged over {result['eot']} forwards (--eot), worst case over {repeats} repeats"]
    return [f"WARNING {where}: {result['randomized']}"]


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
              help=f"comma-separated attacks (N = steps): {attack_help()}  [default: pgd20; clean with --corruptions]")
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
@click.option("--eot", type=int, default=1, show_default=True,
              help="for a randomized model (noise, dropout kept on, random transforms): each gradient of the gradient "
                   "attacks (fgsm, pgdN, cwN, apgd-ce, apgd-dlr, apgd-t and AutoAttack's APGD stages) is the mean over N "
                   "forwards (expectation over transformation), so the attack follows the expected loss instead of one "
                   "draw of the noise; FAB and Square take none. N forwards cost N times the time")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="evaluate a randomized model K times with seeds --seed, --seed+1, ...; an example counts as robust "
                   "only if it survives every repeat (the table also shows each repeat's figure). A model whose forward "
                   "is deterministic runs once")
@click.option("--transfer-from", "transfer_from", default=None,
              help="make the adversarial examples on this model (a run folder, checkpoint, export or TorchScript file of "
                   "the same images and classes; a dual-route one through its adv route) and score them on CHECKPOINT: a "
                   "transfer attack. With --sanity it is also the transfer check's surrogate (else a dual-route "
                   "model's other route)")
@click.option("--threat", type=click.Choice(list(THREATS)), default="linf", show_default=True, help="threat model")
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
def evaluate_command(checkpoint: str | None, **flags: Any) -> None:
    """Clean and robust accuracy of CHECKPOINT (a file, a run folder meaning its best.pt, or an export).

    Without CHECKPOINT, the newest run folder under ./runs is scored (and named).

    The output files are checked before any attack runs and written atomically at the end;
    existing ones are kept unless --force. --threat l2 or l1 needs an explicit --eps (the checkpoint's
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
      robust eval noisy.pt --attack pgd20,apgd-ce --eot 20 --repeats 5
      robust eval runs/a --transfer-from runs/b --attack pgd20
      torchrun --nproc-per-node 4 -m robust.cli eval runs/a --attack autoattack --json aa.json
    """

    if checkpoint is None:
        checkpoint = newest_run()
        click.echo(f"no CHECKPOINT given: evaluating the newest run, {checkpoint}", err=True)
    if env_world_size() > 1 and (flags["state_path"] is not None or flags["resume"]):
        raise BadInput(NO_STATE_ACROSS_RANKS)  # before the process group and any file
    ctx, rank_device = setup(flags["device"]) if env_world_size() > 1 else (SINGLE, None)
    try:
        with only_rank_zero_speaks(ctx.is_main):
            device = flags["device"] if rank_device is None else str(rank_device)
            run_eval(eval_request(checkpoint, flags, device, writes=ctx.is_main))
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


@dataclass(frozen=True)
class ModelSource:
    """The model `robust eval` scores: CHECKPOINT as given and the file it means, where its test data lies, which
    of a checkpoint's weights, and a plain model's options (--arch, --mean, --std, --dataset)."""

    checkpoint: str
    path: Path
    data_dir: str | None
    weights: str | None
    plain: dict[str, Any]


@dataclass(frozen=True)
class EvalOutputs:
    """The files `robust eval` writes (each checked before any work), whether it may overwrite them, and whether
    this process writes at all (a torchrun rank other than 0 does not)."""

    json: Path | None
    plot: Path | None
    per_example: Path | None
    force: bool
    writes: bool


@dataclass(frozen=True)
class EvalRequest:
    """`robust eval` as its flags ask, checked: the model, the plan (its eps None until the model's training
    eps fills it), the --sanity checks, the --eps-sweep values and the outputs."""

    source: ModelSource
    plan: EvalPlan
    sanity: bool
    sweep: tuple[float, ...] | None
    outputs: EvalOutputs
    surrogate: Path | None = None  # --transfer-from: the model the adversarial examples are made on


def eval_plan(flags: dict[str, Any], device: str) -> EvalPlan:
    """The evaluation plan of `robust eval`'s flags (attacks default to pgd20, or clean with --corruptions)."""
    corruptions = flags["corruptions"]
    if corruptions is None and (flags["corruptions_dir"] is not None or flags["severities"] is not None):
        raise BadInput("--severities and --corruptions-dir need --corruptions, e.g. --corruptions all")
    attacks = flags["attacks"] if flags["attacks"] is not None else "clean" if corruptions is not None else "pgd20"
    return EvalPlan.build(
        attacks=attacks, eps=flags["eps"], threat=flags["threat"], route=flags["route"],
        batch_size=flags["batch_size"], limit=flags["limit"], device=device, seed=flags["seed"],
        restarts=flags["restarts"], eot=flags["eot"], repeats=flags["repeats"], queries=flags["queries"],
        attack_precision=flags["attack_precision"],
        jobs=flags["jobs"], threads=flags["threads"], progress=not flags["quiet"],
        per_example=flags["per_example"] is not None, state=flags["state_path"], resume=flags["resume"],
        force=flags["force"], corruptions=corruptions, severities=flags["severities"] or ALL_SEVERITIES,
        corruptions_dir=flags["corruptions_dir"])


def eval_request(checkpoint: str, flags: dict[str, Any], device: str, writes: bool) -> EvalRequest:
    """`robust eval`'s flags checked, every refusal before any model or data is read: the plan, the output files
    (never the checkpoint, never one another), the state file and the eps sweep."""
    plan = eval_plan(flags, device)
    if flags["plot"] is not None and flags["eps_sweep"] is None:
        raise BadInput("--plot needs --eps-sweep, e.g. --eps-sweep 0,2/255,4/255,8/255 --plot curve.png")
    force = flags["force"]
    written = {flag: check_output_file(flags[key], flag, force, name) if flags[key] is not None else None
               for flag, key, name in (("--json", "json_path", "eval.json"), ("--plot", "plot", "eps_sweep.png"),
                                       ("--per-example", "per_example", "per_example.jsonl"))}
    sweep = tuple(parse_eps_list(flags["eps_sweep"], plan.threat)) if flags["eps_sweep"] is not None else None
    scored = model_file(checkpoint)
    surrogate = model_file(flags["transfer_from"]) if flags["transfer_from"] is not None else None
    inputs = (scored,) if surrogate is None else (scored, surrogate)
    if plan.state is not None:  # never the checkpoint, a run's file or another output
        check_state_file(plan.state.path, plan.state.resume, force, inputs=inputs, outputs=written)
    for flag, target in written.items():  # never the checkpoint it reads (even outside a run) nor another output
        if target is not None:
            others = {f: t for f, t in written.items() if f != flag}
            check_output_file(target, flag, force, inputs=inputs, outputs=others)
    plain = {k: flags[k] for k in PLAIN_OPTIONS}
    source = ModelSource(checkpoint, scored, flags["data_dir"], flags["weights"], plain)
    outputs = EvalOutputs(written["--json"], written["--plot"], written["--per-example"], force, writes)
    return EvalRequest(source, plan, flags["sanity"], sweep, outputs, surrogate)


def load_scored(source: ModelSource, plan: EvalPlan) -> tuple[Any, ModelFacts, tuple, EvalPlan]:
    """(model, its facts, test split, the plan at its eps): a plain model (--arch or TorchScript) or a checkpoint.
    A checkpoint's training eps and dataset are refused when missing before its model or data is read."""
    if wants_plain_model(source.path, source.plain):
        model, facts, test = load_plain_model(source.path, source.plain, source.data_dir, plan.limit, source.weights,
                                              eps_wanted=plan.eps is None)
        if facts.eps_from is not None:
            click.echo(f"eps {facts.eps:.6g} ({facts.threat}) from {facts.eps_from}", err=True)
        return model, facts, test, at_model_eps(plan, facts, source.checkpoint)
    state = read_checkpoint(source.path)
    facts = ModelFacts(state.get("dataset"), state.get("eps"), state.get("threat", "linf"),
                       weights_of(state, source.weights))
    plan = at_model_eps(plan, facts, source.checkpoint)
    if facts.dataset is None:
        raise BadInput(f"{source.checkpoint} records no dataset; re-export it with `robust export`")
    model = load_model(state, weights=source.weights)
    return model, facts, load_test_split(state, source.data_dir, plan.limit), plan


def at_model_eps(plan: EvalPlan, facts: ModelFacts, checkpoint: str) -> EvalPlan:
    """``plan`` as it is when --eps was given, else at the model's training eps (refused where there is none, or
    where it is a radius of another threat model than --threat)."""
    if plan.eps is not None:
        return plan
    if facts.eps is None:
        raise BadInput(f"{checkpoint} records no training eps; pass --eps, e.g. --eps 8/255")
    if plan.threat != facts.threat:
        raise BadInput(f"{checkpoint} was trained with a {facts.threat} eps of {facts.eps:.6g}, which is no {plan.threat} "
                       f"radius; pass --eps for --threat {plan.threat}, e.g. --eps 0.5")
    return plan.at_eps(facts.eps)


def load_surrogate(path: Path, model: Any, test: tuple) -> Any:
    """The --transfer-from model: a TorchScript file (read as `robust eval` reads a plain one, for the scored model's
    channels and classes) or a robust checkpoint, run folder or export. Its fit to the images and classes is
    checked when the evaluation starts."""
    if is_torchscript(path):
        return read_plain_model(path, None, num_classes_of(model), int(test[0].shape[1]))
    return load_model(read_checkpoint(path))


def run_eval(request: EvalRequest) -> None:
    """The body of `robust eval` (see its help): score the model, print the table, run the extra checks, write."""
    model, facts, test, plan = load_scored(request.source, request.plan)
    surrogate = load_surrogate(request.surrogate, model, test) if request.surrogate is not None else None
    outputs = request.outputs
    if plan.progress and outputs.writes and any(n in PROBED for n in plan.attacks):  # say minutes or hours before the wait
        model.to(resolve_device(plan.device or "auto"))
        x_test, y_test = test[0][:plan.limit], test[1][:plan.limit]
        for line in estimate_lines(model, x_test, y_test, plan.attacks, routes_for(model, plan.route), dict(
                eps=plan.eps, threat=plan.threat, seed=plan.seed, restarts=plan.restarts, queries=plan.queries,
                num_classes=int(model.build_args.get("num_classes", 10)))):
            click.echo(line, err=True)
    result = evaluate(model, test, plan=plan, surrogate=surrogate)
    examples = result.pop("per_example", None)
    corruption_examples = result.pop("corruption_per_example", None)
    args = model.build_args
    width = f", width {args['width']}" if args.get("width") else ""
    click.echo(f"{request.source.path}: {args['arch']} ({args['norm']}{width}{describe_weights(facts.weights)}), "
               f"{facts.dataset} test, {result['n']} examples, {describe_eps(plan.eps, plan.threat)}, seed {plan.seed}, "
               f"attacks in {result['attack_precision']} ({result['attack_precision_why']}; verdicts in fp32)"
               + (f"; adversarial examples made on {request.surrogate} (transfer)" if surrogate is not None else ""))
    click.echo(format_table(result))
    if "corruptions" in result:
        click.echo(format_corruptions(result))
    ranks = f" on each of {result['ranks']} torchrun ranks" if result["ranks"] > 1 else ""
    click.echo(f"{result['seconds']:.1f} s ({result['jobs']} process(es) of {result['threads']} thread(s){ranks}); per attack: "
               + ", ".join(f"{k} {v:.1f} s" for k, v in result["attack_seconds"].items()))
    report: dict[str, Any] = {"checkpoint": str(request.source.path), "dataset": facts.dataset, "model": args,
                              "weights": facts.weights, **result}
    if request.surrogate is not None:
        report["transfer_from"] = str(request.surrogate)
    report.update(extra_checks(model, test, plan, request, result, surrogate))
    if outputs.json and outputs.writes:
        write_json(outputs.json, report, overwrite=outputs.force)
        click.echo(f"wrote {outputs.json}")
    if outputs.per_example and outputs.writes:
        write_output(outputs.per_example, per_example_lines(examples, test[1]) + corruption_lines(corruption_examples),
                     overwrite=outputs.force)
        click.echo(f"wrote {outputs.per_example}")


def extra_checks(model: Any, test: tuple, plan: EvalPlan, request: EvalRequest, result: dict[str, Any],
                 surrogate: Any = None) -> dict[str, Any]:
    """--sanity and --eps-sweep: their figures printed (failed checks as warnings), the sweep plotted with --plot;
    returns what the JSON report gets of them ("eps_sweep", "checks")."""
    report: dict[str, Any] = {}
    checks = []
    if request.sanity:
        click.echo("sanity checks:")
        checks = sanity_checks(model, test, plan.eps, reuse=result, plan=plan, surrogate=surrogate)
    if request.sweep:
        sweep = run_sweep(model, test, request.sweep, plan=plan)
        click.echo("eps sweep (worst case over the attacks, %):")
        click.echo(format_sweep(sweep))
        report["eps_sweep"] = sweep
        checks += eps_monotonic_checks(sweep)
        plot_file = request.outputs.plot
        if plot_file and request.outputs.writes:
            plot_sweep(sweep, plot_file, f"{Path(request.source.checkpoint).name}: {', '.join(plan.attacks)}",
                       overwrite=request.outputs.force)
            click.echo(f"wrote {plot_file}")
    if checks:
        print_checks(checks)
        report["checks"] = [c._asdict() for c in checks]
    return report


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


def corruption_lines(examples: dict[str, Any] | None) -> str:
    """One JSON line per route, corruption, severity and image: index and prediction (the label: a generated image's
    is its clean line's, of the same index; the official files' are in their labels.npy)."""
    if not examples:
        return ""
    lines = [json.dumps({"route": route, "corruption": name, "severity": int(s), "index": i, "prediction": p})
             for route, table in examples.items() for name, levels in table.items()
             for s, predictions in levels.items() for i, p in enumerate(predictions)]
    return "\n".join(lines) + "\n"
