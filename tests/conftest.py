"""Shared test fixtures: the `device` fixture runs a test on the CPU and, when present, on CUDA."""
import sys

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


def pytest_terminal_summary(terminalreporter):
    """The CUDA executor's launch table, when this run used it (tests/test_cuda_kernels.py): per kernel, its
    template instantiations and their launches under each thread order ("!": an instantiation that no test
    launched under that order)."""
    ce = sys.modules.get("cuda_executor")
    if ce is None or ce._lib is None:
        return
    per_kernel = {}
    for name, counts in ce.launch_counts().items():
        if name.startswith("executor_selftest::"):  # the executor's own tests: kernels that break rules
            continue
        kernel = name.split("<", 1)[0]
        inst, totals, unlaunched = per_kernel.setdefault(kernel, [0, dict.fromkeys(ce.ORDERS, 0), set()])
        per_kernel[kernel][0] = inst + 1
        for order, n in counts.items():
            totals[order] += n
            if n == 0:
                unlaunched.add(order)
    width = max(map(len, per_kernel))
    terminalreporter.section("CUDA executor: launches per kernel (all its instantiations) and thread order")
    terminalreporter.write_line(f"{'kernel':<{width}}  inst  " + "  ".join(f"{o:>11}" for o in ce.ORDERS))
    for kernel, (inst, totals, unlaunched) in per_kernel.items():
        cells = [f"{totals[o]:>10}{'!' if o in unlaunched else ' '}" for o in ce.ORDERS]
        terminalreporter.write_line(f"{kernel:<{width}}  {inst:>4}  " + "  ".join(cells))


def compiled(fn, fullgraph: bool):
    """fn under torch.compile (aot_eager: the graph capture is what is tested), from a fresh dynamo cache."""
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=fullgraph)


def same_error_eager_and_fake(fn, *args):
    """fn(*args) raises in eager; the fake kernels (torch.compile's view of the op) raise the same message."""
    import re

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    with pytest.raises(RuntimeError) as eager:
        fn(*args)
    message = re.sub(r"^\w+, \S+:\d+, ", "", str(eager.value).splitlines()[0])  # C++: "function, file:line, "
    mode = FakeTensorMode()
    fake_args = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, args)
    with mode, pytest.raises(RuntimeError) as fake:
        fn(*fake_args)
    assert message in str(fake.value), (fn, message, str(fake.value))
