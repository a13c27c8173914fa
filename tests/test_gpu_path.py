"""The GPU path's refusals, checked on the CPU: more processes than GPUs is one line, not a crash in set_device."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from robust.cli.main import cli
from robust.errors import ConfigError
from robust.train import distributed


@pytest.fixture()
def one_gpu(monkeypatch):
    """This machine as one with a single CUDA GPU (nothing here touches the GPU itself)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_nproc_beyond_the_gpus_is_refused_before_anything_starts(tmp_path, one_gpu, monkeypatch):
    started = []
    monkeypatch.setattr("robust.cli.train.launch", lambda *a, **k: started.append(a) or 0)
    result = CliRunner().invoke(cli, ["train", "--dataset", "fashion-mnist", "--nproc", "2", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "2 processes on this machine need 2 CUDA GPUs, but it has 1; use --nproc 1, or --device cpu" in result.output
    assert started == [] and not (tmp_path / "r").exists()


def test_a_rank_whose_local_rank_has_no_gpu_is_refused(one_gpu):
    with pytest.raises(ConfigError, match="3 processes on this machine need 3 CUDA GPUs, but it has 1"):
        distributed.check_gpu_count(3)
    distributed.check_gpu_count(1)  # one process per GPU is fine
