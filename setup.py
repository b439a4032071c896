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
import os
import shutil

# torch guesses CUDA_HOME from the `nvcc` on PATH, which may be a wrapper script: prefer the toolkit.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

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
    force = os.environ.get("FORCE_CUDA", "")
    if force:
        return force == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def family_sources(pattern):
    return rel(glob.glob(os.path.join(ROOT, "csrc", "*", pattern)))


def write_build_config(with_cuda, arch_list):
    path = os.path.join(ROOT, "python", "lossforge", "_build_config.py")
    text = (
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__.split('+')[0]!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_VERSION = {(torch.version.cuda if with_cuda else None)!r}\n"
        f"CUDA_ARCH_LIST = {arch_list!r}\n"
        f"TORCH_TARGET_VERSION = '2.10'\n"
    )
    with open(path, "w") as f:
        f.write(text)


with_cuda = want_cuda()
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
write_build_config(with_cuda, arch_list)

setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
