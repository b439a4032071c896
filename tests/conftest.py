"""Shared test fixtures: the `device` fixture runs a test on the CPU and, when present, on CUDA."""
import pytest
import torch

import lossforge

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and lossforge.build_info()["cuda_kernels_loaded"]:
        return
    reason = "no CUDA device here" if not torch.cuda.is_available() else "lossforge was built without CUDA"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the test's name: fresh inputs per test, reproducible per run."""
    import zlib

    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g
