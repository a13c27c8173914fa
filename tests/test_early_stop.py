"""Exact early stop of our PGD: an example whose iterates enter a cycle, or that an earlier restart
already fooled, stops, and the returned examples are the full run's bit for bit. Tiny models, real
images, fp32."""

from __future__ import annotations

import importlib

import pytest
import torch

from robust.attacks.pgd import EarlyStop, fp32_predictions, pgd_restarts
from robust.attacks.registry import build_attack
from robust.data.loader import to_float
from robust.eval.evaluation import evaluate

EPS = {"linf": 0.1, "l2": 1.0}


@pytest.fixture(scope="module")
def model(fgsm_model):
    """conftest's briefly FGSM-trained width-4 model (adv route)."""
    return fgsm_model


@pytest.fixture(scope="module")
def images(fmnist):
    return to_float(fmnist.test_x[:64]), fmnist.test_y[:64]


def _both(model, x, y, restarts: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor, EarlyStop]:
    """The full run's and the early-stopped run's examples from the same seed, and the latter's counts."""
    torch.manual_seed(1)
    full = pgd_restarts(model, x, y, restarts=restarts, **kwargs)
    memo = EarlyStop()
    torch.manual_seed(1)
    early = pgd_restarts(model, x, y, restarts=restarts, early_stop=memo, **kwargs)
    return full, early, memo


@pytest.fixture(scope="module")
def pair(model, images):
    """``_both`` on this module's model and images, each setting run once per module: the runs are seeded, so a
    second call would give the same tensors and counts (the tests only read them)."""
    done = {}

    def run(restarts: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor, EarlyStop]:
        key = (restarts, *sorted(kwargs.items()))
        if key not in done:
            done[key] = _both(model, *images, restarts, **kwargs)
        return done[key]
    return run


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.precision
# Every pair of settings (steps and restarts x loss, x threat; loss x threat) meets in some case: the
# 6 cases of a pairwise design instead of the 12 of the full grid, to keep the suite short.
@pytest.mark.parametrize("steps,restarts,loss,threat", [
    (20, 1, "ce", "linf"), (20, 1, "cw", "l2"), (50, 1, "ce", "l2"), (50, 1, "cw", "linf"),
    (20, 3, "ce", "linf"), (20, 3, "cw", "l2")])
def test_early_stopped_pgd_returns_the_full_runs_examples_bit_for_bit(model, images, pair, threat, loss, steps, restarts):
    x, y = images
    eps = EPS[threat]
    full, early, memo = pair(restarts, eps=eps, alpha=eps / 4, steps=steps, threat=threat, loss=loss)
    assert torch.equal(_bits(early), _bits(full))
    assert torch.equal(fp32_predictions(model, early), fp32_predictions(model, full))
    # the full run: every example, every step, every restart it runs (it stops once all are fooled)
    assert memo.full % (len(x) * steps) == 0 and len(x) * steps <= memo.full <= restarts * len(x) * steps
    assert 0 < memo.run <= memo.full + len(x) * steps  # at most one step's checking on top


@pytest.mark.precision
def test_cycles_and_fooled_restarts_save_iterations(images, pair):
    x, y = images
    _, _, memo = pair(1, eps=0.1, alpha=0.025, steps=50, threat="linf", loss="ce")
    assert memo.run < memo.full == len(x) * 50  # cycles found within 50 steps
    _, _, memo = pair(3, eps=0.1, alpha=0.025, steps=20, threat="linf", loss="ce")
    assert memo.run < 0.75 * memo.full  # later restarts attack only the examples not yet fooled


class SizeDependent(torch.nn.Module):
    """``model`` whose first logit grows with the batch size: a kernel whose sums change with the rows."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        return logits + torch.nn.functional.one_hot(torch.zeros_like(logits[:, 0]).long(), logits.shape[1]) * 1e-3 * len(x)


def test_a_smaller_batch_is_used_only_where_it_gives_the_full_batchs_bits(model, images, pair):
    x, y = images
    odd = SizeDependent(model).eval()
    full, early, memo = _both(odd, x, y, 1, eps=0.1, alpha=0.025, steps=50, threat="linf", loss="ce")
    assert torch.equal(_bits(early), _bits(full))
    assert memo.sizes and not any(memo.sizes.values())  # each smaller size was checked and refused
    _, _, plain = pair(1, eps=0.1, alpha=0.025, steps=50, threat="linf", loss="ce")
    assert any(plain.sizes.values())  # this model's kernels give the same bits on fewer rows (some sizes at least)


def test_early_stop_refuses_a_loss_over_the_whole_batch(model, images):
    x, y = images
    with pytest.raises(ValueError, match="per-example loss"):
        pgd_restarts(model, x, y, early_stop=EarlyStop(), eps=0.1, alpha=0.025, steps=2, loss=lambda logits, y: logits.sum())


def test_the_registrys_pgd_stops_early_in_eval_mode_only(model, images, pair):
    x, y = images
    attack = build_attack("pgd50", model, 0.1)
    torch.manual_seed(1)
    stopped = attack(x, y)
    full, _, _ = pair(1, eps=0.1, alpha=0.025, steps=50, threat="linf", loss="ce")  # the full run from seed 1
    assert torch.equal(_bits(stopped), _bits(full))
    assert attack.iterations["iterations_run"] < attack.iterations["iterations_full"] == len(x) * 50
    model.train()
    try:
        attack.iterations.clear()
        attack(x[:8], y[:8])  # batch statistics tie the examples together: no early stop, no counts
        assert attack.iterations == {}
    finally:
        model.eval()


def test_evaluation_reports_the_iterations_each_pgd_ran_and_would_have_run(model, fmnist):
    data = (fmnist.test_x[:64], fmnist.test_y[:64])
    result = evaluate(model, data, attacks=["fgsm", "pgd50", "cw20"], eps=0.1, attack_precision="fp32", per_example=True)
    correct = sum(p == t for p, t in zip(result["per_example"]["adv"]["prediction"], fmnist.test_y[:64].tolist()))
    assert set(result["iterations"]) == {"pgd50", "cw20"}  # FGSM has one step: nothing to save
    pgd50 = result["iterations"]["pgd50"]
    assert pgd50["iterations_full"] == 50 * correct  # only the clean-correct examples are attacked
    assert 0 < pgd50["iterations_run"] < pgd50["iterations_full"]
    assert result["iterations"]["cw20"]["iterations_full"] == 20 * correct


def test_a_window_cut_to_fit_memory_finds_fewer_cycles_and_still_the_same_bits(model, images, pair, monkeypatch):
    engine = importlib.import_module(pgd_restarts.__module__)  # the package exports a function of the same name
    x, y = images
    _, _, wide = pair(1, eps=0.1, alpha=0.025, steps=50, threat="linf", loss="ce")
    monkeypatch.setattr(engine, "RING_BYTES", 1)  # one iterate kept: only fixed points are recognised
    full, early, narrow = _both(model, x, y, 1, eps=0.1, alpha=0.025, steps=50, threat="linf", loss="ce")
    assert torch.equal(_bits(early), _bits(full))
    assert wide.run <= narrow.run <= narrow.full
