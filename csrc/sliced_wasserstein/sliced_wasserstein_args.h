// Host-side argument checks and output allocation of the sliced_wasserstein op, shared by the CPU and
// CUDA implementations (the Python wrapper validates first, with friendlier exceptions).
#pragma once

#include <cmath>
#include <optional>
#include <tuple>

#include "common/common.h"
#include "sliced_wasserstein/sliced_wasserstein.h"

namespace lossforge {
namespace sliced_wasserstein {

constexpr const char* kOp = "sliced_wasserstein";

struct Args {
  int64_t B, N, M, d, L;
  bool shared;  // projections [d, L] shared by all pairs
  bool has_wx, has_wy;
  bool fast;    // equal sizes, uniform weights
  bool grad_points, grad_weights, grad_projections;
  ProjLayout P;
};

inline Args check_args(const Tensor& x, const Tensor& y, const std::optional<Tensor>& x_weights,
                       const std::optional<Tensor>& y_weights, const Tensor& projections, double p, bool grad_points,
                       bool grad_weights, bool grad_projections, bool cuda) {
  auto check_tensor = [&](const Tensor& t, const char* arg) {
    check_device(t, cuda, kOp, arg);
    check_contiguous(t, kOp, arg);
  };
  check_tensor(x, "x");
  check_tensor(y, "y");
  check_tensor(projections, "projections");
  check_same_device(x, y, kOp, "x", "y");
  check_same_device(x, projections, kOp, "x", "projections");
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::Double, kOp,
                  ": x must be float32 or float64, got ", dtype_name(x.scalar_type()));
  check_dtype(y, x.scalar_type(), kOp, "y");
  check_dtype(projections, x.scalar_type(), kOp, "projections");
  STD_TORCH_CHECK(x.dim() == 3 && y.dim() == 3, kOp, ": x and y must be [B, N, d] and [B, M, d]");
  Args a;
  a.B = x.size(0);
  a.N = x.size(1);
  a.d = x.size(2);
  a.M = y.size(1);
  STD_TORCH_CHECK(y.size(0) == a.B && y.size(2) == a.d, kOp, ": y must have shape [", a.B, ", M, ", a.d, "]");
  STD_TORCH_CHECK(a.N > 0 && a.M > 0 && a.d > 0, kOp, ": x and y need at least one point of dimension >= 1");
  STD_TORCH_CHECK(a.N < (int64_t(1) << 31) && a.M < (int64_t(1) << 31), kOp, ": at most 2^31 - 1 points per side");
  STD_TORCH_CHECK(projections.dim() == 2 || projections.dim() == 3, kOp, ": projections must be [d, L] or [B, d, L]");
  a.shared = projections.dim() == 2;
  a.L = projections.size(projections.dim() - 1);
  STD_TORCH_CHECK(projections.size(projections.dim() - 2) == a.d && (a.shared || projections.size(0) == a.B), kOp,
                  ": projections must be [", a.d, ", L] or [", a.B, ", ", a.d, ", L]");
  STD_TORCH_CHECK(a.L > 0, kOp, ": need at least one projection");
  STD_TORCH_CHECK(p >= 1.0 && std::isfinite(p), kOp, ": p must be a finite number >= 1, got ", p);
  for (int side = 0; side < 2; ++side) {
    const auto& w = side == 0 ? x_weights : y_weights;
    if (!w.has_value()) continue;
    const char* arg = side == 0 ? "x_weights" : "y_weights";
    check_tensor(*w, arg);
    check_same_device(x, *w, kOp, "x", arg);
    check_dtype(*w, x.scalar_type(), kOp, arg);
    const int64_t n = side == 0 ? a.N : a.M;
    STD_TORCH_CHECK(w->dim() == 2 && w->size(0) == a.B && w->size(1) == n, kOp, ": ", arg, " must be [", a.B, ", ",
                    n, "]");
  }
  a.has_wx = x_weights.has_value();
  a.has_wy = y_weights.has_value();
  a.fast = !a.has_wx && !a.has_wy && a.N == a.M;
  a.grad_points = grad_points;
  a.grad_weights = grad_weights && (a.has_wx || a.has_wy);
  a.grad_projections = grad_projections;
  a.P = ProjLayout{a.L, a.d, a.shared ? 0 : a.d * a.L};
  return a;
}

// (value [B], grad_x [B, N, d], grad_y [B, M, d], grad_x_weights [B, N], grad_y_weights [B, M],
//  grad_projections [B, d, L]); a [0] tensor for each gradient that was not requested. The point
// gradients start at zero (the kernels accumulate into them).
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

inline Outputs allocate_outputs(const Tensor& x, const Args& a) {
  auto empty0 = [&]() { return torch::stable::new_empty(x, {0}); };
  Tensor value = torch::stable::new_empty(x, {a.B});
  Tensor gx = a.grad_points ? torch::stable::new_zeros(x, {a.B, a.N, a.d}) : empty0();
  Tensor gy = a.grad_points ? torch::stable::new_zeros(x, {a.B, a.M, a.d}) : empty0();
  Tensor gwx = a.grad_weights && a.has_wx ? torch::stable::new_empty(x, {a.B, a.N}) : empty0();
  Tensor gwy = a.grad_weights && a.has_wy ? torch::stable::new_empty(x, {a.B, a.M}) : empty0();
  Tensor gth = a.grad_projections ? torch::stable::new_empty(x, {a.B, a.d, a.L}) : empty0();
  return {value, gx, gy, gwx, gwy, gth};
}

}  // namespace sliced_wasserstein
}  // namespace lossforge
