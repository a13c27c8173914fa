"""Training objectives (pgd, trades, mart, fast, nfgsm), AWP, the catastrophic-overfitting guard, the
method flags, saved configs without the method fields, and the packaging: each loss equals a hand
computation on tiny numbers."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import assert_refused, tiny_config

from robust.checkpoint import load_checkpoint
from robust.cli.main import cli
from robust.config import TrainConfig, upgrade_saved
from robust.data.types import ImageData
from robust.errors import ConfigError
from robust.nn.factory import build_model
from robust.nn.norms import use_route
from robust.objectives import METHODS, OBJECTIVES, get_objective
from robust.objectives.mart import MART
from robust.objectives.trades import TRADES, batch_kl
from robust.train.awp import perturbed_parameters, weight_perturbation
from robust.train.co_guard import COGuard
from robust.train.step import StepSettings, make_adversarial, step_loss, train_step
from robust.train.trainer import Trainer

EPS = 0.1
ROOT = Path(__file__).resolve().parents[1]


def _model(norm: str = "sabn", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(norm=norm, width=4, in_channels=1).train()


def _batch(n: int = 6, low: float = 0.0, high: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(n, 1, 12, 12, generator=g)
    return x, torch.randint(0, 10, (n,), generator=g)


# ---- the registry --------------------------------------------------------------------------------------


def test_the_registry_has_every_method_and_hybrid_is_pgd():
    assert list(OBJECTIVES) == ["pgd", "trades", "mart", "fast", "nfgsm", "standard"]
    assert set(METHODS) == set(OBJECTIVES) | {"hybrid"}
    assert get_objective("hybrid") is OBJECTIVES["pgd"]
    with pytest.raises(ValueError, match="unknown method 'madry'; valid: hybrid, pgd, trades, mart, fast, nfgsm, standard"):
        get_objective("madry")
    assert [OBJECTIVES[m].attack_bn for m in OBJECTIVES] == ["train", "eval", "eval", "train", "train", "train"]
    assert [m for m in OBJECTIVES if OBJECTIVES[m].one_step] == ["fast", "nfgsm"]


def test_standard_training_uses_the_clean_inputs_and_plain_ce():
    x, y = _batch()
    standard = OBJECTIVES["standard"](EPS, EPS / 4, 2)
    assert torch.equal(standard.examples(_model("bn"), x, y), x)
    logits = torch.tensor(ADV)
    expected = sum(-math.log(_softmax(ADV[i])[Y[i]]) for i in range(len(Y))) / len(Y)
    assert standard.loss(logits, torch.tensor(Y)).item() == pytest.approx(expected, abs=1e-6)


# ---- losses against hand computations -------------------------------------------------------------------

NAT = [[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-0.5, 1.5, 0.0]]
ADV = [[1.0, 1.2, -0.5], [0.4, -0.2, 0.9], [0.3, 0.3, 0.1]]
Y = [0, 2, 1]


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


@pytest.mark.precision
def test_trades_loss_is_ce_plus_beta_times_the_batch_mean_kl():
    n = len(Y)
    ce = sum(-math.log(_softmax(NAT[i])[Y[i]]) for i in range(n)) / n
    kl = sum(p * math.log(p / q) for i in range(n) for p, q in zip(_softmax(NAT[i]), _softmax(ADV[i]))) / n
    loss = TRADES(EPS, EPS / 4, 2, beta=6.0).loss(torch.tensor(ADV), torch.tensor(Y), torch.tensor(NAT))
    assert loss.item() == pytest.approx(ce + 6.0 * kl, abs=1e-6)
    assert batch_kl(torch.tensor(NAT), torch.tensor(NAT)).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.precision
def test_mart_loss_is_boosted_ce_plus_beta_times_kl_weighted_by_one_minus_the_true_probability():
    n, beta = len(Y), 5.0
    boosted = kl = 0.0
    for i in range(n):
        p, q = _softmax(NAT[i]), _softmax(ADV[i])
        wrong = max((j for j in range(3) if j != Y[i]), key=lambda j: q[j])  # the most likely wrong class
        boosted += -math.log(q[Y[i]]) - math.log(1.0001 - q[wrong] + 1e-12)
        kl += sum(pj * (math.log(pj) - math.log(qj + 1e-12)) for pj, qj in zip(p, q)) * (1.0000001 - p[Y[i]])
    expected = boosted / n + beta * kl / n
    loss = MART(EPS, EPS / 4, 2, beta=beta).loss(torch.tensor(ADV), torch.tensor(Y), torch.tensor(NAT))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("method", list(OBJECTIVES))
@pytest.mark.parametrize("norm", ["bn", "auxbn", "sabn"])
@pytest.mark.precision
def test_every_objective_on_every_norm_fused_equals_unfused_and_the_hand_sum(method, norm):
    x, y = _batch()
    x_adv = (x + 0.05).clamp(0, 1)
    w = 0.3
    kind = OBJECTIVES[method]
    objective = kind(EPS, EPS / 4, 2)  # trades, mart: beta 6 by default
    ref = _model(norm)  # separate forwards, written out: w * CE(clean route, x) + (1 - w) * objective(adv route)
    with use_route(ref, "clean"):
        clean = F.cross_entropy(ref(x), y)
    with use_route(ref, "adv"):
        natural = ref(x) if kind.uses_natural else None
        adv = ref(x_adv)
    by_hand = w * clean + (1 - w) * objective.loss(adv, y, natural)
    losses = {}
    for fused in (True, False):
        s = StepSettings(objective=objective, clean_weight=w, fused=fused)
        loss, logits = step_loss(_model(norm), x, x_adv, y, s)
        losses[fused] = loss.item()
        assert torch.allclose(logits, adv, atol=1e-5)
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[False] == pytest.approx(by_hand.item(), abs=1e-5)
    # and a whole training step (examples, loss, backward, optimizer step) runs
    model = _model(norm)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1)
    loss, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), None, x, y,
                         StepSettings.of(method, EPS, steps=2, clean_weight=w))
    assert math.isfinite(loss.item()) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- the attacks ------------------------------------------------------------------------------------------


@pytest.mark.precision
def test_trades_attack_starts_from_the_small_gaussian_and_raises_the_kl():
    model = _model().eval()
    x, y = _batch(8, 0.2, 0.8)
    torch.manual_seed(3)
    start = TRADES(EPS, EPS / 4, 0).examples(model, x, y)  # no step: the start itself
    torch.manual_seed(3)
    assert torch.equal(start, (x + 0.001 * torch.randn_like(x)).clamp(0, 1))
    torch.manual_seed(3)
    x_adv = TRADES(EPS, EPS / 4, 5).examples(model, x, y)
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    with torch.no_grad():
        kl_start, kl_end = batch_kl(model(x), model(start)).item(), batch_kl(model(x), model(x_adv)).item()
    assert kl_start < 1e-6 and kl_end > 100 * kl_start  # measured: 1.8e-8 -> 3.3e-5 on this width-4 model


@pytest.mark.precision
def test_nfgsm_steps_beyond_eps_without_projection_and_stays_in_the_unit_box():
    model = _model().eval()
    x, y = _batch(8, 0.35, 0.65)  # x +- 3 eps stays inside [0, 1]: nothing is clamped
    torch.manual_seed(5)
    x_adv = OBJECTIVES["nfgsm"](EPS, EPS, 1).examples(model, x, y)
    torch.manual_seed(5)  # by hand: noise U[-2 eps, 2 eps], one signed CE step of eps, no projection
    x0 = (x + torch.empty_like(x).uniform_(-2 * EPS, 2 * EPS)).clamp(0, 1).requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)
    assert torch.equal(x_adv, (x0.detach() + EPS * grad.sign()).clamp(0, 1))
    reach = (x_adv - x).abs().max().item()
    assert 2 * EPS < reach <= 3 * EPS + 1e-6
    edges, _ = _batch(8, 0.0, 1.0)
    edges = edges.round()  # pixels at 0 and 1: the step must be clamped
    out = OBJECTIVES["nfgsm"](EPS, EPS, 1).examples(model, edges, y)
    assert out.min().item() >= 0 and out.max().item() <= 1
    fast = OBJECTIVES["fast"](EPS, EPS, 1).examples(model, x, y)  # FGSM-RS projects back to the ball
    assert (fast - x).abs().max().item() <= EPS + 1e-6


# ---- AWP -------------------------------------------------------------------------------------------------


@pytest.mark.precision
def test_awp_has_the_stated_per_layer_norm_and_restores_the_weights_bit_exactly():
    model = _model()
    x, y = _batch()
    params = perturbed_parameters(model)
    assert params and all(p.dim() > 1 for p in params)  # conv and linear weights, no norm affines
    weights = [p.detach().clone() for p in params]
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    grads = torch.autograd.grad(loss_fn(), params)
    buffers = [b.detach().clone() for b in model.buffers()]
    gamma = 0.01
    wp = weight_perturbation(model, loss_fn, gamma)
    assert all(torch.equal(b, c) for b, c in zip(buffers, model.buffers()))  # the ascent left running stats alone
    wp.apply()
    for p, w, g, d in zip(params, weights, grads, wp.deltas):
        assert d.norm().item() == pytest.approx(gamma * w.norm().item(), rel=1e-5)  # gamma * ||w||
        assert F.cosine_similarity(d.flatten(), g.flatten(), dim=0).item() == pytest.approx(1.0, abs=1e-5)
        assert (p.detach() - w).norm().item() == pytest.approx(gamma * w.norm().item(), rel=1e-3)
    wp.restore()
    assert all(torch.equal(p, w) for p, w in zip(params, weights))


def test_a_step_with_awp_and_no_learning_rate_leaves_every_weight_as_it_was():
    model = _model()
    x, y = _batch()
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(2)
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), None, x, y,
               StepSettings.of("trades", EPS, steps=1, clean_weight=0.5, awp_gamma=0.05), awp=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)


# ---- the catastrophic-overfitting guard ---------------------------------------------------------------


class _Constant(nn.Module):
    """Ignores its input: robust by construction."""

    def forward(self, x):
        return torch.tensor([[1.0, -1.0]]) + 0 * x.flatten(1).sum(1, keepdim=True)


class _Fragile(nn.Module):
    """Right by a margin an eps step removes: collapses under PGD."""

    def forward(self, x):
        s = 10 * (x.flatten(1).sum(1) - 7.9)  # 16 pixels at 0.5: s = 1, class 0; PGD can lower the sum by 1.6
        return torch.stack([s, -s], dim=1)


def test_the_guard_fires_when_pgd_accuracy_collapses_and_keeps_the_last_good_value():
    x, y = torch.full((4, 1, 4, 4), 0.5), torch.zeros(4, dtype=torch.long)
    guard = COGuard(x, y, EPS)
    assert guard.check(_Constant(), seed=0) == {"pgd_acc": 100.0, "previous": None, "collapsed": False}
    assert guard.accuracy(_Fragile(), seed=0) == 0.0
    assert guard.check(_Fragile(), seed=0) == {"pgd_acc": 0.0, "previous": 100.0, "collapsed": True}
    assert guard.previous == 100.0
    state = torch.get_rng_state()
    guard.accuracy(_Fragile(), seed=7)
    assert torch.equal(state, torch.get_rng_state())  # validation's random starts are not disturbed


# three epochs: the guard has a good epoch to keep before epoch 3 collapses
_config = partial(tiny_config, epochs=3, val_limit=16, seed=3)


@pytest.fixture(scope="module")
def data(fmnist) -> ImageData:
    return ImageData("fashion-mnist", fmnist.train_x[:128], fmnist.train_y[:128], fmnist.test_x[:8], fmnist.test_y[:8])


def test_a_collapse_stops_training_keeps_the_last_good_epoch_and_says_so(tmp_path, data, monkeypatch):
    accuracies = iter([40.0, 50.0, 5.0])  # epoch 3 collapses (more than 20 points below epoch 2)
    monkeypatch.setattr(COGuard, "accuracy", lambda self, model, seed, amp=None: next(accuracies))
    lines: list[str] = []
    trainer = Trainer(_config(tmp_path / "run", method="nfgsm"), data=data, log=lines.append)
    result = trainer.fit()
    assert result["stopped"] == {"epoch": 3, "kept_epoch": 2, "pgd_acc": 5.0, "previous": 50.0}
    assert result["epoch"] == 2
    said = [l for l in lines if "catastrophic overfitting" in l]
    assert len(said) == 1 and "fell from 50.0% to 5.0%" in said[0] and "the result is epoch 2" in said[0]
    logged = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in logged] == [1, 2, 3] and [l["co_guard_pgd_acc"] for l in logged] == [40.0, 50.0, 5.0]
    assert logged[2]["co_guard"]["stopped"] is True and "val_adv_robust" not in logged[2]
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 1 and last["stopped"]["epoch"] == 3 and last["metrics"]["epoch"] == 2
    for key, value in last["model"].items():  # the result is epoch 2's weights, in memory and on disk
        assert torch.equal(value, trainer.model.state_dict()[key].cpu()), key
    with pytest.raises(ConfigError, match="stopped at epoch 3 by the catastrophic-overfitting guard.*--no-co-guard"):
        Trainer(_config(tmp_path / "run", method="nfgsm"), data=data, resume=True).setup()
    monkeypatch.undo()
    resumed = Trainer(_config(tmp_path / "run", method="nfgsm", co_guard=False), data=data, resume=True,
                      log=lambda m: None).fit()  # --no-co-guard trains on
    assert resumed["epoch"] == 3 and "stopped" not in resumed


def test_trades_with_awp_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, data):
    kw = dict(method="trades", awp_gamma=0.01, awp_warmup=1, epochs=2, schedule="multistep")  # lr independent of epochs
    straight = Trainer(_config(tmp_path / "a", **kw), data=data, log=lambda m: None).fit()
    Trainer(_config(tmp_path / "b", **{**kw, "epochs": 1}), data=data, log=lambda m: None).fit()
    Trainer(_config(tmp_path / "b", **kw), data=data, resume=True, log=lambda m: None).fit()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["config"]["awp_gamma"] == 0.01 and a["method"] == "trades" and "co_guard_pgd_acc" not in straight
    Trainer(_config(tmp_path / "c", **{**kw, "awp_gamma": 0.0}), data=data, log=lambda m: None).fit()
    c = load_checkpoint(tmp_path / "c" / "last.pt")  # AWP was on in epoch 2: the weights differ
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"] if k.endswith("conv1.weight"))


# ---- flags, defaults, saved configs without the method fields ---------------------------------------------


def test_defaults_per_method_and_norm():
    assert TrainConfig(method="trades").objective_options == {"beta": 6.0}
    assert TrainConfig(method="mart", method_options="beta=5").objective_options == {"beta": 5.0}
    assert TrainConfig.from_dict({"method": "mart", "beta": 5}).objective_options == {"beta": 5.0}  # TOML: beta = 5
    assert TrainConfig(method="trades").resolved_attack_bn == "eval" and TrainConfig().resolved_attack_bn == "train"
    assert TrainConfig(method="fast").resolved_co_guard and TrainConfig(method="nfgsm").resolved_co_guard
    assert not TrainConfig().resolved_co_guard and TrainConfig(co_guard=True).resolved_co_guard
    assert [TrainConfig(norm=n, method=m).resolved_clean_weight for n in ("bn", "sabn") for m in ("trades", "hybrid")] \
        == [0.0, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("saved_fields, weight, method", [
    ({"norm": "sabn", "method": "pgd"}, 0.0, "pgd"), ({"norm": "sabn", "method": "hybrid"}, 0.5, "hybrid"),
    ({"norm": "sabn", "method": None}, 0.5, "hybrid"), ({"norm": "bn", "method": None}, 0.0, "pgd"),
    ({"norm": "auxbn", "method": "fast"}, 0.5, "fast"), ({"norm": "bn", "method": "fast"}, 0.0, "fast"),
])
def test_saved_configs_without_the_method_fields_keep_the_loss_they_trained_with(saved_fields, weight, method):
    saved = {**TrainConfig().to_dict(), **saved_fields, "clean_weight": 0.5}
    for absent in ("method_options", "awp_gamma", "awp_warmup", "co_guard"):
        saved.pop(absent)
    config = TrainConfig.from_saved(saved)
    assert (config.resolved_clean_weight, config.resolved_method) == (weight, method)
    fresh = TrainConfig(norm="sabn", method="pgd").to_dict()
    assert upgrade_saved(fresh) is fresh  # a config of this version is read as written


@pytest.mark.parametrize("args, problem", [
    (["--beta", "-1"], "beta must be >= 0, got -1.0"),
    (["--awp-gamma", "1"], "awp-gamma must be in [0, 1), got 1.0"),
    (["--awp-gamma", "-0.1"], "awp-gamma must be in [0, 1)"),
    (["--awp-warmup", "-1"], "awp-warmup must be >= 0, got -1"),
    (["--clean-weight", "2"], "clean-weight must be in [0, 1], got 2.0"),
    (["--method", "madry"], "'madry' is not one of 'pgd', 'hybrid', 'trades', 'mart', 'fast', 'nfgsm'"),
])
def test_bad_method_values_are_one_line_errors_and_nothing_is_written(tmp_path, args, problem):
    assert_refused(tmp_path, ["train", "--dataset", "fashion-mnist", "--epochs", "1", *args, "--out", "run"], problem)
    assert list(tmp_path.iterdir()) == []


def test_the_flags_exist_with_their_names():
    result = CliRunner().invoke(cli, ["train", "--help"])
    for flag in ("--method", "--beta", "--awp-gamma", "--awp-warmup", "--clean-weight", "--co-guard / --no-co-guard"):
        assert flag in result.output, flag
    assert "pgd|hybrid|trades|mart|fast|nfgsm" in result.output.replace("\n", "").replace(" ", "")


# ---- packaging ------------------------------------------------------------------------------------------------


def test_the_package_claims_no_generic_top_level_names():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = meta["tool"]["setuptools"]
    # every package folder under robust/ ships in a wheel (an explicit list does not find subpackages itself)
    subpackages = {".".join(("robust", *p.parent.relative_to(ROOT / "robust").parts)) for p in (ROOT / "robust").rglob("__init__.py")}
    assert set(tool["packages"]) == {"robust", *subpackages, "robust.attacks", "robust.cli"}
    assert tool["package-dir"] == {"robust.attacks": "attacks", "robust.cli": "cli"}
    assert meta["project"]["scripts"] == {"robust": "robust.cli.main:main"}
    import robust.attacks
    import robust.cli.main

    assert Path(robust.attacks.__file__).parent.name == "attacks" and robust.cli.main.cli.name == "cli"


def test_every_registered_method_has_a_row_in_the_methods_page_and_its_help():
    page = (ROOT / "docs" / "methods.md").read_text()
    help_text = CliRunner().invoke(cli, ["train", "--help"]).output.replace("\n", " ")
    for name, cls in OBJECTIVES.items():
        assert f"| `{name}`" in page, name
        assert cls.summary and cls.attack_text, name  # the facts --help and compare's results.md print
        for alias in cls.aliases:
            assert f"| `{alias}`" in page, alias
    assert "hybrid (pgd with clean_weight 0.5)" in " ".join(help_text.split())


# ---- label smoothing and frozen statistics -------------------------------------------------------------
@pytest.mark.precision
@pytest.mark.parametrize("method", ["pgd", "trades", "mart", "fast", "nfgsm"])
def test_label_smoothing_is_torchs_in_every_cross_entropy_and_nowhere_else(method):
    adv, nat, y, s = torch.tensor(ADV), torch.tensor(NAT), torch.tensor(Y), 0.1
    smoothed = OBJECTIVES[method](EPS, EPS / 4, 2, label_smoothing=s).loss(adv, y, nat)
    plain = OBJECTIVES[method](EPS, EPS / 4, 2).loss(adv, y, nat)
    ce = F.cross_entropy
    if method == "trades":  # the natural CE is smoothed, the KL is not
        expected = plain - ce(nat, y) + ce(nat, y, label_smoothing=s)
    else:  # pgd, fast, nfgsm: CE on x_adv; mart: the CE part of its boosted CE
        expected = plain - ce(adv, y) + ce(adv, y, label_smoothing=s)
    torch.testing.assert_close(smoothed, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.precision
def test_the_clean_routes_term_is_smoothed_too():
    model = _model("sabn")
    x = torch.rand(6, 1, 28, 28)
    y = torch.arange(6) % 10
    x_adv = (x + 0.05).clamp(0, 1)
    settings = StepSettings.of("pgd", EPS, steps=1, clean_weight=0.4, fused=False)
    settings.objective.label_smoothing = 0.2
    loss, _ = step_loss(model, x, x_adv, y, settings)
    with use_route(model, "clean"):
        clean = F.cross_entropy(model(x), y, label_smoothing=0.2)
    with use_route(model, "adv"):
        adv = F.cross_entropy(model(x_adv), y, label_smoothing=0.2)
    torch.testing.assert_close(loss, 0.4 * clean + 0.6 * adv, rtol=1e-5, atol=1e-6)


def test_frozen_attack_statistics_stay_bit_identical_and_the_examples_are_train_modes():
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    made = {}
    for mode in ("train", "frozen"):
        model = _model("sabn")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(4)
        made[mode] = make_adversarial(model, x, y, StepSettings.of("pgd", EPS, steps=2, attack_bn=mode))
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        if mode == "frozen":
            assert changed == []  # running means, variances and batch counts as they were
        else:
            assert any("running_mean" in k for k in changed)  # train mode moves the adv route's statistics
        assert all(p.requires_grad for p in model.parameters())  # the attack's no-weight-gradient switch is undone
    assert torch.equal(made["train"], made["frozen"])  # the same batch-statistics forward, so the same examples


def test_label_smoothing_and_attack_bn_come_from_the_config():
    c = TrainConfig(method="trades", label_smoothing=0.1, attack_bn="frozen")
    s = StepSettings.from_config(c, None, torch.device("cpu"))
    assert s.objective.label_smoothing == 0.1 and s.attack_train_mode and s.attack_frozen
    for bad, message in [(1.0, r"label-smoothing must be in \[0, 1\), got 1.0"), (-0.1, "label-smoothing must be in")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(label_smoothing=bad).validate()
