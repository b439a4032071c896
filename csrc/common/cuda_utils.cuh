// CUDA helpers shared by every family's .cu file (stable ABI: stream and device come from the shim).
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "common/common.h"

namespace lossforge {

// torch's current CUDA stream for the tensor's device: kernels launched on it order correctly with
// the surrounding torch ops, with CUDA graphs and with torch.compile.
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
                  "lossforge: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

inline void check_cuda(cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, what, ": CUDA error: ", cudaGetErrorString(err));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lossforge

// After every launch: surfaces configuration errors as a Python RuntimeError instead of a later crash.
#define LF_CHECK_LAUNCH(what) ::lossforge::check_cuda(cudaGetLastError(), what)
