"""The work of an evaluation, chunk by chunk, in this process or split across several.

A unit of work is one route's chunk of images: its clean predictions, then each attack on its
clean-correct examples. The chunks follow a fixed rule of the number of images and the batch size
alone (:func:`chunk_bounds`), never of the number of processes, and each attack on each chunk starts
from its own seed (:func:`batch_seed`), so a verdict does not depend on which process attacks the
chunk, in which order, or in which run of a resume: one process, N processes, N torchrun ranks and an
interrupted-then-resumed evaluation give the same verdicts, example for example. A small evaluation
still has several chunks (up to :data:`MIN_CHUNKS`), so N processes share even 100 images evenly.
The processes are spawned (a fork would inherit the parent's OpenMP threads), each with its share
of the chunks and its own torch thread count; they report every verdict to the parent,
which keeps the state and the progress bars. Under torchrun (a process group joined before the
evaluation) each rank scores its share of the chunks and the ranks exchange their verdicts at the
end, so every rank returns the whole result.
"""

from __future__ import annotations

import queue as queue_
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from robust.attacks.pgd import fp32_predictions
from robust.attacks.registry import Attack, check_perturbation
from robust.data.loader import to_float
from robust.eval.accuracy import correct_under_attack
from robust.nn.norms import bn_mode, use_route

# report(route, chunk, "clean" or attack name, verdicts, seconds[, an ensemble's seconds per stage[, PGD's iterations]])
Report = Callable[..., None]


MIN_CHUNKS = 16  # an evaluation of n images has at least min(MIN_CHUNKS, n // MIN_CHUNK) chunks ...
MIN_CHUNK = 8  # ... of at least MIN_CHUNK images, however large the batch size
SPLIT_RULE = f"max(ceil(n / batch_size), min({MIN_CHUNKS}, n // {MIN_CHUNK})) chunks, sizes differing by at most one"


