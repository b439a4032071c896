"""pytest-benchmark: sliced Wasserstein family (see lossforge.benchmarks.sliced_wasserstein for the cases,
baselines and floors). One group per (op, shape); `impl` runs over lossforge and each baseline.
`--bench-device cuda` and `--bench-full` select the issue's sizes (B=32, N=2048, L in {100, 1000})."""
from lossforge.bench import pytest_benchmark
from lossforge.benchmarks import sliced_wasserstein


def _cases(config):
    return sliced_wasserstein.cases(config.getoption("--bench-device"), full=config.getoption("--bench-full"))


def pytest_generate_tests(metafunc):
    if "case_index" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        params = [(i, impl) for i, c in enumerate(cases) for impl in c.impls]
        ids = [f"{cases[i].op}|{cases[i].shape}|{impl}" for i, impl in params]
        metafunc.parametrize("case_index,impl", params, ids=ids)


def test_sliced_wasserstein(benchmark, bench_device, request, case_index, impl):
    case = _cases(request.config)[case_index]
    pytest_benchmark(benchmark, case, impl, bench_device)
