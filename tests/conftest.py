"""Shared fixtures: small slices of the real Fashion-MNIST files, CPU threads pinned."""

from __future__ import annotations

import pytest
import torch

from robust.data import ImageData, load_dataset


@pytest.fixture(scope="session", autouse=True)
def _deterministic_cpu():
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(1)  # tiny models: threads cost more than they give, and stay stable under load


@pytest.fixture(scope="session")
def fmnist() -> ImageData:
    """The real Fashion-MNIST (Debian's dataset-fashion-mnist package)."""
    return load_dataset("fashion-mnist", download=False)


@pytest.fixture(scope="session")
def fmnist_small(fmnist) -> ImageData:
    """4,000 training and 1,000 test images of the real data: enough to learn, fast to train."""
    return ImageData("fashion-mnist", fmnist.train_x[:4000], fmnist.train_y[:4000], fmnist.test_x[:1000], fmnist.test_y[:1000])
