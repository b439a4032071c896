"""The CUDA executor from the tests: loads its test module (the .cu files compiled for the CPU, built by
the README's test command into build/cmake/lossforge_emulated.so, or LOSSFORGE_EMULATED_LIB), picks the
thread order of the next launches, and reads the launch count of every kernel instantiation."""
from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORDERS = ("forward", "reverse", "shuffle", "warp_ahead")
BUILD_HINT = "build it with tools/run.sh test, or: cmake --build build/cmake --target lossforge_emulated"

_lib = None


def library_path() -> str:
    return os.environ.get("LOSSFORGE_EMULATED_LIB") or str(ROOT / "build" / "cmake" / "lossforge_emulated.so")


def load():
    """The test module (loaded once): registers torch.ops.lossforge_emulated.* for CPU tensors."""
    global _lib
    if _lib is None:
        path = library_path()
        if not os.path.exists(path):
            raise RuntimeError(f"the CUDA executor's test module {path} does not exist: {BUILD_HINT}")
        torch.ops.load_library(path)
        lib = ctypes.CDLL(path)  # the same loaded library: its C interface
        lib.lf_emu_set_order.argtypes = [ctypes.c_char_p, ctypes.c_ulonglong]
        lib.lf_emu_kernel_table.restype = ctypes.c_char_p
        _lib = lib
    return _lib


def ops():
    load()
    return torch.ops.lossforge_emulated


def set_order(order: str, seed: int = 0) -> None:
    if load().lf_emu_set_order(order.encode(), seed) != 0:
        raise ValueError(f"unknown thread order {order!r}; one of {ORDERS}")


@contextlib.contextmanager
def order(name: str, seed: int = 0):
    set_order(name, seed)
    try:
        yield
    finally:
        set_order("forward")


def launch_counts() -> dict[str, dict[str, int]]:
    """{kernel instantiation: {order: launches}} for every instantiation the module can launch."""
    table = {}
    for line in load().lf_emu_kernel_table().decode().splitlines():
        name, *counts = line.split("\t")
        table[name] = dict(zip(ORDERS, map(int, counts)))
    return table


def kernels_in_sources() -> set[str]:
    """The name of every __global__ function in csrc/."""
    names = set()
    for path in (ROOT / "csrc").glob("*/*.cu"):
        text = path.read_text()
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text))
    return names


def base_name(instantiation: str) -> str:
    """'stablemax::ce_forward_kernel<8, float>' -> 'ce_forward_kernel'."""
    return instantiation.split("<", 1)[0].rsplit("::", 1)[-1]
