"""pytest-benchmark: Betti matching family (cases, baselines and floors: lossforge.benchmarks.betti_matching).

    pytest bench/test_betti_matching.py [--bench-device cuda] [--bench-full]
"""
from lossforge.bench import pytest_benchmark
from lossforge.benchmarks import betti_matching as CASES_MODULE  # noqa: F401  (read by bench/conftest.py)


def test_betti_matching(benchmark, bench_device, bench_case, impl):
    pytest_benchmark(benchmark, bench_case, impl, bench_device)
