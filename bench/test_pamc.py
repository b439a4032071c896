"""pytest-benchmark: PamC family (cases, baselines and floors: lossforge.benchmarks.pamc).

    pytest bench/test_pamc.py [--bench-device cuda] [--bench-full]
"""
from lossforge.bench import pytest_benchmark
from lossforge.benchmarks import pamc as CASES_MODULE  # noqa: F401  (read by bench/conftest.py)


def test_pamc(benchmark, bench_device, bench_case, impl):
    pytest_benchmark(benchmark, bench_case, impl, bench_device)
