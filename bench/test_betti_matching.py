"""pytest-benchmark: Betti matching family (see lossforge.benchmarks.betti_matching for the cases)."""
import pytest

from lossforge.bench import pytest_benchmark
from lossforge.benchmarks import betti_matching

CASES = betti_matching.cases("cpu", full=False)
PARAMS = [pytest.param(i, impl, id=f"{c.op}|{c.shape}|{impl}") for i, c in enumerate(CASES) for impl in c.impls]


@pytest.mark.parametrize("case_index,impl", PARAMS)
def test_betti_matching(benchmark, bench_device, case_index, impl):
    case = betti_matching.cases(bench_device, full=False)[case_index]
    pytest_benchmark(benchmark, case, impl, bench_device)
