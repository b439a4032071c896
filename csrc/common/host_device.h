// LF_HOST_DEVICE marks the small math functions that the CPU (.cpp, g++) and CUDA (.cu, nvcc) kernels
// of a family share through its <family>.h.
#pragma once

#if defined(__CUDACC__)
#define LF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LF_HOST_DEVICE inline
#endif

namespace lossforge {

// a + b * c and a * b, each operation rounded on its own, as torch and the CPU kernels (built without
// FMA) compute them. nvcc would contract a multiply and an add into one FMA, which changes the last bit:
// the CUDA kernels use these where their result must equal the CPU's or torch's bit for bit.
template <typename T>  // float or double
LF_HOST_DEVICE T add_mul(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __fadd_rn(a, __fmul_rn(b, c));
  else return __dadd_rn(a, __dmul_rn(b, c));
#else
  return a + b * c;
#endif
}
template <typename T>
LF_HOST_DEVICE T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

}  // namespace lossforge
