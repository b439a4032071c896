// Betti matching loss on CUDA tensors: the per-instance loss over the rows of betti_matching_pairs
// (one thread per row, atomic accumulation per instance) and its gradient (one thread per row,
// atomic scatter into the two critical pixels). The rows come from the CPU core in one transfer;
// nothing here synchronises with the host.
#include <cuda_runtime.h>

#include "betti_matching/betti_matching.h"
#include "common/cuda_utils.cuh"

namespace lossforge {
namespace betti_matching {
namespace {

constexpr int kThreads = 256;

// A row is used only when its segment and the pixels it reads are in range (rows from the core
// always are; this keeps a hand-made rows tensor from reading out of bounds).
__device__ __forceinline__ bool row_ok(const int64_t* row, int64_t N, int64_t V, int64_t D) {
  const int64_t seg = row[0];
  if (seg < 0 || seg >= N * 3 * D) return false;
  const int64_t kind = seg % 3;
  for (int c = 1; c <= 4; ++c) {
    const bool used = kind == 0 || (kind == 1 && c <= 2) || (kind == 2 && c >= 3);
    if (used && (row[c] < 0 || row[c] >= V)) return false;
  }
  return true;
}

template <typename T>
__global__ void loss_rows_kernel(const T* __restrict__ pred, const T* __restrict__ target,
                                 const int64_t* __restrict__ rows, const double* __restrict__ w, T* __restrict__ loss,
                                 int64_t N, int64_t V, int64_t P, int64_t D) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= P) return;
  const int64_t* row = rows + 5 * r;
  if (!row_ok(row, N, V, D)) return;
  const int64_t n = row[0] / (3 * D);
  const T l = row_loss<T>(row, pred + n * V, target + n * V, w, D);
  atomicAdd(loss + n, l);
}

template <typename T>
__global__ void loss_rows_backward_kernel(const T* __restrict__ grad, const T* __restrict__ pred,
                                          const T* __restrict__ target, const int64_t* __restrict__ rows,
                                          const double* __restrict__ w, T* __restrict__ grad_pred, int64_t N,
                                          int64_t V, int64_t P, int64_t D) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= P) return;
  const int64_t* row = rows + 5 * r;
  if (!row_ok(row, N, V, D)) return;
  const int64_t n = row[0] / (3 * D);
  T d0, d1;
  if (!row_grad<T>(row, pred + n * V, target + n * V, w, D, d0, d1)) return;
  const T g = grad[n];
  atomicAdd(grad_pred + n * V + row[1], g * d0);
  atomicAdd(grad_pred + n * V + row[2], g * d1);
}

struct Args {
  int64_t N, V, P, D;
};

Args check_args(const Tensor& pred, const Tensor& target, const Tensor& rows, const Tensor& weights, const char* op) {
  check_device(pred, true, op, "pred");
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

Tensor betti_matching_loss_rows_cuda(Tensor pred, Tensor target, Tensor rows, Tensor weights) {
  const char* op = "betti_matching_loss_rows";
  const Args a = check_args(pred, target, rows, weights, op);
  torch::stable::accelerator::DeviceGuard guard(pred.get_device_index());
  Tensor loss = torch::stable::new_zeros(pred, {a.N});
  if (a.P == 0 || a.N == 0) return loss;
  const cudaStream_t stream = current_stream(pred);
  const unsigned blocks = static_cast<unsigned>(ceil_div(a.P, kThreads));
  LF_DISPATCH_FLOAT_DOUBLE(pred.scalar_type(), op, [&] {
    loss_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), rows.const_data_ptr<int64_t>(),
        weights.const_data_ptr<double>(), loss.mutable_data_ptr<scalar_t>(), a.N, a.V, a.P, a.D);
    LF_CHECK_LAUNCH(op);
  });
  return loss;
}

Tensor betti_matching_loss_rows_backward_cuda(Tensor grad, Tensor pred, Tensor target, Tensor rows, Tensor weights) {
  const char* op = "betti_matching_loss_rows_backward";
  const Args a = check_args(pred, target, rows, weights, op);
  check_same_device(pred, grad, op, "pred", "grad");
  check_dtype(grad, pred.scalar_type(), op, "grad");
  check_contiguous(grad, op, "grad");
  STD_TORCH_CHECK(grad.numel() == a.N, op, ": grad must have one element per instance");
  torch::stable::accelerator::DeviceGuard guard(pred.get_device_index());
  Tensor gp = torch::stable::new_zeros(pred, {a.N, a.V});
  if (a.P == 0 || a.N == 0) return gp;
  const cudaStream_t stream = current_stream(pred);
  const unsigned blocks = static_cast<unsigned>(ceil_div(a.P, kThreads));
  LF_DISPATCH_FLOAT_DOUBLE(pred.scalar_type(), op, [&] {
    loss_rows_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
        rows.const_data_ptr<int64_t>(), weights.const_data_ptr<double>(), gp.mutable_data_ptr<scalar_t>(), a.N, a.V,
        a.P, a.D);
    LF_CHECK_LAUNCH(op);
  });
  return gp;
}

}  // namespace
}  // namespace betti_matching
}  // namespace lossforge

STABLE_TORCH_LIBRARY_IMPL(lossforge, CUDA, m) {
  using namespace lossforge::betti_matching;
  m.impl("betti_matching_loss_rows", TORCH_BOX(&betti_matching_loss_rows_cuda));
  m.impl("betti_matching_loss_rows_backward", TORCH_BOX(&betti_matching_loss_rows_backward_cuda));
}
