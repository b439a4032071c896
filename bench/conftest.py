"""pytest-benchmark suites (`pytest bench/`): one group per (op, shape), `impl` parametrized over
lossforge and each baseline. The cases are those of `lossforge bench`: each bench/test_<family>.py
names its module (CASES_MODULE = lossforge.benchmarks.<family>) and takes the `bench_case` and `impl`
parameters generated here for `--bench-device` (cpu or cuda) and `--bench-full` (the papers' sizes)."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cpu", help="cpu or cuda")
    parser.addoption("--bench-full", action="store_true", help="the papers' sizes")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    device = metafunc.config.getoption("--bench-device")
    cases = []
    if not device.startswith("cuda") or torch.cuda.is_available():
        cases = metafunc.module.CASES_MODULE.cases(device, metafunc.config.getoption("--bench-full"))
    params = [pytest.param(case, impl, id=f"{case.op}|{case.shape}|{impl}") for case in cases for impl in case.impls]
    metafunc.parametrize("bench_case,impl", params)


@pytest.fixture(scope="session")
def bench_device(request):
    return request.config.getoption("--bench-device")
