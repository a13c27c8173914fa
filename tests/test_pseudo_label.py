"""robust pseudo-label: a standard model's labels of unlabelled images, written as an --extra-data file
that says what it holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_refused, invoke_in, tiny_config

from robust.checkpoint import load_model
from robust.data.extra import load_extra_data
from robust.data.loader import to_float
from robust.pseudo_label import select_confident, teacher_probabilities, write_extra_file
from robust.train.trainer import Trainer

PROBS = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.95, 0.05], [0.45, 0.55], [0.7, 0.3]])


def test_selection_by_confidence_per_class_and_balance():
    assert select_confident(PROBS).tolist() == [0, 1, 2, 3, 4, 5]
    assert select_confident(PROBS, min_confidence=0.7).tolist() == [0, 2, 3, 5]
    assert select_confident(PROBS, per_class=2).tolist() == [0, 2, 3, 4]  # class 0: 0.95 and 0.9; class 1: both
    assert select_confident(PROBS, balanced=True).tolist() == [0, 2, 3, 4]  # 2 per class, the most confident
    assert select_confident(PROBS, min_confidence=0.6, balanced=True).tolist() == [2, 3]  # class 1 has one left


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, fmnist) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    Trainer(tiny_config(out, method="standard", norm="bn", epochs=2, limit=128), data=fmnist, log=lambda m: None).fit()
    return out


def test_the_file_holds_the_images_and_the_teachers_labels(tmp_path, fmnist, teacher):
    result = invoke_in(tmp_path, ["pseudo-label", "--model", teacher, "--unlabelled", "fashion-mnist[100:164]",
                                  "-o", "extra.npz", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "extra.npz")
    assert saved["index"].tolist() == list(range(64))
    assert np.array_equal(saved["x"], fmnist.train_x[100:164].numpy())
    model = load_model(teacher)
    with torch.no_grad():
        probs = torch.softmax(model(to_float(fmnist.train_x[100:164])), 1)
    assert saved["y"].tolist() == probs.argmax(1).tolist()
    assert np.allclose(saved["confidence"], probs.max(1).values.numpy(), atol=1e-5)
    agree = 100 * (probs.argmax(1) == fmnist.train_y[100:164]).float().mean().item()
    assert "wrote extra.npz: 64 of 64 images, hard labels" in result.output
    assert f"{agree:.1f}% agree with the true labels" in result.output
    extra = load_extra_data(tmp_path / "extra.npz", (1, 28, 28), 10)
    assert torch.equal(extra.y, probs.argmax(1)) and len(extra) == 64


def test_soft_labels_and_a_confident_subset(tmp_path, fmnist, teacher):
    model = load_model(teacher)
    probs = teacher_probabilities(model, fmnist.train_x[:40], batch_size=16)
    keep = select_confident(probs, min_confidence=float(probs.max(1).values.median()))
    write_extra_file(tmp_path / "soft.npz", fmnist.train_x[:40], probs, keep, soft=True)
    extra = load_extra_data(tmp_path / "soft.npz", (1, 28, 28), 10)
    assert extra.soft and len(extra) == len(keep) >= 20
    assert torch.allclose(extra.y, probs[keep], atol=1e-6)


def test_a_teacher_is_trained_when_none_is_given(tmp_path):
    result = invoke_in(tmp_path, ["pseudo-label", "--teacher-epochs", "1", "--limit", "64", "--teacher-width", "4",
                                  "--precision", "fp32", "--unlabelled", "fashion-mnist[64:96]", "-o", "e.npz", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e-teacher" / "best.pt").is_file() or (tmp_path / "e-teacher" / "last.pt").is_file()
    assert len(np.load(tmp_path / "e.npz")["y"]) == 32


def test_bad_pseudo_label_input_is_refused(tmp_path, teacher):
    base = ["pseudo-label", "--unlabelled", "fashion-mnist[0:10]"]
    assert_refused(tmp_path, [*base, "-o", "e.npz"], "--model RUN", "--teacher-epochs N")
    assert_refused(tmp_path, [*base, "-o", "e.npz", "--model", teacher, "--teacher-epochs", "1"], "not both")
    assert_refused(tmp_path, [*base, "-o", "e.txt", "--model", teacher], "must end in .npz")
    np.savez(tmp_path / "rgb.npz", x=np.zeros((4, 3, 28, 28), np.uint8))
    assert_refused(tmp_path, ["pseudo-label", "--unlabelled", "rgb.npz", "-o", "e.npz", "--model", teacher],
                   "3x28x28", "1x28x28")
    assert_refused(tmp_path, ["pseudo-label", "--unlabelled", "fashion-mnist[10:5]", "-o", "e.npz", "--model", teacher],
                   "START < END")
    assert_refused(tmp_path, ["pseudo-label", "--unlabelled", "nowhere", "-o", "e.npz", "--model", teacher],
                   "NAME[START:END]")
    assert_refused(tmp_path, [*base, "-o", "rgb.npz", "--model", teacher], "already exists")
    assert_refused(tmp_path, [*base, "-o", "e.npz", "--model", teacher, "--min-confidence", "1.5"], "min-confidence")
