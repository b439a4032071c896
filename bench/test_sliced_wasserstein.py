"""pytest-benchmark: sliced Wasserstein family (cases, baselines and floors: lossforge.benchmarks.sliced_wasserstein).

    pytest bench/test_sliced_wasserstein.py [--bench-device cuda] [--bench-full]
"""
from lossforge.bench import pytest_benchmark
from lossforge.benchmarks import sliced_wasserstein as CASES_MODULE  # noqa: F401  (read by bench/conftest.py)


def test_sliced_wasserstein(benchmark, bench_device, bench_case, impl):
    pytest_benchmark(benchmark, bench_case, impl, bench_device)
