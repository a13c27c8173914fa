"""The paper's comparison: train one model per norm kind with one shared config, evaluate every route.

``run_compare(CompareSettings(config, norms=("bn", "auxbn", "sabn")))`` trains each norm into
``<out>/<norm>/`` with :class:`robust.train.trainer.Trainer` (same seed, data split and budget; only the
norm differs), evaluates each route of each run's best.pt on the test set, and writes into
``<out>``: results.md (the settings above a table shaped like the paper's), results.json (every
figure) and curves.png (validation accuracy per epoch, one line per norm and route).

Seeds: with ``seeds`` (``--seeds 0,1,2``) every norm trains once per seed into
``<out>/<norm>/seed<k>/`` (each seed its own split, the same for every norm); without it the one
run per norm stays in ``<out>/<norm>/``. results.json then holds every per-seed figure, per norm
and route the mean and sample standard deviation over seeds, and per seed pair the difference of
each norm against the baseline norm with a 95% t interval; results.md says per comparison whether
the interval excludes 0. ``select`` picks the checkpoint evaluated: best.pt (default), last.pt or
epochN.pt (``epoch:N``; the runs keep it through ``keep_epochs``).

Methods: with ``methods`` (``--methods pgd,trades``) the grid is norms x methods x seeds, runs in
``<out>/<method>/<norm>/...``, results per method under ``by_method``. ``jobs`` > 1 trains the
runs in that many spawned processes side by side (fewer torch threads each); figures do not
depend on it, only on each run's thread count (recorded in its config.json).

Method: unless the config names one, every norm trains with the hybrid loss
(``w*CE(clean route, x) + (1-w)*CE(adv route, x_adv)``). The paper's BN baseline uses that same
loss through one shared BN, so the comparison changes the norm only (``robust train`` alone
defaults bn to plain PGD-AT).

Folder states (what ``resume`` does):
- a new or empty ``out`` starts every run; an existing non-empty one is an error unless
  ``resume`` (continue) or ``force`` (retrain every norm from scratch) is given;
- with ``resume``, a norm whose last.pt reached the final epoch is not trained again (only
  evaluated, and its evaluation is reused from eval.json when nothing changed), a norm with a
  partial last.pt continues with ``Trainer(resume=True)``, a norm without last.pt starts over.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from robust import checkpoint as ckpt
from robust.checkpoint import load_model, read_checkpoint, weights_of
from robust.config import TrainConfig
from robust.data.load import load_dataset
from robust.data.loader import split_train_val
from robust.errors import ConfigError, TrainingInterrupted
from robust.eval.evaluation import evaluate
from robust.compare.tables import results_markdown, run_summary, seed_rows, seed_statistics, write_curves
from robust.compare.settings import (
    EVAL_CACHE,
    RESULT_FILES,
    SETTINGS_FILE,
    CompareSettings,
    check_compare_dir,
    check_same_grid,
    load_settings,
    parse_select,
)
from robust.compare.reference import PAPER_CIFAR10
from robust.outputs import FolderLock, RunFiles, check_output_dir, write_json, write_output
from robust.plan import TrainPlan
from robust.runtime import available_cpus
from robust.train.faults import SIGNAL_NAMES
from robust.train.trainer import Trainer


def run_state(plan: TrainPlan) -> str:
    """'done' (last.pt at the final epoch), 'partial' (an earlier epoch) or 'new' (no last.pt)."""

    last = plan.run_dir / RunFiles.LAST
    if not last.is_file():
        return "new"
    state = ckpt.load_checkpoint(last)
    steps = (state.get("config") or {}).get("train_steps")  # what a --time-budget bought, recorded by the run
    if steps:
        finished = int(state["scheduler"]["step"]) >= steps and state.get("position") is None
    else:
        finished = int(state["epoch"]) + 1 >= plan.epochs
    return "done" if finished and (plan.run_dir / RunFiles.BEST).is_file() else "partial"


def train_norm(plan: TrainPlan, state: str, data, log: Callable[[str], None]) -> None:
    """Train (or continue) one norm's run; a finished run is left as it is."""

    if state == "done":
        log(f"{plan.norm}: {plan.run_dir} is complete ({plan.epochs} epochs); not training it again")
        return
    (plan.run_dir / EVAL_CACHE).unlink(missing_ok=True)  # a new best.pt needs a new evaluation
    Trainer(plan, data=data, resume=state == "partial", force=state == "new", log=log).fit()


