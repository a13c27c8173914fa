"""Weight averaging (--ema): the average equals a hand computation, carries both routes' statistics,
is what validation, best.pt selection, eval, export and load_model use, and resumes bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import robust
from helpers import tiny_config
from robust.checkpoint import load_checkpoint
from robust.cli.main import cli
from robust.data.types import ImageData
from robust.errors import ConfigError
from robust.nn.factory import build_model
from robust.train.ema import WeightAverage, ema_decay


@pytest.fixture(scope="module")
def data(fmnist) -> ImageData:
    return ImageData("fashion-mnist", fmnist.train_x[:96], fmnist.train_y[:96], fmnist.test_x[:16], fmnist.test_y[:16])


def _config(out, **kw):
    return tiny_config(out, **{"epochs": 2, "limit": 96, "schedule": "multistep", "ema": 0.9, "seed": 4, **kw})


def test_the_average_follows_the_warm_up_formula_over_three_updates():
    torch.manual_seed(0)
    model = build_model(norm="sabn", width=4, in_channels=1).double()
    ema = WeightAverage(model, tau=0.2)
    expected = {k: v.clone() for k, v in model.named_parameters()}
    for t in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.2, (1 + t) / (10 + t))  # 0.1, 2/11, then tau = 0.2 caps 3/12
        assert ema_decay(0.2, t) == d
        expected = {k: d * expected[k] + (1 - d) * p.detach() for k, p in model.named_parameters()}
        ema.update(model)
    for name, p in ema.average.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-12)
    assert ema.updates == 3


def test_the_average_carries_both_routes_running_statistics_averaged_and_counts_copied():
    torch.manual_seed(1)
    model = build_model(norm="sabn", width=4, in_channels=1).double().train()
    ema = WeightAverage(model, tau=0.99)
    before = {k: v.clone() for k, v in model.named_buffers()}
    for route in ("clean", "adv"):
        with robust.use_route(model, route):
            model(torch.rand(8, 1, 28, 28, dtype=torch.float64))
    ema.update(model)  # d = 0.1 at the first update
    live = dict(model.named_buffers())
    stats = [n for n in live if "running_mean" in n]
    assert any(".clean" in n for n in stats) and any(".adv" in n for n in stats)
    for name, b in ema.average.named_buffers():
        if b.is_floating_point():
            torch.testing.assert_close(b, 0.1 * before[name] + 0.9 * live[name], rtol=0, atol=1e-12)
        else:
            assert torch.equal(b, live[name]), name  # num_batches_tracked


def test_a_run_with_ema_validates_saves_and_evaluates_the_average_and_resumes_exactly(tmp_path, data):
    lines: list[str] = []
    robust.Trainer(_config(tmp_path / "a"), data=data, log=lines.append).fit()
    assert "EMA 0.9: validation, best.pt and the figures use the averaged weights" in lines[0]
    robust.Trainer(_config(tmp_path / "b", epochs=1), data=data, log=lambda m: None).fit()
    robust.Trainer(_config(tmp_path / "b"), data=data, resume=True, log=lambda m: None).fit()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 2 * 3  # 72 training images, batch 32: 3 steps an epoch
    for key in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
    assert any(not torch.equal(a["ema"]["model"][k], a["model"][k]) for k in a["model"] if k.endswith("weight"))

    averaged = robust.load_model(tmp_path / "a" / "last.pt")
    live = robust.load_model(tmp_path / "a" / "last.pt", weights="live")
    for key, value in averaged.state_dict().items():
        assert torch.equal(value, a["ema"]["model"][key]), key
        assert torch.equal(live.state_dict()[key], a["model"][key]), key

    x = data.test_x[:8].float() / 255
    with torch.no_grad(), robust.use_route(averaged, "adv"):
        expected = averaged(x)
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "a" / "last.pt"), "-o", str(tmp_path / "adv.pt")])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "adv.pt")["weights"] == "ema"
    with torch.no_grad():
        torch.testing.assert_close(robust.load_model(tmp_path / "adv.pt")(x), expected, rtol=0, atol=1e-5)


def test_ema_values_and_weights_are_checked(tmp_path, data):
    for tau in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"ema must be in \[0, 1\)"):
            _config(tmp_path / "x", ema=tau).validate()
    robust.Trainer(_config(tmp_path / "plain", ema=0.0, epochs=1), data=data, log=lambda m: None).fit()
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "plain"), "--weights", "ema", "--limit", "8"])
    assert result.exit_code == 2 and "has no averaged weights" in result.output



def test_each_route_is_averaged_with_itself_only():
    """The averaged clean route (its affine and running statistics) is the average of the live clean route
    alone: the routes' parameters and buffers are never mixed."""
    torch.manual_seed(2)
    model = build_model(norm="sabn", width=4, in_channels=1).double().train()
    with torch.no_grad():  # routes far apart, so a mix would show
        for name, p in model.named_parameters():
            if ".adv" in name:
                p.add_(10.0)
    ema = WeightAverage(model, tau=0.99)
    before = {**{k: v.clone() for k, v in model.named_parameters()}, **{k: v.clone() for k, v in model.named_buffers()}}
    with robust.use_route(model, "clean"):
        model(torch.rand(8, 1, 28, 28, dtype=torch.float64))
    with robust.use_route(model, "adv"):
        model(torch.rand(8, 1, 28, 28, dtype=torch.float64) * 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(1.0 if ".clean" in name else -1.0)
    ema.update(model)  # d = 0.1
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    averaged = {**dict(ema.average.named_parameters()), **dict(ema.average.named_buffers())}
    clean = [n for n in live if ".clean" in n and live[n].is_floating_point()]
    assert any("running_var" in n for n in clean) and any("route_weight" in n for n in clean)
    for name in clean:
        torch.testing.assert_close(averaged[name], 0.1 * before[name] + 0.9 * live[name].detach(), rtol=0, atol=1e-12)


def test_eval_says_which_weights_it_scored(tmp_path, data):
    robust.Trainer(_config(tmp_path / "a", epochs=1), data=data, log=lambda m: None).fit()
    run = str(tmp_path / "a")
    for flags, words, recorded in (([], "averaged weights (EMA)", "ema"), (["--weights", "live"], "live weights", "live")):
        out = tmp_path / f"{recorded}.json"
        result = CliRunner().invoke(cli, ["eval", run, "--attack", "pgd1", "--limit", "8", "--quiet", "--json", str(out), *flags])
        assert result.exit_code == 0, result.output
        assert f"(sabn, width 4, {words})" in result.output.splitlines()[0]
        assert json.loads(out.read_text())["weights"] == recorded
    result = CliRunner().invoke(cli, ["export", run, "-o", str(tmp_path / "adv.pt")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "adv.pt"), "--attack", "pgd1", "--limit", "8", "--quiet"])
    assert "averaged weights (EMA)" in result.output.splitlines()[0]
