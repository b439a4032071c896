"""pytest-benchmark: M-FAC family (cases, baselines and floors: lossforge.benchmarks.mfac).

    pytest bench/test_mfac.py [--bench-device cuda] [--bench-full]
"""
from lossforge.bench import pytest_benchmark
from lossforge.benchmarks import mfac as CASES_MODULE  # noqa: F401  (read by bench/conftest.py)


def test_mfac(benchmark, bench_device, bench_case, impl):
    pytest_benchmark(benchmark, bench_case, impl, bench_device)
