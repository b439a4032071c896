#!/usr/bin/env bash
# The README's two commands. Each sets up everything it needs on a fresh machine (a virtual
# environment in .venv with torch and the test/bench dependencies, the compiled extension), then
#   tools/run.sh bench [args]   runs the main job: `lossforge bench`, the side-by-side report
#   tools/run.sh test  [args]   runs the test suite (pytest)
# Environment: FORCE_CUDA=1|0 and TORCH_CUDA_ARCH_LIST (see setup.py), LOSSFORGE_VENV (default .venv),
# LOSSFORGE_TORCH (pip requirement for torch, default "torch>=2.10").
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-}
case "$what" in
  test|bench) shift ;;
  *) echo "usage: tools/run.sh {test|bench} [args...]" >&2; exit 2 ;;
esac

venv=${LOSSFORGE_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@"; }

# The CUDA toolkit on these machines lives in /usr/local/cuda (the `nvcc` on PATH may be a wrapper).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# ccache (when installed) makes rebuilds take seconds; CCACHE_NOHASHDIR lets temp build dirs hit.
export CCACHE_NOHASHDIR=1

stamp="$venv/.lossforge-deps"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip_install --upgrade pip "setuptools>=77" wheel ninja
  pip_install "${LOSSFORGE_TORCH:-torch>=2.10}" numpy
  # the test and bench extras, then the Betti-Matching-3D reference build (its own deps are not needed;
  # its wheels cover CPython 3.10-3.13 on x86-64: elsewhere the tests that need it fail, the rest run)
  pip_install pytest hypothesis scipy pot gudhi cripser networkx pytest-benchmark matplotlib tqdm
  pip_install --no-deps topolosses || echo "warning: no topolosses wheel here: the Betti matching oracle is missing" >&2
  touch "$stamp"
fi
# Build the extension against the torch in the venv (no isolation: no second torch to fetch) and install
# lossforge in editable mode, so `lossforge` and `import lossforge` use this checkout. Both ways of
# building share one object folder (build/temp.*, see setup.py), so whichever command runs second, and
# any later rebuild, recompiles only what changed. Keep the build variables (FORCE_CUDA,
# TORCH_CUDA_ARCH_LIST, CUDA_HOME) the same for both commands: changed flags recompile.
if "$py" -c "import os, sys, lossforge
sys.exit(os.path.realpath(lossforge.__file__) != os.path.realpath('python/lossforge/__init__.py'))" 2>/dev/null; then
  "$py" setup.py -q build_ext --inplace
else
  pip_install --no-build-isolation --no-deps -e .
fi

case "$what" in
  test)
    # The CUDA executor's test module: every .cu file compiled for the CPU, so that the CUDA kernels run in
    # tests/test_cuda_kernels.py without a GPU (CMake + Ninja; ccache when installed).
    export PATH="$(cd "$venv" && pwd)/bin:$PATH"  # the venv's ninja (and cmake, if installed there)
    command -v cmake >/dev/null || pip_install cmake
    launcher=()
    if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
    cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" \
      -DPython3_EXECUTABLE="$(cd "$venv" && pwd)/bin/python" >/dev/null
    echo "building the CUDA executor's test module (build/cmake/lossforge_emulated.so)"
    cmake --build build/cmake --target lossforge_emulated >build/cmake/emulated-build.log 2>&1 ||
      { cat build/cmake/emulated-build.log; exit 1; }
    exec "$py" -m pytest tests "$@" ;;
  bench) exec "$venv/bin/lossforge" bench "$@" ;;
esac
