"""AutoAttack-sized evaluations made fast without changing a verdict: bf16 attack iterations judged in
fp32, several processes, a resumable state file. Tiny models, a few dozen real images."""

from __future__ import annotations

import copy
import errno
import importlib
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import assert_refused, invoke_in
from robust.attacks.pgd import pgd
from robust.attacks.registry import Attack, FloatLogits, build_attack

import robust
import robust.outputs
from robust.checkpoint import build_checkpoint, save_checkpoint
from robust.data.loader import to_float
from robust.eval.accuracy import attack_dtype, correct_under_attack
from robust.eval.evaluation import evaluate
from robust.eval.jobs import batch_seed, chunk_bounds

# robust/__init__ exports the function evaluate, which hides the module of the same name.
evaluation = importlib.import_module("robust.eval.evaluation")
BUILD_ATTACKS = evaluation.build_attacks
EPS = 0.1  # the fgsm_model fixture's training eps too


@pytest.fixture(scope="module")
def model(fgsm_model):
    """conftest's briefly FGSM-trained width-4 model (adv route)."""
    return fgsm_model


@pytest.fixture(scope="module")
def images(fmnist):
    return fmnist.test_x[:48], fmnist.test_y[:48]


class TieAtBf16(torch.nn.Module):
    """Two logits, ``s`` and ``1.001 s`` with ``s`` the pixel sum: in fp32 class 1 wins, in bf16 the
    weight 1.001 rounds to 1 (8 bits of mantissa), the logits tie and argmax says class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0] * 4, [1.001] * 4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


@pytest.mark.precision
def test_a_bf16_verdict_never_counts_only_the_fp32_forward_does():
    model = TieAtBf16()
    x, y = torch.full((3, 1, 2, 2), 0.5), torch.ones(3, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (model(x).argmax(1) == 0).all()  # bf16 would call every example broken by doing nothing
    seen = []

    def identity(xa, ya):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return xa.clone()

    clean, robust = correct_under_attack(model, x, y, identity, dtype=torch.bfloat16)
    assert seen == [True]  # the attack ran under bf16 autocast
    assert clean.all() and robust.all()  # fp32 verdicts: right clean, right on the returned inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast changes no verdict either
        assert correct_under_attack(model, x, y, identity)[1].all()


def test_attack_precision_names_and_the_auto_rule():
    cpu = torch.device("cpu")
    assert attack_dtype("fp32", cpu) is None and attack_dtype("bf16", cpu) == torch.bfloat16
    assert attack_dtype("auto", cpu) is None  # the suite sets ROBUST_CPU_BF16=0: auto is fp32 on this CPU
    with pytest.raises(robust.errors.ConfigError, match="fp32"):
        attack_dtype("fp16", cpu)


@pytest.mark.bf16
@pytest.mark.precision
def test_bf16_pgd_iterations_and_every_broken_example_misclassified_in_fp32(model, images):
    x, y = to_float(images[0]), images[1]
    returned, forward_dtypes = [], set()
    hook = model.register_forward_hook(lambda m, i, out: forward_dtypes.add(out.dtype))

    def attack(xa, ya):
        returned.append(pgd(model, xa, ya, EPS, EPS / 4, 5))
        return returned[-1]

    try:
        torch.manual_seed(0)
        clean, robust = correct_under_attack(model, x, y, attack, dtype=torch.bfloat16)
    finally:
        hook.remove()
    assert forward_dtypes == {torch.bfloat16, torch.float32}  # iterations in bf16, verdicts in fp32
    with torch.no_grad():
        fp32_right = model(returned[0]).argmax(1) == y[clean]
    assert torch.equal(robust[clean], fp32_right)  # broken means misclassified in fp32, and only that
    # a comparison with something to compare: robust 15/16.0/17 of 48 (min/mean/max), broken 5/6.8/11 of 48
    # (native kernels only: an AVX2-only CPU skips bf16 tests)
    assert 0 < int(robust.sum()) < int(clean.sum())
    result = evaluate(model, (x, y), attacks=["pgd5"], eps=EPS, attack_precision="bf16")
    assert result["attack_precision"] == "bf16"


def test_fp32_attacks_give_the_hand_computed_verdicts_exactly(model, images):
    """fp32 mode is the plain computation: each attack with its seed on the clean-correct examples, fp32 forwards."""
    x, y = images
    names = ["fgsm", "pgd3", "apgd-ce"]
    result = evaluate(model, (x, y), attacks=names, eps=EPS, batch_size=len(y), attack_precision="fp32",
                      per_example=True)
    assert result["attack_precision"] == "fp32"
    xf = to_float(x)
    with torch.no_grad():
        clean = model(xf).argmax(1) == y
    worst = clean.clone()
    for k, name in enumerate(names):
        robust = clean.clone()
        for b, (lo, hi) in enumerate(chunk_bounds(len(y), len(y))):  # 48 images: 6 chunks of 8
            torch.manual_seed(batch_seed(0, b, k))  # each attack on each chunk starts from its own seed
            attack = build_attack(name, model, EPS, seed=0)
            keep = clean[lo:hi]
            x_adv = attack(xf[lo:hi][keep], y[lo:hi][keep])
            with torch.no_grad():
                robust[lo:hi][keep] = model(x_adv).argmax(1) == y[lo:hi][keep]
        assert result["routes"]["adv"][name] == 100.0 * robust.sum().item() / len(y)
        worst &= robust
    assert result["per_example"]["adv"]["robust"] == worst.tolist()


# ---- several processes ----------------------------------------------------------------------------


def test_two_processes_give_one_process_verdicts_example_for_example(model, images):
    kwargs = {"attacks": ["fgsm", "pgd3", "apgd-ce"], "eps": EPS, "batch_size": 8, "per_example": True,
                  "attack_precision": "fp32", "threads": 1}
    one = evaluate(model, images, **kwargs)
    two = evaluate(model, images, jobs=2, **kwargs)
    assert (one["jobs"], two["jobs"], two["threads"]) == (1, 2, 1)
    assert two["per_example"] == one["per_example"] and two["routes"] == one["routes"]
    # something to compare: robust 11-20 of 48 (22.9-41.7%, mean 30.2%), broken 6-13 of 48 (12.5-27.1%, mean 19.2%)
    assert 0 < one["routes"]["adv"]["worst_case"] < one["routes"]["adv"]["clean"]
    assert set(two["attack_seconds"]) == {"clean", "fgsm", "pgd3", "apgd-ce"}
    assert all(s > 0 for s in two["attack_seconds"].values())


def test_jobs_are_split_into_whole_batches_and_checked():
    from robust.eval.evaluation import plan_jobs
    from robust.eval.jobs import split

    assert split(list(range(5)), 2) == [[0, 1, 2], [3, 4]] and split([0], 3) == [[0], [], []]
    assert plan_jobs(4, None, 64, 2) == (2, max(1, robust.runtime.available_cpus() // 4))  # one process per batch at most
    assert plan_jobs(2, 3, 64, 8) == (2, 3)
    for jobs, threads, problem in ((0, None, ">= 1"), (65, None, "more than the 64 images"), (2, 0, "--threads")):
        with pytest.raises(robust.errors.ConfigError, match=problem):
            plan_jobs(jobs, threads, 64, 8)


# ---- a resumable state file -----------------------------------------------------------------------


def _counting(monkeypatch, calls: dict, stop_at: tuple[str, int] | None = None):
    """Make evaluate's attacks count their calls per name; with ``stop_at`` (name, n), the n-th call of
    that attack is a Ctrl-C."""
    def counted(model, **kwargs):
        attacks = BUILD_ATTACKS(model, **kwargs)

        def wrap(attack):
            def run(x, y):
                calls[attack.name] = calls.get(attack.name, 0) + 1
                if stop_at is not None and (attack.name, calls[attack.name]) == stop_at:
                    raise KeyboardInterrupt
                return attack.run(x, y)
            return Attack(attack.name, run, attack.params)

        return [wrap(a) for a in attacks]

    monkeypatch.setattr(evaluation, "build_attacks", counted)


def test_an_interrupted_evaluation_resumes_without_repeating_work_to_the_same_result(model, images, tmp_path,
                                                                                    monkeypatch):
    kwargs = {"attacks": ["fgsm", "pgd3"], "eps": EPS, "batch_size": 8, "per_example": True, "attack_precision": "fp32"}
    straight = evaluate(model, images, **kwargs)
    path = tmp_path / "state.json"
    calls: dict = {}
    _counting(monkeypatch, calls, stop_at=("pgd3", 3))  # Ctrl-C in pgd3 on the third batch
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, images, state=path, **kwargs)
    batches = json.loads(path.read_text())["routes"]["adv"]["batches"]
    assert [sorted(batches[str(b)]) for b in range(3)] == [["clean", "fgsm", "pgd3"]] * 2 + [["clean", "fgsm"]]
    assert "3" not in batches  # what was written is exactly what was done
    calls.clear()
    _counting(monkeypatch, calls)
    resumed = evaluate(model, images, state=path, resume=True, **kwargs)
    assert calls == {"fgsm": 3, "pgd3": 4}  # batches 3-5 for fgsm, 2-5 for pgd3: nothing finished is repeated
    assert resumed["per_example"] == straight["per_example"] and resumed["routes"] == straight["routes"]
    calls.clear()
    again = evaluate(model, images, state=path, resume=True, **kwargs)  # a finished state: nothing to run
    assert calls == {} and again["routes"] == straight["routes"]


def test_a_state_of_another_evaluation_is_refused_saying_what_differs(model, images, tmp_path):
    path = tmp_path / "state.json"
    kwargs = {"attacks": ["fgsm"], "eps": EPS, "batch_size": 16, "attack_precision": "fp32"}
    evaluate(model, images, state=path, **kwargs)
    written = path.read_bytes()
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    x, y = images
    for call, problem in [
        (lambda: evaluate(model, images, state=path, resume=True, **{**kwargs, "eps": 0.05}), "another eps (0.1 there, 0.05 now)"),
        (lambda: evaluate(model, images, state=path, resume=True, **{**kwargs, "attacks": ["pgd1"]}), "another attack list"),
        (lambda: evaluate(other, images, state=path, resume=True, **kwargs), "another model"),
        (lambda: evaluate(model, (x.flip(0), y.flip(0)), state=path, resume=True, **kwargs), "other images"),
        (lambda: evaluate(model, images, state=path, **kwargs), "already exists"),
        (lambda: evaluate(model, images, resume=True, **kwargs), "--resume needs --state"),
    ]:
        with pytest.raises(robust.errors.ConfigError, match=re.escape(problem)):
            call()
        assert path.read_bytes() == written  # nothing lost


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(build_checkpoint(model, dataset="fashion-mnist", eps=EPS, method="fast"), path)
    return path


def test_cli_state_and_resume_give_the_same_figures(checkpoint, tmp_path):
    args = ["eval", checkpoint, "--attack", "fgsm,pgd2", "--limit", "16", "--batch-size", "8", "--quiet",
            "--attack-precision", "fp32"]
    first = invoke_in(tmp_path, [*args, "--state", "s.json", "--json", "a.json"])
    assert first.exit_code == 0, first.output
    again = invoke_in(tmp_path, [*args, "--state", "s.json", "--resume", "--json", "b.json"])
    assert again.exit_code == 0, again.output
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["routes"] == b["routes"] and a["attack_precision"] == "fp32"
    assert a["attack_seconds"] == b["attack_seconds"]  # the resume ran nothing: the state's own times


def test_cli_refuses_bad_jobs_and_state_in_one_line_and_loses_nothing(checkpoint, tmp_path, monkeypatch):
    base = ["eval", checkpoint, "--attack", "fgsm", "--limit", "8", "--quiet"]
    done = invoke_in(tmp_path, [*base, "--state", "s.json"])
    assert done.exit_code == 0, done.output
    other = tmp_path / "other.pt"
    state = torch.load(checkpoint, weights_only=False)
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first] = state["model"][first] + 1e-3
    torch.save(state, other)
    for args, problems in [
        (["--resume"], ["--resume needs --state"]),
        (["--resume", "--state", "none.json"], ["none.json does not exist"]),
        (["--jobs", "0"], ["--jobs must be >= 1"]),
        (["--jobs", "9"], ["--jobs 9 is more than the 8 images"]),
        (["--threads", "0"], ["threads must be in [1, "]),
        (["--state", "s.json"], ["s.json already exists", "--resume"]),
        (["--state", "s.json", "--resume", "--eps", "0.05"], ["another eps"]),
        (["--state", "s.json", "--resume", "--attack", "pgd1"], ["another attack list"]),
        (["--state", "s.json", "--resume", "--limit", "16"], ["other images", "another number of images"]),
        (["--state", "s.json", "--resume", "--seed", "1"], ["another seed"]),
        (["--state", checkpoint, "--force"], ["is the file this command reads"]),
    ]:
        assert_refused(tmp_path, [*base, *args], *problems)
    assert_refused(tmp_path, ["eval", other, "--attack", "fgsm", "--limit", "8", "--quiet", "--state", "s.json",
                              "--resume"], "another model")
    folder = next((f for f in ("/sys", "/proc") if os.path.isdir(f) and _refuses(f)), None)
    if folder is not None:  # a real folder that refuses new files, root included
        assert_refused(tmp_path, [*base, "--state", f"{folder}/robust-state.json"], f"cannot write to {folder}")

    def read_only(*args, **kwargs):  # a read-only state folder (as root, chmod does not stop writes)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(robust.outputs.tempfile, "mkstemp", read_only)
    assert_refused(tmp_path, [*base, "--state", "s.json", "--resume"], "Read-only file system")
    assert_refused(tmp_path, [*base, "--state", "new.json"], "Read-only file system")


def test_two_torchrun_ranks_give_one_process_verdicts_and_only_rank_zero_speaks(checkpoint, tmp_path):
    args = ["eval", str(checkpoint), "--attack", "fgsm,pgd3,apgd-ce", "--limit", "48", "--batch-size", "8", "--quiet",
            "--attack-precision", "fp32", "--threads", "1"]
    one = invoke_in(tmp_path, [*args, "--json", "one.json", "--per-example", "one.jsonl"])
    assert one.exit_code == 0, one.output
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "robust.cli", *args, "--json", "two.json", "--per-example", "two.jsonl"],
                           cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True,
                           timeout=300)
    assert ranks.returncode == 0, ranks.stdout + ranks.stderr
    assert ranks.stdout.count("tiny.pt: ") == 1 and "on each of 2 torchrun ranks" in ranks.stdout  # rank 0 alone prints
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (a["ranks"], b["ranks"]) == (1, 2)
    assert b["routes"] == a["routes"] and b["per_class"] == a["per_class"]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()  # example for example
    # something to compare: the figures of test_two_processes_give_one_process_verdicts_example_for_example (the
    # same attacks, examples and batches); with fgsm,pgd3 alone as few as 2 of 24 (4 of 48) were broken
    assert 0 < a["routes"]["adv"]["worst_case"] < a["routes"]["adv"]["clean"]
    assert set(b["attack_seconds"]) == {"clean", "fgsm", "pgd3", "apgd-ce"}


def _rank_evaluations(rank: int, init: str, model, images, kwargs: dict, out: str) -> None:
    """One of two gloo ranks: the sharded evaluation on both, then one on rank 0 alone (across_ranks=False)."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        both = evaluate(model, images, **kwargs)
        alone = evaluate(model, images, across_ranks=False, **kwargs) if rank == 0 else None
        torch.save({"both": both, "alone": alone}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_evaluate_in_a_process_group_shards_on_every_rank_or_runs_alone(model, images, tmp_path):
    kwargs = {"attacks": ["fgsm", "pgd3"], "eps": EPS, "batch_size": 8, "per_example": True, "attack_precision": "fp32",
              "threads": 1}
    one = evaluate(model, images, **kwargs)
    out = str(tmp_path / "result")
    torch.multiprocessing.spawn(_rank_evaluations, nprocs=2, join=True,
                                args=(f"file://{tmp_path / 'store'}", model, images, kwargs, out))
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1)]
    for result in (ranks[0]["both"], ranks[1]["both"], ranks[0]["alone"]):
        assert result["per_example"] == one["per_example"] and result["routes"] == one["routes"]
    assert (ranks[0]["both"]["ranks"], ranks[0]["alone"]["ranks"]) == (2, 1)  # rank 0 alone: no peer was waited for


