"""An attack added the way a user adds one: a builder decorated with ``@ATTACKS.register``, here in the
test file, and nothing else touched. It is parsed, checked, listed, evaluated by ``robust eval`` and by
``robust.evaluate``, and its settings reach the JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import invoke_in, tiny_config

import robust
from robust.attacks.pgd import fp32_predictions
from robust.attacks.registry import (
    ATTACKS,
    AttackSettings,
    attack_params,
    available_attacks,
    build_attack,
    parse_attack_name,
)
from robust.data.loader import to_float
from robust.errors import ConfigError
from robust.eval.plan import check_attack_names
from robust.nn.norms import routes_for, use_route

EPS = 0.2  # twice the run's training eps: uniform noise breaks some of its examples there
IMAGES = 64
NOISE_PARAMS = {"patterns": 4, "distribution": "uniform", "generator_seed": 0}


def noise_params(s: AttackSettings) -> dict:
    return {"patterns": s.steps, "distribution": "uniform", "generator_seed": s.seed}


def noise(model, s: AttackSettings):
    """The first of N uniform noise patterns in the ball that fools the model, per example (a test-only
    attack). The patterns come from a generator seeded with the attack's seed and are the same for every
    image, so an image's outcome does not depend on the batch it is attacked in."""

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(s.seed)
        patterns = (torch.rand((s.steps, *x.shape[1:]), generator=g) * 2 - 1).to(x.device)
        x_adv, alive = x.detach().clone(), torch.ones(len(y), dtype=torch.bool, device=x.device)
        for pattern in patterns:
            candidate = (x + s.eps * pattern).clamp(0, 1)
            fooled = alive & (fp32_predictions(model, candidate) != y)
            x_adv[fooled], alive = candidate[fooled], alive & ~fooled
        return x_adv

    return run


@pytest.fixture()
def registered():
    ATTACKS.register("noise", summary="the first of N uniform noise patterns that fools", stepped=True,
                     params=noise_params)(noise)
    yield ATTACKS.get("noise")
    ATTACKS.remove("noise")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained run folder: one epoch of 1,000 images, a dual-route SaBN model (about 35% clean)."""
    out = tmp_path_factory.mktemp("new-attack") / "run"
    robust.Trainer(tiny_config(out, limit=1000, lr=0.1), log=lambda m: None).fit()
    return out


def by_hand(model, x, y, name: str) -> dict[str, tuple[float, float]]:
    """Clean and robust accuracy (%) per route, the attack built and called directly on one batch of the
    examples the route classifies right (what evaluation attacks: the others count as broken)."""
    figures = {}
    model.eval()
    for route in routes_for(model, None):
        with use_route(model, route), torch.no_grad():
            right = model(x).argmax(1) == y
        with use_route(model, route):
            x_adv = build_attack(name, model, EPS, seed=0)(x[right], y[right])
        with use_route(model, route), torch.no_grad():
            kept = model(x_adv).argmax(1) == y[right]
        figures[route] = (100.0 * right.float().mean().item(), 100.0 * kept.sum().item() / len(y))
    return figures


def test_the_registry_gives_the_new_attack_its_facts(registered):
    assert registered.build is noise and registered.pattern == "noiseN" and registered.source == noise.__module__
    assert parse_attack_name(" NOISE4 ") == ("noise", 4) and available_attacks()[-1] == "noiseN"
    assert check_attack_names("pgd20,noise4") == ["pgd20", "noise4"]
    assert attack_params("noise4", EPS) == {"threat": "linf", "eps": EPS, "source": noise.__module__,
                                            **NOISE_PARAMS}
    assert build_attack("noise4", torch.nn.Flatten(), EPS).params == attack_params("noise4", EPS)
    with pytest.raises(ValueError, match="at least 1 step"):
        parse_attack_name("noise0")
    with pytest.raises(ConfigError, match=r"valid attacks: .*noiseN"):
        check_attack_names("noise")


def test_the_new_attack_is_evaluated_by_robust_evaluate_and_robust_eval(run_dir, fmnist, tmp_path, registered):
    x, y = fmnist.test_x[:IMAGES], fmnist.test_y[:IMAGES]
    model = robust.load_model(run_dir)
    result = robust.evaluate(model, (x, y), attacks=["noise4", "fgsm"], eps=EPS, batch_size=IMAGES,
                             attack_precision="fp32")
    assert result["attacks"]["noise4"] == {"threat": "linf", "eps": EPS, "source": noise.__module__,
                                           **NOISE_PARAMS}
    hand = by_hand(model, to_float(x), y, "noise4")
    assert set(result["routes"]) == set(hand) == {"clean", "adv"}
    for route, (clean, robust_acc) in hand.items():  # the same patterns, however the images are chunked
        acc = result["routes"][route]
        assert acc["clean"] == pytest.approx(clean) and acc["noise4"] == pytest.approx(robust_acc)
        assert acc["worst_case"] <= min(acc["noise4"], acc["fgsm"]) and acc["noise4"] <= acc["clean"]

    out = tmp_path / "eval.json"
    done = invoke_in(tmp_path, ["eval", run_dir, "--attack", "noise4,fgsm", "--limit", IMAGES, "--batch-size", IMAGES,
                                "--eps", EPS, "--attack-precision", "fp32", "--json", out, "--quiet"])
    assert done.exit_code == 0, done.output
    written = json.loads(out.read_text())
    assert written["attacks"]["noise4"] == result["attacks"]["noise4"]
    assert written["routes"] == result["routes"]  # the same images, model and seed as robust.evaluate's
    assert "noise4" in done.output


def test_the_registration_is_gone_afterwards():
    assert "noise" not in ATTACKS and "noiseN" not in available_attacks()
    with pytest.raises(ValueError, match="unknown attack 'noise4'"):
        parse_attack_name("noise4")


def test_the_docs_table_lists_every_attack_of_the_package():
    """docs/evaluation.md's --attack table names every registered attack as users write it (pgdN)."""
    text = (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text()
    table = text.split("## Attacks (`--attack`, comma-separated)", 1)[1].split("\n\n", 2)[1]
    listed = set(re.findall(r"`([a-z0-9-]+N?)`", table))
    assert {spec.pattern for spec in ATTACKS} <= listed
