"""pytest-benchmark suite for PamC: forward + backward (gradient w.r.t. z), one group per op and shape,
`impl` over lossforge and each baseline (the same implementations as `lossforge bench`).

    PYTHONPATH=$PWD/python python -m pytest bench/test_pamc.py --benchmark-only
    LOSSFORGE_BENCH_FULL=1 ...   # adds n = 20000 (the dense n×n baseline then needs ~14 GB)
"""
import functools
import os

import pytest
import torch

from lossforge.benchmarks import pamc as cases

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("LOSSFORGE_BENCH_DEVICE", "cpu") == "cuda" else "cpu"
SIZES = [(5000, 64, 10)]
if os.environ.get("LOSSFORGE_BENCH_FULL"):
    SIZES += [(5000, 128, 100), (20_000, 64, 10)]

PAMC_IMPLS = {
    "lossforge": cases._pamc,
    "authors-pamc": cases._pamc_authors,
    "tiled-pairwise": cases._pairwise_tiled,
    "dense-pairwise": cases._pairwise_dense,
}
PAIRWISE_IMPLS = {"lossforge": cases._pairwise_tiled, "dense-pairwise": cases._pairwise_dense}


@functools.lru_cache(maxsize=1)
def _inputs(n, d, k):
    return cases._inputs(n, d, k, 10.0, DEVICE, dense=cases._dense_fits(n, DEVICE))


def _run(benchmark, loss_fn, inputs):
    step = cases._fwd_bwd(loss_fn)

    def call():
        out = step(*inputs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(call, rounds=3, warmup_rounds=1, iterations=1)


def _ids(size):
    n, d, k = size
    return f"n{n}-d{d}-k{k}"


@pytest.mark.parametrize("impl", list(PAMC_IMPLS))
@pytest.mark.parametrize("size", SIZES, ids=_ids)
def test_pamc_loss(benchmark, size, impl):
    inputs = _inputs(*size)
    if impl == "dense-pairwise" and inputs[-1] is None:
        pytest.skip("not enough free memory for the dense n×n baseline")
    benchmark.group = f"pamc_loss fwd+bwd {_ids(size)}"
    _run(benchmark, PAMC_IMPLS[impl], inputs)


@pytest.mark.parametrize("impl", list(PAIRWISE_IMPLS))
@pytest.mark.parametrize("size", [s for s in SIZES if s[1] == 64], ids=_ids)
def test_pairwise_contrastive_loss(benchmark, size, impl):
    inputs = _inputs(*size)
    if impl == "dense-pairwise" and inputs[-1] is None:
        pytest.skip("not enough free memory for the dense n×n baseline")
    benchmark.group = f"pairwise_contrastive_loss fwd+bwd {_ids(size)}"
    _run(benchmark, PAIRWISE_IMPLS[impl], inputs)
