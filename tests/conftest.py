"""Shared fixtures: small slices of the real Fashion-MNIST files, CPU threads pinned."""

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


def pytest_configure(config):
    config.addinivalue_line("markers", "bf16: needs native bf16 (a CPU with AMX/AVX512-BF16, or CUDA); skipped elsewhere")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")



def invoke_in(folder, args: list[str]):
    """Run the CLI (click's test runner) with ``folder`` as the working directory, so relative
    paths in ``args`` resolve there; the old working directory is restored afterwards."""
    from click.testing import CliRunner

    from robust.cli.main import cli

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(cli, args)
    finally:
        os.chdir(cwd)


def snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` with its sha256 (folders as "dir"): to show nothing was written."""
    import hashlib
    from pathlib import Path

    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def assert_refused(folder, args: list[str], *expected: str, one_line: bool = False) -> str:
    """Run the CLI in ``folder``; assert the bad-input contract (exit 2, one error line naming each of
    ``expected``, no traceback, nothing written or overwritten); return the error line.
    ``one_line``: the whole output is that line (no usage text either)."""
    before = snapshot(folder)
    result = invoke_in(folder, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1, result.output
    for text in expected:
        assert text in errors[0], errors[0]
    if one_line:
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert snapshot(folder) == before  # nothing written or overwritten
    return errors[0]
