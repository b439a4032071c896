// Betti matching host-side argument checks shared by betti_matching_cpu.cpp and
// betti_matching_cuda.cu (Python validates first; these keep direct torch.ops calls safe).
#pragma once

#include "common/common.h"

namespace lossforge {
namespace betti_matching {

struct LossArgs {
  int64_t N, V, P, D;
};

// pred, target [N, V] (float32 or float64, on the kernel's device), rows [P, 5] int64, weights [D, 3]
// float64, all contiguous and on pred's device.
inline LossArgs check_loss_args(const Tensor& pred, const Tensor& target, const Tensor& rows, const Tensor& weights,
                                bool cuda, const char* op) {
  check_device(pred, cuda, op, "pred");
  check_same_device(pred, target, op, "pred", "target");
  check_same_device(pred, rows, op, "pred", "rows");
  check_same_device(pred, weights, op, "pred", "weights");
  STD_TORCH_CHECK(pred.scalar_type() == ScalarType::Float || pred.scalar_type() == ScalarType::Double, op,
                  ": pred must be float32 or float64, got ", dtype_name(pred.scalar_type()));
  check_dtype(target, pred.scalar_type(), op, "target");
  check_dtype(rows, ScalarType::Long, op, "rows");
  check_dtype(weights, ScalarType::Double, op, "weights");
  check_contiguous(pred, op, "pred");
  check_contiguous(target, op, "target");
  check_contiguous(rows, op, "rows");
  check_contiguous(weights, op, "weights");
  STD_TORCH_CHECK(pred.dim() == 2, op, ": pred must have shape [N, V]");
  STD_TORCH_CHECK(target.dim() == 2 && target.size(0) == pred.size(0) && target.size(1) == pred.size(1), op,
                  ": target must have pred's shape [N, V]");
  STD_TORCH_CHECK(rows.dim() == 2 && rows.size(1) == 5, op, ": rows must have shape [P, 5]");
  STD_TORCH_CHECK(weights.dim() == 2 && weights.size(1) == 3 && weights.size(0) >= 1, op,
                  ": weights must have shape [D, 3]");
  return {pred.size(0), pred.size(1), rows.size(0), weights.size(0)};
}

// The backward's incoming gradient: one value per instance, like pred.
inline void check_loss_grad(const Tensor& grad, const Tensor& pred, const LossArgs& a, const char* op) {
  check_same_device(pred, grad, op, "pred", "grad");
  check_dtype(grad, pred.scalar_type(), op, "grad");
  check_contiguous(grad, op, "grad");
  STD_TORCH_CHECK(grad.numel() == a.N, op, ": grad must have one element per instance");
}

}  // namespace betti_matching
}  // namespace lossforge
