// Sliced Wasserstein math shared by the CPU and CUDA kernels (spec: shared/specs/sliced_wasserstein.md).
//
// One slice l of one pair b: project u_i = <x_i, theta_l>, v_j = <y_j, theta_l>, sort both, and
//   W_p^p = int_0^1 |F^-1(q) - G^-1(q)|^p dq
// Equal sizes and uniform weights: W_p^p = (1/N) sum_i |u_(i) - v_(i)|^p.
// General: merge the cumulative weights A_i = sum_{k<=i} a_(k), B_j = sum_{k<=j} b_(k) in one two-pointer
// walk; every merged interval [q, min(A_i, B_j)] costs its length times |u_(i) - v_(j)|^p.
//
// Sorting works on unsigned integer keys whose order is the order of the floats (sign bit flipped for
// positives, all bits flipped for negatives; -0 is mapped to +0 so that it ties with +0). Keys are
// sorted together with the points' indices by a stable sort, so ties are broken by index: the same
// order as torch.sort(stable=True), on every device and for every thread count.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace lossforge {
namespace sliced_wasserstein {

// The unsigned key type that sorts like T.
template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

LF_HOST_DEVICE uint32_t to_key(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  if (u == 0x80000000u) u = 0u;  // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

LF_HOST_DEVICE float from_key(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

LF_HOST_DEVICE uint64_t to_key(double f) {
  uint64_t u;
  memcpy(&u, &f, sizeof(u));
  if (u == 0x8000000000000000ull) u = 0ull;
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

LF_HOST_DEVICE double from_key(uint64_t k) {
  const uint64_t u = (k & 0x8000000000000000ull) ? (k & 0x7fffffffffffffffull) : ~k;
  double f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

LF_HOST_DEVICE float pow_(float a, float b) { return powf(a, b); }
LF_HOST_DEVICE double pow_(double a, double b) { return pow(a, b); }

// |t|^p and d|t|^p/dt = p |t|^(p-1) sign(t), with exact branches for p = 1, 2, 3 (sign(0) = 0).
template <typename T>
struct PowP {
  T p;
  int mode;  // 1, 2, 3: integer p; 0: general

  LF_HOST_DEVICE static PowP make(double p_) {
    PowP r;
    r.p = static_cast<T>(p_);
    r.mode = p_ == 1.0 ? 1 : p_ == 2.0 ? 2 : p_ == 3.0 ? 3 : 0;
    return r;
  }

  LF_HOST_DEVICE T value(T t) const {
    const T a = t < T(0) ? -t : t;
    switch (mode) {
      case 1: return a;
      case 2: return a * a;
      case 3: return a * a * a;
      default: return a == T(0) ? T(0) : pow_(a, p);
    }
  }

  LF_HOST_DEVICE T deriv(T t) const {
    const T s = t > T(0) ? T(1) : (t < T(0) ? T(-1) : T(0));
    const T a = t < T(0) ? -t : t;
    switch (mode) {
      case 1: return s;
      case 2: return T(2) * t;
      case 3: return T(3) * a * t;
      default: return a == T(0) ? T(0) : s * p * pow_(a, p - T(1));
    }
  }
};

// Layout of the projections tensor: [d, L] (shared by every pair) or [B, d, L] (one set per pair).
// Direction l of pair b, coordinate k: theta[b * pair_stride + k * L + l].
struct ProjLayout {
  int64_t L, d, pair_stride;
  LF_HOST_DEVICE int64_t at(int64_t b, int64_t k, int64_t l) const { return b * pair_stride + k * L + l; }
};

}  // namespace sliced_wasserstein
}  // namespace lossforge
