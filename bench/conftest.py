"""pytest-benchmark suites (`pytest bench/`): one group per shape, `impl` parametrized over lossforge
and each baseline. The cases are the same as `lossforge bench` (lossforge.benchmarks.<family>)."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cpu", help="cpu or cuda")
    parser.addoption("--bench-full", action="store_true", help="the papers' sizes")


@pytest.fixture(scope="session")
def bench_device(request):
    device = request.config.getoption("--bench-device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return device
