"""robust export -o FILE.safetensors: the weights as tensors, the model's description as JSON metadata,
no pickle; robust eval and robust.load_model read it back to the same model."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import robust
from helpers import tiny_config
from robust.checkpoint import load_checkpoint
from robust.cli.main import cli
from robust.data.types import ImageData


@pytest.fixture(scope="module")
def data(fmnist) -> ImageData:
    return ImageData("fashion-mnist", fmnist.train_x[:96], fmnist.train_y[:96], fmnist.test_x[:16], fmnist.test_y[:16])


def _config(out, **kw):
    return tiny_config(out, **{"epochs": 1, "limit": 96, "ema": 0.9, "seed": 4, **kw})


def test_an_export_to_safetensors_holds_no_pickle_and_gives_the_same_logits(tmp_path, data):
    robust.Trainer(_config(tmp_path / "run", epochs=1), data=data, log=lambda m: None).fit()
    out = tmp_path / "adv.safetensors"
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    raw = out.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and b'"robust"' in raw[8:8 + header]  # a JSON header, then raw tensors
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:16]  # neither torch's zip nor a pickle
    pt = tmp_path / "adv.pt"
    assert CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "-o", str(pt)]).exit_code == 0
    x = data.test_x[:8].float() / 255
    a, b = robust.load_model(out), robust.load_model(pt)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert load_checkpoint(out)["route"] == "adv" and load_checkpoint(out)["weights"] == "ema"
    evaluated = CliRunner().invoke(cli, ["eval", str(out), "--attack", "fgsm", "--limit", "8"])
    assert evaluated.exit_code == 0 and "adv" in evaluated.output
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    refused = CliRunner().invoke(cli, ["eval", str(tmp_path / "bad.safetensors")])
    assert refused.exit_code == 2 and "not a safetensors file of robust" in refused.output
