// Betti matching loss on CUDA tensors: the per-instance loss over the rows of betti_matching_pairs
// (one thread per row, atomic accumulation per instance) and its gradient (one thread per row,
// atomic scatter into the two critical pixels). The rows come from the CPU core in one transfer;
// nothing here synchronises with the host.
#include "betti_matching/betti_matching.h"
#include "betti_matching/betti_matching_host.h"
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

Tensor betti_matching_loss_rows_cuda(Tensor pred, Tensor target, Tensor rows, Tensor weights) {
  const char* op = "betti_matching_loss_rows";
  const LossArgs a = check_loss_args(pred, target, rows, weights, true, op);
  DeviceGuard guard(pred.get_device_index());
  Tensor loss = torch::stable::new_zeros(pred, {a.N});
  if (a.P == 0 || a.N == 0) return loss;
  const cudaStream_t stream = current_stream(pred);
  const unsigned blocks = static_cast<unsigned>(ceil_div(a.P, kThreads));
  LF_DISPATCH_FLOAT_DOUBLE(pred.scalar_type(), op, [&] {
    launch<loss_rows_kernel<scalar_t>>(
        blocks, kThreads, 0, stream, pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
        rows.const_data_ptr<int64_t>(),
        weights.const_data_ptr<double>(), loss.mutable_data_ptr<scalar_t>(), a.N, a.V, a.P, a.D);
  });
  return loss;
}

Tensor betti_matching_loss_rows_backward_cuda(Tensor grad, Tensor pred, Tensor target, Tensor rows, Tensor weights) {
  const char* op = "betti_matching_loss_rows_backward";
  const LossArgs a = check_loss_args(pred, target, rows, weights, true, op);
  check_loss_grad(grad, pred, a, op);
  DeviceGuard guard(pred.get_device_index());
  Tensor gp = torch::stable::new_zeros(pred, {a.N, a.V});
  if (a.P == 0 || a.N == 0) return gp;
  const cudaStream_t stream = current_stream(pred);
  const unsigned blocks = static_cast<unsigned>(ceil_div(a.P, kThreads));
  LF_DISPATCH_FLOAT_DOUBLE(pred.scalar_type(), op, [&] {
    launch<loss_rows_backward_kernel<scalar_t>>(
        blocks, kThreads, 0, stream, grad.const_data_ptr<scalar_t>(), pred.const_data_ptr<scalar_t>(),
        target.const_data_ptr<scalar_t>(),
        rows.const_data_ptr<int64_t>(), weights.const_data_ptr<double>(), gp.mutable_data_ptr<scalar_t>(), a.N, a.V,
        a.P, a.D);
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
