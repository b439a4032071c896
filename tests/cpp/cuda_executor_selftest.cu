// Kernels that break CUDA's rules on purpose, one per check of the CUDA executor (csrc/common/
// cuda_emulation.h), and one that follows them: tests/test_cuda_kernels.py runs each through the op
// lossforge_emulated::executor_selftest and expects the executor to refuse it with a clear error (or, for
// the racy one, to give a thread-order-dependent result). Compiled only into the test module.
#include "common/cuda_utils.cuh"

namespace lossforge {
namespace executor_selftest {
namespace {

// A block-wide sum over 256 threads: warp shuffles, one partial per warp in shared memory.
template <bool kFirstBarrier>
__device__ float block_sum(float v) {
  LF_SHARED(float[8], partial);
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (kFirstBarrier) __syncthreads();  // the previous call's readers are done with `partial`
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0;
  for (int w = 0; w < 8; ++w) total += partial[w];
  return total;
}

// Follows the rules: two block sums, every shuffle flavour, __syncwarp on half warps.
__global__ void good_kernel(float* out) {
  const int t = threadIdx.x, lane = t % 32;
  const float a = block_sum<true>(static_cast<float>(t));
  const float b = block_sum<true>(1.0f);
  const float down = __shfl_down_sync(0xffffffffu, static_cast<float>(lane), 1);  // lane 31 keeps its own
  const float up = __shfl_up_sync(0xffffffffu, static_cast<float>(lane), 2);      // lanes 0, 1 keep theirs
  const float idx = __shfl_sync(0xffffffffu, static_cast<float>(lane), 3, 8);     // lane 3 of each group of 8
  LF_SHARED(float[256], half);
  half[t] = static_cast<float>(t);
  __syncwarp(lane < 16 ? 0x0000ffffu : 0xffff0000u);
  const float neighbour = half[t ^ 1];
  if (t == 0) {
    out[0] = a;
    out[1] = b;
  }
  if (t < 32) {
    out[2 + t] = down;
    out[34 + t] = up;
    out[66 + t] = idx;
    out[98 + t] = neighbour;
  }
}

// The same sums without the first barrier: one warp may overwrite `partial` while others still read it.
__global__ void racy_kernel(float* out) {
  const float a = block_sum<false>(static_cast<float>(threadIdx.x));
  const float b = block_sum<false>(1.0f);
  if (threadIdx.x == 0) {
    out[0] = a;
    out[1] = b;
  }
}

__global__ void empty_kernel(float* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) out[0] = 1.0f;
}

template <int kCase>  // one instantiation per case: the opt-in attribute of one does not reach the other
__global__ void dynamic_shared_kernel(float* out, int n) {
  LF_DYNAMIC_SHARED(float, buf);
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = buf[n - 1];
}

__global__ void big_static_shared_kernel(float* out) {
  LF_SHARED(float[12289], big);  // 49156 B > 48 KB
  big[threadIdx.x] = 1.0f;
  out[0] = big[0];
}

__global__ void static_and_dynamic_kernel(float* out) {
  LF_SHARED(float[8192], part);  // 32 KB, + 20 KB dynamic at the launch
  LF_DYNAMIC_SHARED(float, rest);
  part[threadIdx.x] = 1.0f;
  rest[threadIdx.x] = 1.0f;
  out[0] = part[0] + rest[0];
}

__global__ void early_return_kernel(float* out) {
  if (threadIdx.x >= 128) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_after_exit_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void shuffle_without_own_lane_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x1u, 1.0f, 1);
}

__global__ void shuffle_at_two_sites_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 2);
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 2.0f, 2);
  }
}

__global__ void shuffle_outside_mask_kernel(float* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 16);
}

__global__ void partial_warp_shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void uninitialised_shared_kernel(float* out) {
  LF_SHARED(float[256], s);
  if (threadIdx.x < 128) s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// The cases, by number (tests/test_cuda_kernels.py names them).
void run_case(float* out, int64_t which) {
  cudaStream_t stream = nullptr;
  switch (which) {
    case 0: return launch<good_kernel>(1, 256, 0, stream, out);
    case 1: return launch<racy_kernel>(1, 256, 0, stream, out);
    case 2: return launch<empty_kernel>(1, 1025, 0, stream, out);
    case 3: return launch<empty_kernel>(dim3(1, 65536), 32, 0, stream, out);
    case 4: return launch<empty_kernel>(0, 32, 0, stream, out);
    case 5: return launch<dynamic_shared_kernel<5>>(1, 256, 49156, stream, out, 12289);
    case 6:
      check_cuda(cudaFuncSetAttribute(dynamic_shared_kernel<6>, cudaFuncAttributeMaxDynamicSharedMemorySize, 100000),
                 "executor_selftest");
      return launch<dynamic_shared_kernel<6>>(1, 256, 100000, stream, out, 25000);
    case 7:
      return check_cuda(
          cudaFuncSetAttribute(dynamic_shared_kernel<6>, cudaFuncAttributeMaxDynamicSharedMemorySize, 232449),
          "executor_selftest (opt-in over the maximum)");
    case 8: return launch<big_static_shared_kernel>(1, 32, 0, stream, out);
    case 9: return launch<static_and_dynamic_kernel>(1, 32, 20 * 1024, stream, out);
    case 10: return launch<early_return_kernel>(1, 256, 0, stream, out);
    case 11: return launch<divergent_barrier_kernel>(1, 256, 0, stream, out);
    case 12: return launch<shuffle_after_exit_kernel>(1, 64, 0, stream, out);
    case 13: return launch<shuffle_without_own_lane_kernel>(1, 32, 0, stream, out);
    case 14: return launch<shuffle_at_two_sites_kernel>(1, 32, 0, stream, out);
    case 15: return launch<shuffle_outside_mask_kernel>(1, 32, 0, stream, out);
    case 16: return launch<partial_warp_shuffle_kernel>(1, 48, 0, stream, out);
    case 17: return launch<uninitialised_shared_kernel>(1, 256, 0, stream, out);
  }
  STD_TORCH_CHECK(false, "executor_selftest: no case ", which);
}

void executor_selftest(Tensor out, int64_t which) {
  check_device(out, true, "executor_selftest", "out");
  check_dtype(out, ScalarType::Float, "executor_selftest", "out");
  STD_TORCH_CHECK(out.numel() >= 256 && out.is_contiguous(), "executor_selftest: out must be contiguous, >= 256");
  run_case(out.mutable_data_ptr<float>(), which);
}

}  // namespace
}  // namespace executor_selftest
}  // namespace lossforge

STABLE_TORCH_LIBRARY_FRAGMENT(lossforge, m) { m.def("executor_selftest(Tensor(a!) out, int which) -> ()"); }

STABLE_TORCH_LIBRARY_IMPL(lossforge, CUDA, m) {
  m.impl("executor_selftest", TORCH_BOX(&lossforge::executor_selftest::executor_selftest));
}
