"""Fixtures and hooks: the real Fashion-MNIST files and a small slice of them, CPU threads pinned,
the bf16 and gpu markers. Plain helpers shared by the tests are in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

from robust import runtime
from robust.data.load import load_dataset
from robust.data.types import ImageData

# Precision "auto" is bf16 on Intel AMX/AVX512-BF16 CPUs and fp32 on AVX2-only AMD CPUs. The suite
# must give the same verdicts on both kinds, so inside it (and in every process it starts, through
# the environment) "auto" means fp32 everywhere; tests that compare numbers also pin fp32 where
# they build a config, and the bf16 path has its own tests (marked bf16) with bf16 tolerances.
os.environ["ROBUST_CPU_BF16"] = "0"


def pytest_configure(config):
    config.addinivalue_line("markers", "bf16: needs native bf16 (a CPU with AMX/AVX512-BF16, or CUDA); skipped elsewhere")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "precision: compares floats to a tolerance (or bf16 to fp32); .ci/test reruns these on lower CPU kinds' kernels")


def pytest_collection_modifyitems(config, items):
    """bf16 tests run where bf16 is native (AMX/AVX512-BF16 CPU, or CUDA); gpu tests need CUDA."""
    native_bf16 = runtime.cpu_has_native_bf16() or torch.cuda.is_available()
    skip_bf16 = pytest.mark.skip(reason="needs native bf16 (a CPU with AMX/AVX512-BF16, or CUDA); "
                                        "emulated bf16 on this CPU would only be slow, not tested")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("bf16") and not native_bf16:
            item.add_marker(skip_bf16)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


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

