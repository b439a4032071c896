"""Build lossforge._C (CPU ops) and, when CUDA is on, lossforge._C_cuda (CUDA ops).

Both are LibTorch stable-ABI extensions (TORCH_TARGET_VERSION = 2.10) built with the limited Python
API, so one cp310-abi3 wheel loads on torch >= 2.10 and CPython >= 3.10.

Environment:
  FORCE_CUDA=1|0        build the CUDA extension or not (default: when torch is a CUDA build and nvcc exists)
  TORCH_CUDA_ARCH_LIST  CUDA targets, e.g. "9.0" (CI) or "8.0;9.0" (wheels); default "9.0" without a GPU
  CUDA_HOME             the CUDA toolkit (default /usr/local/cuda when it exists)
  MAX_JOBS              parallel compile jobs
"""
import glob
import logging
import os
import shutil
import sys
import sysconfig

# torch guesses CUDA_HOME from the `nvcc` on PATH, which may be a wrapper script: prefer the toolkit.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


class _DropNoCudaRuntime(logging.Filter):
    """Building the CUDA kernels on a machine without a GPU is intended: drop torch's "No CUDA runtime is
    found" warning (printed when torch.utils.cpp_extension is imported), keep its other messages."""

    def filter(self, record):
        return not str(record.msg).startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_DropNoCudaRuntime())

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
STABLE_ABI = "-DTORCH_TARGET_VERSION=0x020a000000000000"  # torch 2.10: the oldest torch we load on
# -fopenmp-simd: honour `#pragma omp simd` (vectorised reductions) without linking an OpenMP runtime.
# -fno-trapping-math: lets select-based branch-free code (both sides computed) vectorise; we never
# read the floating-point exception flags. NaN and inf semantics are unchanged.
CXX_FLAGS = ["-O3", "-std=c++17", STABLE_ABI, "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]


def want_cuda():
    """(build the CUDA extension?, why not): the reason lands in _build_config for the import-time warning."""
    force = os.environ.get("FORCE_CUDA", "")
    if force:
        return force == "1", None if force == "1" else f"FORCE_CUDA={force} at build time"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} at build time was a CPU-only build"
    if CUDA_HOME is None or shutil.which("nvcc") is None:
        return False, "no CUDA toolkit (nvcc) was found at build time: set CUDA_HOME"
    return True, None


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def family_sources(pattern):
    return rel(glob.glob(os.path.join(ROOT, "csrc", "*", pattern)))


def write_build_config(with_cuda, arch_list, skipped_reason):
    path = os.path.join(ROOT, "python", "lossforge", "_build_config.py")
    text = (
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__.split('+')[0]!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_VERSION = {(torch.version.cuda if with_cuda else None)!r}\n"
        f"CUDA_ARCH_LIST = {arch_list!r}\n"
        f"TORCH_TARGET_VERSION = '2.10'\n"
        f"CUDA_SKIPPED_REASON = {skipped_reason!r}\n"
    )
    with open(path, "w") as f:
        f.write(text)


with_cuda, cuda_skipped_reason = want_cuda()
arch_list = None
cpu_sources = ["csrc/ops.cpp", "csrc/common/module.cpp"] + [
    s for s in family_sources("*.cpp") if not s.startswith("csrc/common/")
]
ext_modules = [
    CppExtension(
        "lossforge._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
        py_limited_api=True,
    )
]
if with_cuda:
    if CUDA_HOME is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
    if torch.version.cuda is None:
        raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch (pip install torch, not +cpu)")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # arch detection needs a GPU
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected")
    ext_modules.append(
        CUDAExtension(
            "lossforge._C_cuda",
            ["csrc/common/module.cpp"] + [s for s in family_sources("*.cu") if not s.startswith("csrc/common/")],
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={
                "cxx": CXX_FLAGS + ["-DUSE_CUDA"],
                "nvcc": ["-O3", "-std=c++17", STABLE_ABI, "-DUSE_CUDA", "--expt-relaxed-constexpr",
                         "-lineinfo"],
            },
            py_limited_api=True,
        )
    )
else:
    # an earlier in-place CUDA build must not ride along in a CPU-only wheel
    for stale in glob.glob(os.path.join(ROOT, "python", "lossforge", "_C_cuda*.so")):
        os.remove(stale)
write_build_config(with_cuda, arch_list, cuda_skipped_reason)


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """One persistent object folder (build/temp.<platform>-<python>) for every way of building: `setup.py
    build_ext --inplace`, `pip install -e .` (which would otherwise compile in a fresh temporary folder)
    and `pip wheel .`. Ninja then recompiles only what changed (it also tracks headers and compile
    commands), so tools/run.sh's test and bench commands share one build."""

    def finalize_options(self):
        if self.build_temp is None:
            tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = os.path.join(ROOT, "build", f"temp.{tag}")
        super().finalize_options()

    def build_extension(self, ext):
        # both extensions compile csrc/common/module.cpp, with different flags: one object folder each,
        # else each build recompiles it twice
        if not ext.name.endswith("_cuda"):
            return super().build_extension(ext)
        build_temp = self.build_temp
        self.build_temp = os.path.join(build_temp, "cuda")
        try:
            return super().build_extension(ext)
        finally:
            self.build_temp = build_temp


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