def eval_key(settings: CompareSettings, plan: TrainPlan, best: dict[str, Any] | None,
             checkpoint: str = RunFiles.BEST, epoch: int | None = None) -> dict[str, Any]:
    """What an evaluation depends on; a cached evaluation is reused only when all of it matches."""
    key = {"attacks": list(settings.attacks), "eps": plan.eps, "limit": settings.eval_limit,
           "batch_size": settings.eval_batch_size, "seed": plan.seed, "best": best, "dataset": plan.data.dataset}
    if checkpoint != RunFiles.BEST:  # best.pt keys stay as before, so older eval.json files are reused
        key.update(checkpoint=checkpoint, epoch=epoch)
    return key


def evaluate_run(settings: CompareSettings, plan: TrainPlan, data, log: Callable[[str], None]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(best, evaluation): every route of the run's selected checkpoint (--select: best.pt or last.pt)
    on the test set (eval.json reused when unchanged)."""

    name = parse_select(settings.select)
    if name.startswith("epoch") and not (plan.run_dir / name).is_file():
        raise epoch_not_kept(plan.run_dir / name)
    state = read_checkpoint(plan.run_dir / name)
    best = state.get("best")
    epoch = None if state.get("epoch") is None else int(state["epoch"]) + 1
    key = eval_key(settings, plan, best, name, epoch)
    cache = plan.run_dir / EVAL_CACHE
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key:
            log(f"{plan.norm}: reusing the evaluation in {cache}")
            return best, saved["result"]
    log(f"{plan.norm}: evaluating {plan.run_dir / name} ({', '.join(settings.attacks)}, eps {plan.settings['eps']})")
    result = evaluate(load_model(state), (data.test_x, data.test_y), attacks=list(settings.attacks),
                      eps=plan.eps, route="both", batch_size=settings.eval_batch_size,
                      limit=settings.eval_limit, device=plan.device, seed=plan.seed)
    result["weights"] = weights_of(state)
    write_json(cache, {"key": key, "result": result})
    return best, result


def run_compare(settings: CompareSettings, resume: bool = False, force: bool = False, data=None,
                log: Callable[[str], None] | None = None, command: str | None = None, jobs: int = 1) -> dict[str, Any]:
    """Train, evaluate and report every norm (and method) of ``settings``; return the results written to results.json.

    ``data`` (an ImageData) skips loading the dataset; ``command`` is recorded in results.md (a
    resumed comparison keeps the first command and lists the resuming ones after it). ``jobs`` > 1
    trains the runs in that many processes side by side, each with CPUs/jobs torch threads (unless
    the config sets --threads): on a small CPU model that is faster than one process with every thread.
    """
    log = log or (lambda msg: None)
    settings.validate()
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"jobs must be a whole number >= 1, got {jobs!r}")
    out = settings.out
    check_compare_dir(out, resume, force)
    check_output_dir(out, "--out")
    lock = FolderLock(out, what="compare folder").acquire()  # one writer; each norm's run folder has its own lock
    try:
        check_compare_dir(out, resume, force)  # again, now that no one else can change it
        if resume:  # the missing runs train with the finished runs' settings, or not at all
            check_same_grid(load_settings(out), settings)
        return _compare_locked(settings, out, resume, force, data, log, command, jobs)
    finally:
        lock.release()


@dataclass
class GridRun:
    """One run of the grid: its method, seed, norm, plan and state ('new', 'partial' or 'done')."""

    method: str
    seed: int
    norm: str
    plan: TrainPlan
    state: str

    @property
    def label(self) -> str:
        return f"{self.method} {self.norm} seed {self.seed}"


def grid_runs(settings: CompareSettings, force: bool) -> list[GridRun]:
    """Every run, seed by seed (a stopped grid has whole seeds done), then method, then norm."""
    runs = []
    for seed in settings.seed_list:
        for method in settings.method_list:
            for norm in settings.norms:
                plan = settings.norm_plan(norm, seed, method)
                runs.append(GridRun(method, seed, norm, plan, "new" if force else run_state(plan)))
    return runs


def check_selectable(settings: CompareSettings, runs: list[GridRun]) -> None:
    """--select epoch:N on finished runs that did not keep epochN.pt is refused before any work."""
    name = parse_select(settings.select)
    for run in runs:
        path = run.plan.run_dir / name
        if name.startswith("epoch") and run.state == "done" and not path.is_file():
            raise epoch_not_kept(path)


def epoch_not_kept(path: Path) -> ConfigError:
    """The error for --select epoch:N when a run has no epochN.pt."""
    return ConfigError(f"{path} does not exist: that run was trained without keeping epoch "
                       f"{path.stem[len('epoch'):]}; retrain it (--force) or pick --select best or last")


def train_and_evaluate(settings: CompareSettings, run: GridRun, data, log: Callable[[str], None]):
    """(best, evaluation) of one run: train it (unless done), then evaluate the selected checkpoint."""
    train_norm(run.plan, run.state, data, log)
    return evaluate_run(settings, run.plan, data, log)


def run_grid(settings: CompareSettings, runs: list[GridRun], data, log: Callable[[str], None], jobs: int) -> list:
    """(best, evaluation) per run, in order: one after another, or in ``jobs`` processes side by side.

    Ctrl-C (SIGINT, to the terminal's process group or to this process alone) and SIGTERM stop every
    worker as they stop one run in one process: each finishes its step, writes last.pt and stops;
    runs not started are not started; then :class:`TrainingInterrupted` is raised here, with every
    finished run kept. A worker that stops (a signal sent to it alone) stops the others the same way.
    """
    if jobs == 1 or len(runs) == 1:
        return [train_and_evaluate(settings, run, data, log) for run in runs]

    threads = settings.config.threads or max(1, available_cpus() // jobs)
    log(f"{len(runs)} runs in {min(jobs, len(runs))} processes side by side, {threads} torch thread(s) each")
    runs = [dataclasses.replace(r, plan=r.plan.replace(threads=threads, quiet=True)) for r in runs]
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    previous_term = signal.getsignal(signal.SIGTERM)
    caught: list[int] = []

    def on_term(signum, frame):  # SIGTERM here: stop as Ctrl-C does
        caught.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(runs)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(threads, data))
    futures = []
    try:
        # The workers start with SIGINT/SIGTERM blocked (inherited), so a Ctrl-C while they start up cannot
        # kill one with a traceback; _start_worker ignores both outside a run, then unblocks them.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            futures = [pool.submit(_worker_run, settings, run) for run in runs]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return [f.result() for f in futures]
    except (KeyboardInterrupt, TrainingInterrupted) as exc:
        signum = (caught[0] if caught else signal.SIGINT) if isinstance(exc, KeyboardInterrupt) else exc.signum
        log(f"stopping: {SIGNAL_NAMES.get(signum, signum)}; the runs in progress write last.pt, finished runs are kept")
        _stop_pool(pool, futures, signum)
        done = sum(1 for f in futures if f.done() and not f.cancelled() and f.exception() is None)
        raise TrainingInterrupted(signum, f"compare stopped by {SIGNAL_NAMES.get(signum, signum)} with {done} of "
                                          f"{len(runs)} runs finished (kept); the runs in progress saved last.pt: "
                                          "rerun with --resume to continue") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_term)


def _stop_pool(pool: ProcessPoolExecutor, futures: list, signum: int) -> None:
    """Cancel the runs not started, send ``signum`` to the workers (a run stops after its step and writes
    last.pt; an idle worker ignores it), and wait for them; further Ctrl-Cs while waiting are ignored."""
    for f in futures:
        f.cancel()
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive() and process.pid is not None:
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:
                pass
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() else None
    try:
        for f in futures:
            if not f.cancelled():
                try:
                    f.exception()  # waits for it
                except BaseException:  # noqa: BLE001  a cancelled or broken future: nothing to wait for
                    pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def config_data(c: TrainConfig | TrainPlan):
    """The dataset a config or plan trains on (the grid's runs share it)."""

    return load_dataset(c.dataset, c.data_dir, image_size=c.image_size, mode=c.data_mode, workers=c.workers)


_WORKER_DATA: dict[str, Any] = {}


def _start_worker(threads: int, data) -> None:
    """A grid worker process: its torch threads, and the data when the caller passed it in.

    SIGINT and SIGTERM are ignored between runs (the parent decides when to stop) and unblocked
    (the parent blocked them while starting us); inside a run :func:`_worker_run` handles them.
    """

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    torch.set_num_threads(threads)
    if data is not None:
        _WORKER_DATA["data"] = data


class _RunSignals:
    """While a worker runs one grid run: SIGINT/SIGTERM raise KeyboardInterrupt (the Trainer installs its own
    handler while it trains, which finishes the step and writes last.pt); outside, they are ignored."""

    def __init__(self) -> None:
        self.active, self.signum = False, 0

    def _on_signal(self, signum, frame) -> None:
        if self.active:
            self.signum = signum
            raise KeyboardInterrupt

    def __enter__(self) -> "_RunSignals":
        self.active = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _worker_run(settings: CompareSettings, run: GridRun):
    """One run in a worker process; its messages go to stderr, prefixed with the run. A signal stops it as
    :class:`TrainingInterrupted` (picklable), never with a traceback of the worker."""

    log = lambda msg: print(f"[{run.label}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    with _RunSignals() as signals:
        try:
            if "data" not in _WORKER_DATA:
                _WORKER_DATA["data"] = config_data(run.plan)
            return train_and_evaluate(settings, run, _WORKER_DATA["data"], log)
        except KeyboardInterrupt:
            signum = signals.signum or signal.SIGINT
            raise TrainingInterrupted(signum, f"{run.label} stopped by {SIGNAL_NAMES.get(signum, signum)}") from None


def method_results(settings: CompareSettings, runs: list[GridRun], outcomes: list, method: str) -> dict[str, Any]:
    """One method's part of the results: per-seed runs, mean rows and paired differences."""
    per_norm: dict[str, dict[str, dict[str, Any]]] = {norm: {} for norm in settings.norms}
    for run, (best, evaluation) in zip(runs, outcomes):
        if run.method == method:
            per_norm[run.norm][str(run.seed)] = {"run_dir": str(run.plan.run_dir), **run_summary(run.plan),
                                                 "best": best, "eval": evaluation}
    rows, paired = seed_statistics(per_norm, settings.attacks, settings.baseline_norm)
    return {"rows": rows, "seed_rows": seed_rows(per_norm, settings.attacks), "paired": paired, "runs": per_norm}


def _compare_locked(settings: CompareSettings, out: Path, resume: bool, force: bool, data,
                    log: Callable[[str], None], command: str | None, jobs: int = 1) -> dict[str, Any]:

    c = settings.config
    if data is None and jobs == 1:  # with jobs > 1 each worker loads its own
        data = config_data(c)
    runs = grid_runs(settings, force)
    check_selectable(settings, runs)  # before anything in the folder changes
    history = _command_history(out, resume, command)
    out.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    for stale in out.glob("curves-*.png"):
        stale.unlink(missing_ok=True)
    write_json(out / SETTINGS_FILE, {**settings.to_dict(), **history})
    start = time.perf_counter()
    outcomes = run_grid(settings, runs, data, log, jobs)
    by_method = {m: method_results(settings, runs, outcomes, m) for m in settings.method_list}
    if data is None:
        data = config_data(c)
    (train_x, _), val = split_train_val(data, c.val_split, settings.seed_list[0], c.limit, c.val_limit)
    first = by_method[settings.method_list[0]]
    results = {
        **history,
        "settings": settings.to_dict(),
        "method": settings.method_list[0] if settings.methods is None else None,
        "methods": settings.method_list,
        "seeds": settings.seed_list,
        "select": settings.select,
        "baseline": settings.baseline_norm,
        "n_train": len(train_x),
        "n_val": 0 if val is None else len(val[1]),
        "n_eval": next(iter(first["runs"].values()))[str(settings.seed_list[0])]["eval"]["n"],
        **({"rows": first["rows"], "seed_rows": first["seed_rows"], "paired": first["paired"], "runs": first["runs"]}
           if settings.methods is None else {"by_method": by_method}),
        "paper_cifar10": PAPER_CIFAR10,
        "seconds": time.perf_counter() - start,
        "jobs": jobs,
    }
    write_json(out / "results.json", results)
    write_output(out / "results.md", results_markdown(results))
    for method, part in by_method.items():
        name = "curves.png" if settings.methods is None else f"curves-{method}.png"
        write_curves(settings, part["runs"], out / name, method if settings.methods is not None else None)
    return results


def _command_history(out: Path, resume: bool, command: str | None) -> dict[str, Any]:
    """The first command of a comparison and, when resumed, every resuming command after it."""
    if not resume:
        return {"command": command, "resumed_with": []}
    saved = load_settings(out)
    resumed = [*saved.get("resumed_with", []), *([command] if command else [])]
    return {"command": saved.get("command"), "resumed_with": resumed}
