// CUDA helpers shared by every family's .cu file (stable ABI: stream and device come from the shim).
// The same .cu files also compile with the host compiler against common/cuda_emulation.h (the CUDA
// executor, for the tests): what differs between the two builds is in this file.
#pragma once

#include <string>
#include <utility>

#if defined(LF_CUDA_EMULATION)
#include "common/cuda_emulation.h"
#else
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#endif

#include "common/common.h"

namespace lossforge {

inline void check_cuda(cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, what, ": CUDA error: ", cudaGetErrorString(err));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#if defined(LF_CUDA_EMULATION)
using ::lf_emu::DeviceGuard;
using ::lf_emu::launch;
inline cudaStream_t current_stream(const Tensor&) { return nullptr; }
#else
using DeviceGuard = torch::stable::accelerator::DeviceGuard;

// torch's current CUDA stream for the tensor's device: kernels launched on it order correctly with
// the surrounding torch ops, with CUDA graphs and with torch.compile.
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
                  "lossforge: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

// "ns::kernel<float>" from the compiler's name of kernel_name<kernel>.
template <auto Kernel>
std::string kernel_name() {
  const std::string pretty = __PRETTY_FUNCTION__;
  const size_t at = pretty.find("Kernel = ");
  return at == std::string::npos ? pretty : pretty.substr(at + 9, pretty.size() - at - 10);
}

// The one spelling of a kernel launch: kernel<<<grid, block, dynamic_shared_bytes, stream>>>(args...), then
// the launch check (a bad configuration raises here, naming the kernel). Under the CUDA executor the same
// call runs the kernel on the CPU (lf_emu::launch).
template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, cudaStream_t stream, Args&&... args) {
  Kernel<<<grid, block, dynamic_shared_bytes, stream>>>(std::forward<Args>(args)...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) check_cuda(err, kernel_name<Kernel>().c_str());
}

template <typename T>
using shared_type = T;
#endif

}  // namespace lossforge

#if !defined(LF_CUDA_EMULATION)
// Shared memory, spelled so that the CUDA executor can size and poison it: LF_SHARED(float[256], red);
// LF_SHARED(double, total); LF_DYNAMIC_SHARED(unsigned char, smem) (16-byte aligned, size set at launch).
#define LF_SHARED(type, name) __shared__ ::lossforge::shared_type<type> name
#define LF_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
