"""A method added the way a user adds one: a subclass of Objective with its own option, registered
here, and nothing else touched. It trains, saves, resumes and evaluates through the ordinary paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import robust
from robust.attacks import fgsm_rs
from robust.checkpoint import load_checkpoint
from robust.config import TrainConfig
from robust.data.types import ImageData
from robust.errors import ConfigError
from robust.objectives import ALIASES, OBJECTIVES, Objective, Option, method_names, register
from robust.train.step import StepSettings


class SmoothedFGSM(Objective):
    """FGSM-RS examples, CE with label smoothing ``smoothing`` (a test-only method)."""

    name = "smoothed-fgsm"
    one_step = True
    attack_bn = "eval"
    attack_text = "FGSM with a uniform random start"
    options = {"smoothing": Option(0.1, "label smoothing of the CE", min=0, max=1)}
    aliases = {"smoothed-hybrid": {"clean_weight": 0.5}}

    def examples(self, model, x, y):
        return fgsm_rs(model, x, y, self.eps)

    def loss(self, adv_logits, y, natural_logits=None):
        return F.cross_entropy(adv_logits.float(), y, label_smoothing=self.smoothing)


@pytest.fixture()
def registered():
    register(SmoothedFGSM)
    yield SmoothedFGSM
    OBJECTIVES.pop(SmoothedFGSM.name)
    for alias in SmoothedFGSM.aliases:
        ALIASES.pop(alias)


@pytest.fixture(scope="module")
def data(fmnist) -> ImageData:
    return ImageData("fashion-mnist", fmnist.train_x[:64], fmnist.train_y[:64], fmnist.test_x[:16], fmnist.test_y[:16])


def _config(out, **kw) -> TrainConfig:
    base = dict(dataset="fashion-mnist", width=4, epochs=2, batch_size=32, limit=64, steps=1, eps="0.1", val_split=0.25,
                val_steps=1, lr=0.05, warmup_steps=0, schedule="multistep", seed=2, channels_last=False, quiet=True,
                out=str(out), precision="fp32", method="smoothed-fgsm", method_options="smoothing=0.2")  # multistep:
    # the lr does not depend on the epochs, so a 1-epoch run resumed to 2 must end where a 2-epoch run does
    base.update(kw)
    return TrainConfig(**base)


def test_the_registry_gives_the_new_method_its_facts(registered):
    assert method_names()[-2:] == ("smoothed-fgsm", "smoothed-hybrid")
    c = _config("unused")
    assert c.objective is registered and c.objective_options == {"smoothing": 0.2}
    assert c.resolved_co_guard and c.resolved_attack_bn == "eval" and c.resolved_clean_weight == 0.5  # sabn
    assert TrainConfig(norm="bn", method="smoothed-hybrid").resolved_clean_weight == 0.5
    assert TrainConfig(norm="bn", method="smoothed-fgsm").objective_options == {"smoothing": 0.1}
    with pytest.raises(ConfigError, match=r"smoothing must be in \[0, 1\], got 2.0"):
        _config("unused", method_options="smoothing=2").validate()
    with pytest.raises(ConfigError, match="method smoothed-fgsm has no option beta; its options: smoothing"):
        _config("unused", method_options="beta=6").validate()
    settings = StepSettings.from_config(c, None, torch.device("cpu"))
    assert settings.objective.smoothing == 0.2 and not settings.attack_train_mode


def test_the_new_method_trains_saves_resumes_and_evaluates(tmp_path, data, registered):
    straight = robust.Trainer(_config(tmp_path / "a"), data=data, log=lambda m: None).fit()
    robust.Trainer(_config(tmp_path / "b", epochs=1), data=data, log=lambda m: None).fit()
    resumed = robust.Trainer(_config(tmp_path / "b"), data=data, resume=True, log=lambda m: None).fit()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["method"] == "smoothed-fgsm" and a["config"]["method_options"] == "smoothing=0.2"
    for key, tensor in a["model"].items():  # exact resume: the same weights as an uninterrupted run
        assert torch.equal(tensor, b["model"][key]), key
    assert straight["train_loss"] == resumed["train_loss"]
    model = robust.load_model(tmp_path / "a", route="adv")
    result = robust.evaluate(model, (data.test_x, data.test_y), attacks=["fgsm"], eps=0.1)
    acc = result["routes"]["adv"]
    assert 0 <= acc["fgsm"] <= acc["clean"] <= 100 and acc["worst_case"] == acc["fgsm"]
