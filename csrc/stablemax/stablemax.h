// StableMax math shared by the CPU and CUDA kernels (spec: shared/specs/stablemax.md).
//   s(x)     = x + 1 (x >= 0), 1 / (1 - x) (x < 0)   -- s(-inf) = 0, so -inf logits are masked
//   log s(x) = sign(x) * log1p(|x|)
//   h(x)     = d log s(x) / dx = 1 / (1 + |x|)       -- the factor between StableMax-CE and softmax-CE
// The value of each element comes from exactly one branch, so no inf/NaN from the other branch can leak
// into a gradient (the reference's torch.where gives NaN gradients at x == 1.0).
#pragma once

#include <cmath>

#include "common/host_device.h"

// Overloaded math (float stays float): CUDA's device overloads, std:: on the host.
#if defined(__CUDA_ARCH__)
#define LF_MATH(fn) ::fn
#else
#define LF_MATH(fn) std::fn
#endif

namespace lossforge {
namespace stablemax {

// Written with an unconditional division and a select (a = 1 + |x|; s = a or 1/a) so that the CPU
// loops vectorise without branches; the selected value is exactly x + 1 or 1 / (1 - x).
template <typename T>
LF_HOST_DEVICE T s(T x) {
  const T a = T(1) + LF_MATH(fabs)(x);
  const T r = T(1) / a;
  return x >= T(0) ? a : r;
}

template <typename T>
LF_HOST_DEVICE T log_s(T x) {
  return x >= T(0) ? LF_MATH(log1p)(x) : -LF_MATH(log1p)(-x);
}

template <typename T>
LF_HOST_DEVICE T h(T x) {
  return T(1) / (T(1) + LF_MATH(fabs)(x));
}

// s(x) and h(x) with one division: with a = 1 + |x|, s = a (x >= 0) or 1/a (x < 0), and h = 1/a.
template <typename T>
LF_HOST_DEVICE void s_and_h(T x, T& s_out, T& h_out) {
  const T a = T(1) + LF_MATH(fabs)(x);
  const T r = T(1) / a;
  s_out = x >= T(0) ? a : r;
  h_out = r;
}

// A row whose sum S of s(x) overflows although no logit is +inf (logits near the top of the float range) is
// summed again with every term scaled by this power of two, 2^-k with 2^(k-1) > V: each term is at most the
// largest float, so the scaled sum is finite, and the scaling is exact (terms that underflow are far below
// the rounding of the sum). A +inf logit overflows the scaled sum too: that row is NaN, as with softmax.
template <typename A>
LF_HOST_DEVICE A overflow_scale(long long V) {
  int k = 1;
  while ((1LL << (k - 1)) <= V) ++k;
  return LF_MATH(ldexp)(A(1), -k);
}

// The cross-entropy term log S - log s_y = log1p(S_-y / s_y) (no cancellation for confident rows), from the
// non-target sum S_other and s_y both scaled by `scale`; where the ratio overflows (a target far below the
// others), log S_-y - log s_y, which is then exact to rounding.
template <typename A>
LF_HOST_DEVICE A nll_term(A S_other, A sy, A scale, A xy) {
  const A ratio = S_other / (sy * scale);
  if (ratio == A(INFINITY)) return LF_MATH(log)(S_other) - LF_MATH(log)(scale) - log_s<A>(xy);
  return LF_MATH(log1p)(ratio);
}

// ⊥Grad's rescale |g| / |g_perp| from gg = |g|^2 and pp = |g_perp|^2 as computed, g_perp = g - proj w in the
// accumulation type A. When |g_perp| is within the rounding error of that difference (a few ulps of |g|:
// g parallel to w, as every gradient of a one-element parameter is), the exact g_perp is 0 and so is the
// result; rescaling the rounding noise would return a vector of norm |g| in an arbitrary direction. NaN
// propagates (the comparison is false).
template <typename A>
LF_HOST_DEVICE double orthograd_scale(double gg, double pp) {
  const double noise = 8.0 * (sizeof(A) == 4 ? 1.1920928955078125e-07 : 2.220446049250313e-16);  // 8 eps of A
  if (pp <= noise * noise * gg) return 0.0;
  return sqrt(gg) / (sqrt(pp) + 1e-30);
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

// ---- Host-side argument checks shared by the CPU and CUDA entry points ----------------------------
#include "common/common.h"

namespace lossforge {
namespace stablemax {

inline void check_input(const Tensor& x, bool cuda, const char* op, const char* arg) {
  check_floating(x, op, arg);
  check_device(x, cuda, op, arg);
  check_contiguous(x, op, arg);
}

inline ScalarType acc_dtype(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

inline void check_stablemax_backward_args(const Tensor& grad, const Tensor& x, const Tensor& out, bool cuda,
                                          const char* op) {
  check_input(x, cuda, op, "x");
  check_input(grad, cuda, op, "grad");
  check_input(out, cuda, op, "out");
  check_same_device(grad, x, op, "grad", "x");
  check_same_device(out, x, op, "out", "x");
  STD_TORCH_CHECK(grad.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(), op,
                  ": grad, x and out must have the same dtype");
  STD_TORCH_CHECK(grad.sizes() == x.sizes() && out.sizes() == x.sizes(), op,
                  ": grad, x and out must have the same shape");
}

// Checks target (and weight) against input [.., V (at dim), ..] and returns the row layout.
inline DimSplit check_ce_args(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                              int64_t dim, bool cuda, const char* op) {
  check_input(input, cuda, op, "input");
  check_same_device(target, input, op, "target", "input");
  check_dtype(target, ScalarType::Long, op, "target");
  check_contiguous(target, op, "target");
  const DimSplit d = split_at_dim(input, dim, op);
  STD_TORCH_CHECK(target.numel() == d.rows(), op, ": target has ", target.numel(), " elements, expected ",
                  d.rows(), " (input's shape without the class dimension)");
  if (weight.has_value()) {
    check_same_device(*weight, input, op, "weight", "input");
    check_dtype(*weight, acc_dtype(input.scalar_type()), op, "weight");
    check_contiguous(*weight, op, "weight");
    STD_TORCH_CHECK(weight->dim() == 1 && weight->size(0) == d.size, op, ": weight must have shape [",
                    d.size, "] (one entry per class)");
  }
  return d;
}

inline void check_ce_backward_args(const Tensor& grad_rows, const Tensor& stats, const Tensor& input,
                                   const DimSplit& d, const char* op) {
  const ScalarType acc = acc_dtype(input.scalar_type());
  check_same_device(grad_rows, input, op, "grad_rows", "input");
  check_dtype(grad_rows, acc, op, "grad_rows");
  check_contiguous(grad_rows, op, "grad_rows");
  STD_TORCH_CHECK(grad_rows.numel() == 1 || grad_rows.numel() == d.rows(), op,
                  ": grad_rows must have one element or one per row");
  check_same_device(stats, input, op, "stats", "input");
  check_dtype(stats, acc, op, "stats");
  check_contiguous(stats, op, "stats");
  STD_TORCH_CHECK(stats.numel() == 3 * d.rows(), op, ": stats must have shape target.shape + [3]");
}

inline void check_orthograd_args(const Tensor& grad, const Tensor& param, bool cuda) {
  const char* op = "orthograd_";
  check_input(grad, cuda, op, "grad");
  check_input(param, cuda, op, "param");
  check_same_device(grad, param, op, "grad", "param");
  STD_TORCH_CHECK(grad.scalar_type() == param.scalar_type(), op, ": grad and param must have the same dtype");
  STD_TORCH_CHECK(grad.numel() == param.numel(), op, ": grad and param must have the same number of elements");
}

// Output of the cross-entropy forward: per-row loss (target's shape) and stats (target's shape + [3]).
inline std::tuple<Tensor, Tensor> new_ce_outputs(const Tensor& input, const Tensor& target) {
  const ScalarType acc = acc_dtype(input.scalar_type());
  Tensor loss = torch::stable::new_empty(input, target.sizes(), acc);
  std::vector<int64_t> stats_shape(target.sizes().begin(), target.sizes().end());
  stats_shape.push_back(3);
  Tensor stats = torch::stable::new_empty(input, stats_shape, acc);
  return {loss, stats};
}

}  // namespace stablemax
}  // namespace lossforge