def test_torchrun_refuses_a_state_file_in_one_line(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for extra in (["--state", "s.json"], ["--state", "s.json", "--resume"]):
        assert_refused(tmp_path, ["eval", checkpoint, "--attack", "fgsm", "--limit", "8", "--quiet", *extra],
                       "under torchrun", "--jobs N --state FILE")


def _refuses(folder: str) -> bool:
    try:
        with open(os.path.join(folder, ".robust-test-probe"), "w"):
            pass
    except OSError:
        return True
    os.unlink(os.path.join(folder, ".robust-test-probe"))
    return False


@pytest.mark.bf16
@pytest.mark.precision
def test_torchattacks_attacks_run_in_bf16_on_fp32_logits_and_leave_the_mode_alone(model, images):
    """APGD-T keeps numpy copies of its losses (numpy has no bf16) and Square compares margins: under bf16
    autocast they see fp32 logits (FloatLogits), and the model's eval mode survives them."""
    x, y = to_float(images[0][:8]), images[1][:8]
    wrapped = FloatLogits(model)
    model.eval()
    wrapped.train()  # train() reaches the wrapped model; the wrapper has no mode of its own
    assert model.training and wrapped.training
    model.eval()
    assert not wrapped.training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert wrapped(x).dtype == torch.float32
    result = evaluate(model, (x, y), attacks=["apgd-t", "square"], eps=EPS, queries=50, attack_precision="bf16")
    assert result["attack_precision"] == "bf16" and not model.training
    acc = result["routes"]["adv"]
    assert acc["apgd-t"] <= acc["clean"] and acc["square"] <= acc["clean"]


def test_the_benchmark_reads_the_official_codes_stage_times_from_its_log():
    from robust.bench.autoattack import _StageLog

    log = _StageLog()
    for line in ["initial accuracy: 75.00%", "robust accuracy after APGD-CE: 62.50% (total time 2.5 s)",
                 "apgd-t - 1/1 - 1 out of 15 successfully perturbed",
                 "robust accuracy after APGD-T: 58.33% (total time 30.0 s)",
                 "robust accuracy after FAB-T: 58.33% (total time 70.5 s)"]:
        log.emit(logging.LogRecord("auto-attack", logging.DEBUG, __file__, 0, line, None, None))
    assert log.stage_seconds() == {"apgd-ce": 2.5, "apgd-t": 27.5, "fab-t": 40.5}  # totals -> per stage


def test_the_benchmark_refuses_an_unknown_variant_before_reading_anything(tmp_path, capsys):
    from robust.bench.autoattack import main

    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "missing.pt"), "--variants", "jobs,fast16"])
    assert stop.value.code == 2 and "unknown fast16; choose from fp32, bf16, fast, jobs" in capsys.readouterr().err
