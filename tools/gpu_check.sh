#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU (e.g. through the workplace's device tool, from
# the repository root). It installs the wheel built on the CPU machine (stable ABI + abi3: built
# against torch 2.14 / CPython 3.11, it loads on the GPU machine's torch 2.11 / CPython 3.12), falls
# back to building there, runs every CUDA test, then `lossforge bench --device cuda`.
# Everything it writes goes under $OUT (default ./gpu_out): logs, build info, the bench report.
#
# Prepare on the CPU machine:
#   FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" CUDA_HOME=/usr/local/cuda \
#     .venv/bin/python -m pip wheel --no-build-isolation --no-deps -w dist .
# (optional: Python 3.12 wheels of test oracles in .whl/, see the device tool's README)
# Then on the GPU machine, with dist/ (and .whl/) carried:  bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

{ nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv; } >"$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$OUT/env.txt"

site=/tmp/lossforge-site
rm -rf "$site"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || status=1
fi
# run from /tmp: the tests must import the installed package, not the source tree
cuda_kernels_load() {
  (cd /tmp && python3 -c "import lossforge, sys; sys.exit(not lossforge.build_info()['cuda_kernels_loaded'])")
}
if ls dist/lossforge-*.whl >/dev/null 2>&1 &&
   python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" dist/lossforge-*.whl &&
   PYTHONPATH="$site" cuda_kernels_load; then
  echo "installed the CPU machine's wheel: $(ls dist/lossforge-*.whl)" | tee "$OUT/install.txt"
  export PYTHONPATH="$site"
else
  echo "no usable wheel (none, or its CUDA kernels do not load here): building here" | tee "$OUT/install.txt"
  FORCE_CUDA=1 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { echo "build failed"; exit 1; }
  export PYTHONPATH="$PWD/python:$site"
fi
(cd /tmp && python3 -c "import lossforge, json; print(json.dumps(lossforge.build_info(), indent=1))") \
  | tee "$OUT/build_info.json"
# without the CUDA kernels every CUDA test would be skipped and the check would pass: fail instead
cuda_kernels_load || { echo "gpu_check: the CUDA kernels did not load (see build_info.json)"; status=1; }

# the CUDA tests: every test parametrized with device=cuda and every test marked cuda, among them the
# kernel-parity tests of tests/test_cuda_kernels.py (backend "cuda"), which CI runs on the CPU under the
# CUDA executor (backend "emulated"): the same cases, so the two results can be compared
# (tests/test_properties.py needs hypothesis, which the GPU machine lacks; none of its tests is a CUDA test)
python3 -m pytest tests -m cuda -q -p no:cacheprovider --rootdir=. -o pythonpath= --ignore=tests/test_properties.py \
  --junitxml="$OUT/pytest-cuda.xml" 2>&1 | tee "$OUT/pytest-cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

name="$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")-$(date +%Y-%m-%d)"
python3 -m lossforge bench --device cuda --out "$OUT" --name "$name" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
git rev-parse HEAD >"$OUT/commit.txt" 2>/dev/null || true
echo "gpu_check: status $status; outputs in $OUT"
exit $status
