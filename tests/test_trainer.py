"""The training step's losses, checkpoints (round trip, atomic writes) and exact resume."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from robust.checkpoint import build_checkpoint, load_checkpoint, load_model, save_checkpoint
from robust.data.types import ImageData
from robust.errors import ConfigError
from robust.nn.factory import build_model
from robust.nn.norms import use_route
from robust.train.build import parameter_groups
from robust.train.step import StepSettings, step_loss
from robust.train.trainer import Trainer


def _settings(method: str, fused: bool = True, w: float = 0.5) -> StepSettings:
    return StepSettings.of(method, eps=0.1, alpha=0.025, steps=2, clean_weight=w, fused=fused)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 12, 12, generator=g)
    return x, (x + 0.05).clamp(0, 1), torch.randint(0, 10, (6,), generator=g)


def _model(norm: str):
    torch.manual_seed(0)
    return build_model(norm=norm, width=4, in_channels=1).train()


@pytest.mark.parametrize("norm", ["bn", "auxbn", "sabn"])
@pytest.mark.precision
def test_hybrid_loss_is_weighted_sum_of_route_losses(norm):
    x, x_adv, y = _batch()
    reference = _model(norm)
    with use_route(reference, "clean"):
        clean = F.cross_entropy(reference(x), y)
    with use_route(reference, "adv"):
        adv = F.cross_entropy(reference(x_adv), y)
    for fused in (True, False):
        loss, _ = step_loss(_model(norm), x, x_adv, y, _settings("hybrid", fused=fused, w=0.3))
        assert loss.item() == pytest.approx(0.3 * clean.item() + 0.7 * adv.item(), abs=1e-5)


@pytest.mark.precision
def test_pgd_and_fast_losses_with_and_without_the_clean_route():
    x, x_adv, y = _batch()
    reference = _model("sabn")
    with use_route(reference, "adv"):
        adv = F.cross_entropy(reference(x_adv), y).item()
    with use_route(reference, "clean"):
        clean = F.cross_entropy(reference(x), y).item()
    for method in ("pgd", "fast", "nfgsm"):  # clean-weight 0: the adversarial loss alone
        loss, _ = step_loss(_model("sabn"), x, x_adv, y, _settings(method, w=0.0))
        assert loss.item() == pytest.approx(adv, abs=1e-6)
        loss, _ = step_loss(_model("sabn"), x, x_adv, y, _settings(method, w=0.5))
        assert loss.item() == pytest.approx(0.5 * clean + 0.5 * adv, abs=1e-5)
    loss, _ = step_loss(_model("bn"), x, x_adv, y, _settings("fast", w=0.0))
    with use_route(_model("bn"), "adv") as bn:
        assert loss.item() == pytest.approx(F.cross_entropy(bn(x_adv), y).item(), abs=1e-6)


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    model = _model("sabn")
    model(torch.rand(8, 1, 12, 12))
    model.eval()
    path = save_checkpoint(build_checkpoint(model, dataset="fashion-mnist", eps=0.1, epoch=3), tmp_path / "m.pt")
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and state["model_args"]["norm"] == "sabn" and state["model_args"]["width"] == 4
    rebuilt = load_model(state)
    x = torch.rand(4, 1, 12, 12)
    for route in ("clean", "adv"):
        with use_route(model, route), use_route(rebuilt, route):
            assert torch.equal(model(x), rebuilt(x))


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = _model("bn")
    path = save_checkpoint(build_checkpoint(model, epoch=1), tmp_path / "last.pt")

    def crash(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(build_checkpoint(model, epoch=2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# two epochs of 256 images in batches of 64, two-step PGD, a 5-step warm-up, channels_last as by default
_config = partial(tiny_config, epochs=2, batch_size=64, limit=256, steps=2, val_limit=64, val_steps=2, warmup_steps=5,
                  seed=7, channels_last=True)


def _tiny_data(fmnist_small) -> ImageData:
    d = fmnist_small
    return ImageData(d.name, d.train_x[:1000], d.train_y[:1000], d.test_x[:100], d.test_y[:100])


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.bf16)])
def test_resume_gives_identical_weights(tmp_path, fmnist_small, precision):
    data = _tiny_data(fmnist_small)
    straight = Trainer(_config(tmp_path / "a", precision=precision), data=data, log=lambda m: None).fit()
    first = Trainer(_config(tmp_path / "b", epochs=1, precision=precision), data=data, log=lambda m: None).fit()
    assert first["epoch"] == 1
    resumed = Trainer(_config(tmp_path / "b", precision=precision), data=data, resume=True, log=lambda m: None).fit()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert resumed["val_adv_robust"] == straight["val_adv_robust"]
    lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert {"lr", "train_loss", "val_clean_clean", "val_clean_robust", "val_adv_clean", "val_adv_robust",
            "seconds", "images_per_s"} <= set(lines[0])
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["norm"] == "sabn" and saved["eps"] == "0.1"
    best = load_checkpoint(tmp_path / "b" / "best.pt")
    assert best["epoch"] + 1 == max(lines, key=lambda l: l["val_adv_robust"])["epoch"]


def test_existing_run_folder_is_never_overwritten(tmp_path, fmnist_small):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--resume.*--force"):
        Trainer(_config(out), data=_tiny_data(fmnist_small)).setup()
    with pytest.raises(ConfigError, match="cannot resume"):
        Trainer(_config(tmp_path / "new"), data=_tiny_data(fmnist_small), resume=True).setup()
    assert (out / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()


def test_the_trainer_takes_save_every_from_the_config(tmp_path, fmnist_small):
    data = _tiny_data(fmnist_small)
    assert Trainer(_config(tmp_path / "a", save_every=5.0), data=data).save_every_s == 5.0
    assert Trainer(_config(tmp_path / "b", save_every=0.0), data=data).save_every_s is None  # epoch ends only


def test_nesterov_and_no_decay_on_norms_reach_the_optimizer(tmp_path, fmnist_small):
    trainer = Trainer(_config(tmp_path / "r", nesterov=True, decay_norms=False, weight_decay=5e-4),
                      data=_tiny_data(fmnist_small)).setup()
    decayed, plain = trainer.optimizer.param_groups
    assert decayed["nesterov"] and decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(trainer.model.parameters()))
    (group,) = Trainer(_config(tmp_path / "s"), data=_tiny_data(fmnist_small)).setup().optimizer.param_groups
    assert not group["nesterov"] and group["weight_decay"] == 5e-4  # the reference's SGD: every parameter decays
    with pytest.raises(ConfigError, match="--nesterov needs a momentum above 0"):
        _config(tmp_path / "t", nesterov=True, momentum=0.0).validate()


def test_no_decay_on_norms_also_spares_what_a_timm_model_names_in_no_weight_decay():
    pytest.importorskip("timm")
    model = build_model("timm:vit_tiny_patch16_224", norm="sabn", num_classes=10, in_channels=1, image_size=32,
                        patch_size=8)
    decayed, plain = parameter_groups(model, 0.05, decay_norms=False)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in plain["params"] if p.dim() > 1) == ["net.cls_token", "net.pos_embed"]
    assert all(p.dim() > 1 for p in decayed["params"]) and decayed["weight_decay"] == 0.05
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_a_run_without_decay_on_norms_resumes_to_the_same_weights(tmp_path, fmnist_small):
    data = _tiny_data(fmnist_small)
    kw = dict(nesterov=True, decay_norms=False, schedule="multistep", warmup_steps=0)  # lr independent of epochs
    Trainer(_config(tmp_path / "a", **kw), data=data, log=lambda m: None).fit()
    Trainer(_config(tmp_path / "b", epochs=1, **kw), data=data, log=lambda m: None).fit()
    Trainer(_config(tmp_path / "b", **kw), data=data, resume=True, log=lambda m: None).fit()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key


def test_adamw_takes_lr_decay_and_beta1_from_the_config_and_resumes_to_the_same_weights(tmp_path, fmnist_small):
    data = _tiny_data(fmnist_small)
    kw = dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, momentum=0.8, decay_norms=False, schedule="multistep",
              warmup_steps=0)
    trainer = Trainer(_config(tmp_path / "a", **kw), data=data, log=lambda m: None)
    trainer.fit()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    decayed, plain = trainer.optimizer.param_groups
    assert decayed["betas"] == (0.8, 0.999) and decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    Trainer(_config(tmp_path / "b", epochs=1, **kw), data=data, log=lambda m: None).fit()
    Trainer(_config(tmp_path / "b", **kw), data=data, resume=True, log=lambda m: None).fit()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    with pytest.raises(ConfigError, match="--nesterov is SGD's momentum"):
        _config(tmp_path / "c", optimizer="adamw", nesterov=True).validate()
