"""Loads the compiled ops (lossforge._C, and lossforge._C_cuda when it was built) and reports the build."""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import _build_config
from ._version import __version__

_cuda_error: str | None = None
# LOSSFORGE_CPU_LIBRARY: another build of the CPU ops to load instead (.ci/run: one built with sanitizers)
if os.environ.get("LOSSFORGE_CPU_LIBRARY"):
    torch.ops.load_library(os.environ["LOSSFORGE_CPU_LIBRARY"])
else:
    importlib.import_module("lossforge._C")  # registers torch.ops.lossforge.* (CPU kernels and schemas)
if _build_config.WITH_CUDA:
    try:
        importlib.import_module("lossforge._C_cuda")  # registers the CUDA kernels
    except (ImportError, OSError) as e:  # e.g. a CUDA build beside a CPU-only torch: the CPU ops still work
        _cuda_error = str(e)

ops = torch.ops.lossforge


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


def register_fake(name: str):
    """torch.library.register_fake, plus the check every kernel starts with: all tensor arguments on one
    device. (A call mixing CPU and meta tensors dispatches here, to the fake kernel, and would otherwise
    return meta tensors instead of raising; under torch.compile the same message as in eager.)"""
    op = name.split("::")[-1]

    def wrap(fake):
        def checked(*args, **kwargs):
            ts = list(_tensors(args)) + list(_tensors(kwargs.values()))
            for t in ts[1:]:
                torch._check(t.device == ts[0].device,
                             lambda t=t: f"{op}: all tensor arguments must be on one device, got {ts[0].device} "
                                         f"and {t.device}")
            return fake(*args, **kwargs)

        torch.library.register_fake(name)(checked)
        return fake

    return wrap


def cuda_kernels_loaded() -> bool:
    return _build_config.WITH_CUDA and _cuda_error is None


class CUDAKernelsMissingWarning(UserWarning):
    """torch sees a GPU but lossforge's CUDA kernels are not loaded: CUDA tensors fail in lossforge's ops."""


_warned_cuda_missing = False


def _warn_if_cuda_missing() -> None:
    """Warns once when torch sees a GPU but this build's CUDA kernels are missing, with the reason and the fix."""
    global _warned_cuda_missing
    # cheap checks first: no GPU query when the kernels loaded or torch itself is a CPU-only build
    if _warned_cuda_missing or cuda_kernels_loaded() or torch.version.cuda is None or not torch.cuda.is_available():
        return
    _warned_cuda_missing = True
    if _build_config.WITH_CUDA:
        reason = f"lossforge._C_cuda was built but failed to load: {_cuda_error}"
    else:
        why = getattr(_build_config, "CUDA_SKIPPED_REASON", None) or "unknown"
        reason = f"lossforge was built without its CUDA kernels ({why})"
    warnings.warn(
        f"lossforge: torch sees a GPU but lossforge's CUDA kernels are not loaded; lossforge ops on CUDA tensors "
        f"will fail (the CPU ops work). Reason: {reason}. Fix: rebuild against a CUDA build of torch with the "
        f"CUDA toolkit, e.g. `FORCE_CUDA=1 CUDA_HOME=/usr/local/cuda pip install --no-build-isolation "
        f"--force-reinstall --no-deps .` (TORCH_CUDA_ARCH_LIST picks the GPUs; see setup.py).",
        CUDAKernelsMissingWarning, stacklevel=2)


def build_info() -> dict:
    """What this installation of lossforge was compiled with, and what it runs on now."""
    return {
        "version": __version__,
        "built_against_torch": _build_config.TORCH_VERSION,
        "stable_abi_target": _build_config.TORCH_TARGET_VERSION,
        "running_torch": torch.__version__,
        "cuda_compiled": _build_config.WITH_CUDA,
        "cuda_version": _build_config.CUDA_VERSION,
        "cuda_arch_list": _build_config.CUDA_ARCH_LIST,
        "cuda_kernels_loaded": cuda_kernels_loaded(),
        "cuda_load_error": _cuda_error,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
    }


_warn_if_cuda_missing()
