"""pytest-benchmark: M-FAC family (see lossforge.benchmarks.mfac for the cases, baselines and floors)."""
import pytest

from lossforge.bench import pytest_benchmark
from lossforge.benchmarks import mfac

CASES = mfac.cases("cpu", full=False)
PARAMS = [pytest.param(i, impl, id=f"{c.op}|{c.shape}|{impl}") for i, c in enumerate(CASES) for impl in c.impls]


@pytest.mark.parametrize("case_index,impl", PARAMS)
def test_mfac(benchmark, bench_device, case_index, impl):
    case = mfac.cases(bench_device, full=False)[case_index]
    pytest_benchmark(benchmark, case, impl, bench_device)
