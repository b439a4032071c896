"""pytest-benchmark: PamC family (see lossforge.benchmarks.pamc for the cases and floors): forward +
backward of pamc_loss against the authors' sparse recipe, the dense n×n pairwise loss and the tiled
pairwise loss; and of the tiled pairwise loss against the dense one. One group per op and shape.

    PYTHONPATH=$PWD/python python -m pytest bench/test_pamc.py [--bench-device cuda] [--bench-full]
"""
import pytest

from lossforge.bench import pytest_benchmark
from lossforge.benchmarks import pamc

CASES = pamc.cases("cpu", full=False)
PARAMS = [pytest.param(i, impl, id=f"{c.op}|{c.shape}|{impl}") for i, c in enumerate(CASES) for impl in c.impls]


@pytest.mark.parametrize("case_index,impl", PARAMS)
def test_pamc(benchmark, bench_device, request, case_index, impl):
    cases = pamc.cases(bench_device, full=request.config.getoption("--bench-full"))
    if case_index >= len(cases) or impl not in cases[case_index].impls:
        pytest.skip("no such case on this device")
    pytest_benchmark(benchmark, cases[case_index], impl, bench_device)
