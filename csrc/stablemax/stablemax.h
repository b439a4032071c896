// StableMax math shared by the CPU and CUDA kernels (spec: shared/specs/stablemax.md).
//   s(x)     = x + 1 (x >= 0), 1 / (1 - x) (x < 0)   -- s(-inf) = 0, so -inf logits are masked
//   log s(x) = sign(x) * log1p(|x|)
//   h(x)     = d log s(x) / dx = 1 / (1 + |x|)       -- the factor between StableMax-CE and softmax-CE
// Every element takes exactly one branch, so no inf/NaN from the other branch can leak into a gradient.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define LF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LF_HOST_DEVICE inline
#endif

namespace lossforge {
namespace stablemax {

template <typename T>
LF_HOST_DEVICE T s(T x) {
  return x >= T(0) ? x + T(1) : T(1) / (T(1) - x);
}

template <typename T>
LF_HOST_DEVICE T log_s(T x) {
  return x >= T(0) ? log1p(x) : -log1p(-x);
}

template <typename T>
LF_HOST_DEVICE T h(T x) {
  return T(1) / (T(1) + fabs(x));
}

// Accumulation type: float for float32/bfloat16/float16 storage, double for float64.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Row r of a contiguous tensor viewed as [outer, V, inner], with the class dimension in the middle:
// element c of the row sits at base + c * stride.
struct RowLayout {
  long long V, inner;
  LF_HOST_DEVICE long long base(long long r) const { return (r / inner) * V * inner + r % inner; }
};

}  // namespace stablemax
}  // namespace lossforge
