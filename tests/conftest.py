"""Fixtures and hooks: the real Fashion-MNIST files and a small slice of them, CPU threads pinned,
the bf16 and gpu markers. Plain helpers shared by the tests are in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

import robust
from robust import runtime
from robust.data.load import load_dataset
from robust.data.loader import to_float
from robust.data.types import ImageData
from robust.train.step import StepSettings, train_step

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


# The "something to compare" checks of tests/test_eval_fast_exact.py (some examples robust, some broken) hold
# over the spread of this training with torch.manual_seed(s), s = 0-4, each with native kernels and with
# ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (ONEDNN_MAX_CPU_ISA=AVX512_CORE gave the native figures), on
# an Intel Xeon with AVX512-BF16 without AMX, 2026-12-07; the figures measured are beside each check. Rule: the
# least robust and the least broken count measured stay above 0 by at least 10 points of accuracy. The fixture
# keeps seed 0.
@pytest.fixture(scope="module")
def fgsm_model(fmnist):
    """A width-4 SaBN model trained briefly with FGSM-RS (eps 0.1) on real images, its adv route exported: well
    above chance, robust on some images and not on others, so attacks have something to compare and PGD's
    iterates settle. Module-scoped: each test module gets its own copy."""
    torch.manual_seed(0)
    net = robust.build_model(norm="sabn", num_classes=10, in_channels=1, width=4, mean=fmnist.mean, std=fmnist.std)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    settings = StepSettings.of("fast", 0.1, clean_weight=0.5, attack_bn="eval")
    for _ in range(60):
        idx = torch.randint(0, 2000, (32,))
        train_step(net, opt, None, to_float(fmnist.train_x[idx]), fmnist.train_y[idx], settings)
    return robust.export_route(net, "adv").eval()