def chunk_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """The evaluation's chunks of ``n`` images as (start, end): :data:`SPLIT_RULE`, in order.

    At most ``batch_size`` images each; at least 16 chunks when there are 128 images or more, so
    up to 16 processes (or ranks) share a small evaluation evenly. The rule depends on ``n`` and the
    batch size only: a rerun with other ``--jobs`` attacks the very same chunks.
    """
    count = max(1, -(-n // batch_size), min(MIN_CHUNKS, n // MIN_CHUNK))
    size, extra = divmod(n, count)
    bounds, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


def batch_seed(seed: int, batch: int, attack: int) -> int:
    """The RNG seed of attack number ``attack`` (in the list's order) on chunk number ``batch``."""
    return (seed * 1_000_003 + batch) * 1_009 + attack


def to_model_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device)
    return to_float(x) if x.dtype == torch.uint8 else x.float()


def checked(attack: Attack, eps: float, threat: str):
    """``attack`` that also verifies its examples lie in the eps ball and in [0, 1]."""
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = attack(x, y)
        check_perturbation(x, x_adv, eps, threat, name=attack.name)
        return x_adv
    return run


@dataclass(frozen=True)
class Scoring:
    """What every chunk is scored with: the radius and threat model the attacks are checked against, the chunks'
    bounds (chunk b holds images ``bounds[b]``), the device, the seed the chunks' seeds come from, and the
    attacks' autocast dtype (None: fp32)."""

    eps: float
    threat: str
    bounds: Sequence[tuple[int, int]]
    device: torch.device
    seed: int
    dtype: torch.dtype | None


def score_units(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[Attack], units: Sequence[tuple[str, int]],
                known: dict[tuple[str, int], dict[str, list]], report: Report, scoring: Scoring) -> None:
    """Score each (route, chunk) of ``units`` as ``scoring`` says, skipping what ``known`` already holds; every
    clean pass and every attack's verdicts go to
    ``report(route, chunk, "clean" or name, list, seconds, stage seconds, iterations)``."""
    eps, threat, bounds, device, seed, dtype = (scoring.eps, scoring.threat, scoring.bounds, scoring.device,
                                                scoring.seed, scoring.dtype)
    with bn_mode(model, False), torch.autocast(device.type, enabled=False):  # eval mode; fp32 unless an attack asks
        for route, b in units:
            done = known.get((route, b), {})
            first, last = bounds[b]
            xb = to_model_input(x[first:last], device)
            yb = y[first:last].to(device)
            with use_route(model, route):
                if "clean" in done:
                    prediction = torch.tensor(done["clean"], device=device)
                else:
                    start = time.perf_counter()
                    prediction = fp32_predictions(model, xb)
                    report(route, b, "clean", prediction.tolist(), time.perf_counter() - start)
                alive = prediction == yb
                for k, attack in enumerate(attacks):
                    if attack.name in done:
                        continue
                    start = time.perf_counter()
                    attack.stage_seconds.clear()
                    attack.iterations.clear()
                    torch.manual_seed(batch_seed(seed, b, k))
                    _, robust = correct_under_attack(model, xb, yb, checked(attack, eps, threat), clean=alive, dtype=dtype)
                    report(route, b, attack.name, robust.tolist(), time.perf_counter() - start, dict(attack.stage_seconds),
                           dict(attack.iterations))


def split(units: Sequence[Any], parts: int) -> list[list[Any]]:
    """``units`` in ``parts`` contiguous shares whose sizes differ by at most one."""
    size, extra = divmod(len(units), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(list(units[start:end]))
        start = end
    return out


def _worker(messages, threads: int, build: Callable[[nn.Module], list[Attack]], model: nn.Module, x: torch.Tensor,
            y: torch.Tensor, units, known, options: Scoring) -> None:
    """One spawned process: its share of the units, each verdict sent to the parent as it comes."""
    try:
        torch.set_num_threads(threads)
        model.to(options.device)
        score_units(model, x, y, build(model), units, known, lambda *result: messages.put(("result", *result)), options)
        messages.put(("done",))
    except BaseException as exc:  # noqa: BLE001 (sent to the parent, which re-raises it)
        messages.put(("error", exc))


def run_processes(jobs: int, threads: int, build: Callable[[nn.Module], list[Attack]], model: nn.Module,
                  x: torch.Tensor, y: torch.Tensor, units: Sequence[tuple[str, int]],
                  known: dict[tuple[str, int], dict[str, list]], report: Report, options: Scoring) -> None:
    """``score_units`` over ``jobs`` spawned processes of ``threads`` torch threads each, reporting here.

    ``build(model)`` makes the attacks inside each process (attack objects hold the model). An
    error in any process stops them all and is raised here; so is a process that dies without one.
    """
    context = torch.multiprocessing.get_context("spawn")
    messages = context.Queue()
    shares = split(units, jobs)
    cpu_model = model.to("cpu")
    processes = [context.Process(target=_worker, daemon=True,
                                 args=(messages, threads, build, cpu_model, x, y, share,
                                       {u: known[u] for u in share if u in known}, options))
                 for share in shares if share]
    for p in processes:
        p.start()
    running = len(processes)
    try:
        while running:
            try:
                message = messages.get(timeout=1.0)
            except queue_.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"an evaluation process exited with code {dead[0].exitcode} "
                                       "(killed, or out of memory?); rerun with --resume to finish") from None
                continue
            if message[0] == "result":
                report(*message[1:])
            elif message[0] == "done":
                running -= 1
            else:
                raise message[1]
    finally:
        for p in processes:
            if p.is_alive():
                p.terminate()
            p.join()
        model.to(options.device)


def world_position() -> tuple[int, int]:
    """(rank, world size) in the torch.distributed process group this process has joined; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exchange(mine: list, error: BaseException | None, rank: int, world: int) -> list:
    """The other ranks' reports, gathered on every rank. Every rank arrives here, failed or not, so an error
    on one rank is raised on all of them instead of leaving the others waiting for its share."""
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (mine, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    failed = [(r, message) for r, (_, message) in enumerate(gathered) if message]
    if failed:
        raise RuntimeError(f"evaluation rank {failed[0][0]} failed ({failed[0][1]}); no figures were reported")
    return [item for r, (items, _) in enumerate(gathered) if r != rank for item in items]
