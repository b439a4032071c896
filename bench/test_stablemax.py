"""pytest-benchmark: StableMax family (cases, baselines and floors: lossforge.benchmarks.stablemax).

    pytest bench/test_stablemax.py [--bench-device cuda] [--bench-full]
"""
from lossforge.bench import pytest_benchmark
from lossforge.benchmarks import stablemax as CASES_MODULE  # noqa: F401  (read by bench/conftest.py)


def test_stablemax(benchmark, bench_device, bench_case, impl):
    pytest_benchmark(benchmark, bench_case, impl, bench_device)
