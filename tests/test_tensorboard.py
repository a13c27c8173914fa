"""--tensorboard DIR: every epoch's metrics as scalars, read back from the event files; a resumed
run appends without repeating an epoch; a bad folder is refused before anything is written."""

from __future__ import annotations

import json

import pytest

from helpers import assert_refused, snapshot, tiny_config
from robust.data.types import ImageData
from robust.train.trainer import Trainer

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.fixture(scope="module")
def data(fmnist) -> ImageData:
    return ImageData("fashion-mnist", fmnist.train_x[:96], fmnist.train_y[:96], fmnist.test_x[:8], fmnist.test_y[:8])


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_epoch_line_becomes_scalars_and_a_resume_appends(tmp_path, data):
    tb = tmp_path / "tb"
    config = dict(epochs=1, limit=96, schedule="multistep", tensorboard=str(tb))
    Trainer(tiny_config(tmp_path / "run", **config), data=data, log=lambda m: None).fit()
    Trainer(tiny_config(tmp_path / "run", **{**config, "epochs": 2}), data=data, resume=True, log=lambda m: None).fit()
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(tb)
    for name in ("lr", "train_loss", "train_adv_acc", "val_adv_robust", "val_clean_clean", "seconds", "images_per_s"):
        assert [step for step, _ in scalars[name]] == [1, 2], name  # each epoch once, in order
        assert [value for _, value in scalars[name]] == pytest.approx([l[name] for l in lines], rel=1e-6), name


def test_a_tensorboard_path_through_a_file_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    before = snapshot(tmp_path)
    assert_refused(tmp_path, ["train", "--dataset", "fashion-mnist", "--epochs", "1", "--tensorboard", "file/tb",
                              "--out", "run"], "--tensorboard")
    assert snapshot(tmp_path) == before
