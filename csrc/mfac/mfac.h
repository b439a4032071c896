// M-FAC math shared by the CPU and CUDA kernels (spec: shared/specs/mfac.md).
//
// The gradient buffer G is [m, d] with rows contiguous (stride(1) == 1, any row stride >= d), stored as
// float32, float64 or bfloat16. Arithmetic runs in the "compute" type A: double for float64 storage,
// float otherwise. bfloat16 is handled as raw uint16_t bits (round-to-nearest-even on store, exactly like
// torch's tensor.bfloat16(), so a stored row equals g.bfloat16()).
//
// The two passes over G:
//   pass 1  t_v = G x_v for a few vectors x_v (fused: write x into one row of G first)
//   pass 2  y   = beta x + alpha G^T b (fused: the optimizer update of the parameters)
// Both walk G in column chunks of kChunk columns; a chunk is one task (CPU) or one block (CUDA). Pass 1
// writes one partial m-vector per chunk, reduced afterwards in float64 in chunk order, so results do
// not depend on the number of threads.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace lossforge {
namespace mfac {

constexpr int64_t kChunk = 4096;      // CPU: columns per task (its x buffer stays in L1/L2)
constexpr int64_t kCudaTile = 2048;   // CUDA: columns per block in pass 1 (x tile in shared memory)

LF_HOST_DEVICE float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Round to nearest even; NaN stays a (quiet) NaN. Same bits as torch's float -> bfloat16 conversion.
LF_HOST_DEVICE uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  uint32_t u = __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
#endif
  // branch-free (a select), so that the loops calling it vectorise
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// Storage type S (float, double, uint16_t = bfloat16 bits) -> compute type.
template <typename S>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

LF_HOST_DEVICE float load(float v) { return v; }
LF_HOST_DEVICE double load(double v) { return v; }
LF_HOST_DEVICE float load(uint16_t v) { return bf16_to_float(v); }

LF_HOST_DEVICE float store_value(float v, float*) { return v; }
LF_HOST_DEVICE double store_value(double v, double*) { return v; }
LF_HOST_DEVICE uint16_t store_value(float v, uint16_t*) { return float_to_bf16(v); }

// The value a compute-type number has once stored (the identity except for bfloat16 storage).
LF_HOST_DEVICE float stored(float v, const float*) { return v; }
LF_HOST_DEVICE double stored(double v, const double*) { return v; }
LF_HOST_DEVICE float stored(float v, const uint16_t*) { return bf16_to_float(float_to_bf16(v)); }

// g + wd * p (weight decay) is computed with add_mul (common/host_device.h): G's new row then equals
// (g + wd * p).to(storage) in torch bit for bit, on both devices.

}  // namespace mfac
}  // namespace lossforge
