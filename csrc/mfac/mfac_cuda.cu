// M-FAC CUDA kernels (spec: shared/specs/mfac.md). Simple by design (tested on the CPU by the CUDA executor,
// on a GPU by tools/gpu_check.sh):
//   pass 1  one block per tile of kCudaTile columns: the block stages its slice of x (plus the weight
//           decay, and the insertion into G's row) in shared memory, then each warp takes rows i of G
//           and writes the partial dot product of its tile; a second kernel sums the tiles per row in
//           float64, in tile order (deterministic).
//   pass 2  one thread per column: acc = sum_i b_i G[i, j] (coalesced across the warp for every row),
//           then the epilogue (y = beta x + alpha acc, or the optimizer update).
//   the O(m^2) "replace the oldest gradient" factor update: one block, a loop over the rows with the
//           columns spread over the threads.
// Lists of tensors (the optimizer's parameters) are handled with one launch per tensor. Everything runs
// on the current stream; nothing synchronises the host.
#include "common/cuda_utils.cuh"
#include "mfac/mfac.h"
#include "mfac/mfac_host.h"

namespace lossforge {
namespace mfac {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Pass 1 over the n columns starting at G (row stride ld): partial[(tile0 + blockIdx.x) * m + i] =
// G[i, tile] . x_tile with x = xv + wd * p (p optional); when row_out is given, G's row is first set to x
// (stored dtype) and the stored values are used. G is not __restrict__: row_out points into it, and the
// block reads that row back after the barrier (so no read-only-cache loads of G here).
template <typename S, typename A>
__global__ void pass1_kernel(const S* G, int64_t ld, int64_t m, int64_t n, const A* __restrict__ xv,
                             const A* __restrict__ p, A wd, S* row_out, A* __restrict__ partial, int64_t tile0) {
  LF_SHARED(A[kCudaTile], xs);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kCudaTile;
  const int len = static_cast<int>(min(static_cast<int64_t>(kCudaTile), n - c0));
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    A v = xv[c0 + j];
    if (p != nullptr) v = add_mul(v, wd, p[c0 + j]);
    if (row_out != nullptr) {
      const S sv = store_value(v, row_out);
      row_out[c0 + j] = sv;
      v = static_cast<A>(load(sv));
    }
    xs[j] = v;
  }
  __syncthreads();  // the tile of x, and G's new row, are visible to the whole block
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  A* out = partial + (tile0 + blockIdx.x) * m;
  for (int64_t i = warp; i < m; i += kWarps) {
    const S* gi = G + i * ld + c0;
    A acc = 0;
    for (int j = lane; j < len; j += 32) acc += static_cast<A>(load(gi[j])) * xs[j];
    acc = warp_sum(acc);
    if (lane == 0) out[i] = acc;
  }
}

// out[i] = sum over tiles of partial[t * m + i], in float64 and in tile order.
template <typename A, typename O>
__global__ void reduce_tiles_kernel(const A* __restrict__ partial, int64_t ntiles, int64_t m, O* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= m) return;
  double s = 0.0;
  for (int64_t t = 0; t < ntiles; ++t) s += static_cast<double>(partial[t * m + i]);
  out[i] = static_cast<O>(s);
}

// acc = sum_i b_i G[i, j] for one column j (four independent partial sums, fixed order).
template <typename S, typename A>
__device__ __forceinline__ A column_dot(const S* __restrict__ G, int64_t ld, int64_t m, const A* __restrict__ b,
                                        int64_t j) {
  A a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    a0 += b[i] * static_cast<A>(load(G[i * ld + j]));
    a1 += b[i + 1] * static_cast<A>(load(G[(i + 1) * ld + j]));
    a2 += b[i + 2] * static_cast<A>(load(G[(i + 2) * ld + j]));
    a3 += b[i + 3] * static_cast<A>(load(G[(i + 3) * ld + j]));
  }
  for (; i < m; ++i) a0 += b[i] * static_cast<A>(load(G[i * ld + j]));
  return (a0 + a1) + (a2 + a3);
}

// Pass 2 for an IHVP: y = beta x + alpha G^T b (x optional).
template <typename S, typename A>
__global__ void gemv_t_kernel(const S* __restrict__ G, int64_t ld, int64_t m, int64_t n, const A* __restrict__ b,
                              const A* __restrict__ x, A alpha, A beta, A* __restrict__ y) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const A acc = column_dot(G, ld, m, b, j);
    y[j] = (x != nullptr ? beta * x[j] : A(0)) + alpha * acc;
  }
}

// Pass 2 of an optimizer step over one parameter tensor (its columns start at G).
template <typename S, typename A>
__global__ void step_kernel(const S* __restrict__ G, int64_t ld, int64_t m, int64_t n, const A* __restrict__ b,
                            const A* __restrict__ grad, A* __restrict__ p, A* __restrict__ v, A alpha, A beta,
                            A lr, A wd, A mu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const S* tag = nullptr;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const A acc = column_dot(G, ld, m, b, j);
    const A pj = p[j];
    const A y = beta * stored(add_mul(grad[j], wd, pj), tag) + alpha * acc;
    A u = y;
    if (v != nullptr) {
      u = mu * v[j] + (A(1) - mu) * y;
      v[j] = u;
    }
    p[j] = pj - lr * u;
  }
}

// The factor update of mfac_chol_replace_oldest_ (see mfac_cpu.cpp), one block. ws: 2 (n - 1) doubles.
__global__ void chol_replace_oldest_kernel(double* U, const double* __restrict__ k, double shift, int64_t n,
                                           double* __restrict__ ws, double* __restrict__ piv_out) {
  LF_SHARED(double, ww);
  double* u = ws;           // u[j] pairs with old column j + 1
  double* kv = ws + n - 1;  // right-hand side of the forward substitution
  for (int64_t j = threadIdx.x; j + 1 < n; j += blockDim.x) {
    u[j] = U[j + 1];
    kv[j] = k[j];
  }
  if (threadIdx.x == 0) ww = 0.0;
  __syncthreads();
  for (int64_t r = 0; r + 1 < n; ++r) {
    const double* src = U + (r + 1) * n + 1;  // old row r + 1, old column j + 1 at [j]
    double* dst = U + r * n;                  // new row r
    const double rkk = src[r], ur = u[r];
    const double rr = hypot(rkk, ur);
    const double c = rr / rkk, s = ur / rkk, inv_c = rkk / rr, wr = kv[r] / rr;
    // No barrier here: this iteration writes u[j], kv[j] only for j > r (each by the thread that reads it),
    // and row r of U, which no thread reads in this iteration.
    for (int64_t j = r + 1 + threadIdx.x; j + 1 < n; j += blockDim.x) {
      const double nr = (src[j] + s * u[j]) * inv_c;
      u[j] = c * u[j] - s * nr;
      kv[j] -= nr * wr;
      dst[j] = nr;
    }
    for (int64_t j = threadIdx.x; j < r; j += blockDim.x) dst[j] = 0.0;
    if (threadIdx.x == 0) {
      dst[r] = rr;
      dst[n - 1] = wr;
      ww += wr * wr;
    }
    __syncthreads();  // u[r + 1], kv[r + 1] and row r + 2 of U are read by every thread in the next iteration
  }
  for (int64_t j = threadIdx.x; j + 1 < n; j += blockDim.x) U[(n - 1) * n + j] = 0.0;
  if (threadIdx.x == 0) {
    const double piv = k[n - 1] + shift - ww;
    U[(n - 1) * n + n - 1] = piv > 0.0 ? sqrt(piv) : 0.0;
    piv_out[0] = piv;
  }
}

template <typename F>
void dispatch_storage(ScalarType s, F&& f) {
  switch (s) {
    case ScalarType::Float: f(static_cast<float*>(nullptr)); break;
    case ScalarType::Double: f(static_cast<double*>(nullptr)); break;
    default: f(static_cast<uint16_t*>(nullptr)); break;  // bfloat16 (checked before)
  }
}

int pass2_blocks(int64_t n) { return static_cast<int>(std::min<int64_t>(ceil_div(n, kThreads), 1 << 16)); }

Tensor mfac_gemv_cuda(Tensor G, Tensor x) {
  const char* op = "mfac_gemv";
  const ScalarType A_t = check_buffer(G, true, op);
  const int64_t m = G.size(0), d = G.size(1);
  check_vector_tensor(x, true, A_t, op, "x");
  check_same_device(G, x, op, "G", "x");
  const int64_t V = vector_count(x, d, op, "x");
  std::vector<int64_t> shape;
  if (x.dim() == 2) shape.push_back(V);
  shape.push_back(m);
  Tensor out = torch::stable::new_empty(x, shape, A_t);
  if (out.numel() == 0) return out;
  if (d == 0) {
    torch::stable::zero_(out);
    return out;
  }
  DeviceGuard guard(G.get_device_index());
  cudaStream_t stream = current_stream(G);
  const int64_t ntiles = ceil_div(d, kCudaTile);
  Tensor partial = torch::stable::new_empty(x, {ntiles, m}, A_t);
  dispatch_storage(G.scalar_type(), [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    using A = typename Compute<S>::type;
    const S* g = static_cast<const S*>(G.const_data_ptr());
    A* part = partial.mutable_data_ptr<A>();
    for (int64_t v = 0; v < V; ++v) {  // one pass over G per vector (keeps the kernel simple)
      launch<pass1_kernel<S, A>>(
          static_cast<unsigned>(ntiles), kThreads, 0, stream, g, G.stride(0), m, d, x.const_data_ptr<A>() + v * d,
          nullptr, A(0), nullptr, part, 0);
      launch<reduce_tiles_kernel<A, A>>(
          static_cast<unsigned>(ceil_div(m, kThreads)), kThreads, 0, stream, part, ntiles, m,
          out.mutable_data_ptr<A>() + v * m);
    }
  });
  return out;
}

Tensor mfac_gemv_t_cuda(Tensor G, Tensor b, std::optional<Tensor> x, double alpha, double beta) {
  const char* op = "mfac_gemv_t";
  const ScalarType A_t = check_buffer(G, true, op);
  const int64_t m = G.size(0), d = G.size(1);
  check_vector_tensor(b, true, A_t, op, "b");
  check_same_device(G, b, op, "G", "b");
  const int64_t V = vector_count(b, m, op, "b");
  if (x.has_value()) {
    check_vector_tensor(*x, true, A_t, op, "x");
    check_same_device(G, *x, op, "G", "x");
    STD_TORCH_CHECK(x->dim() == b.dim() && vector_count(*x, d, op, "x") == V, op,
                    ": x must be [d] or [k, d] matching b's [m] or [k, m]");
  }
  std::vector<int64_t> shape;
  if (b.dim() == 2) shape.push_back(V);
  shape.push_back(d);
  Tensor out = torch::stable::new_empty(b, shape, A_t);
  if (out.numel() == 0) return out;
  DeviceGuard guard(G.get_device_index());
  cudaStream_t stream = current_stream(G);
  dispatch_storage(G.scalar_type(), [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    using A = typename Compute<S>::type;
    const S* g = static_cast<const S*>(G.const_data_ptr());
    for (int64_t v = 0; v < V; ++v) {
      launch<gemv_t_kernel<S, A>>(
          pass2_blocks(d), kThreads, 0, stream, g, G.stride(0), m, d, b.const_data_ptr<A>() + v * m,
          x.has_value() ? x->const_data_ptr<A>() + v * d : nullptr,
          static_cast<A>(alpha), static_cast<A>(beta), out.mutable_data_ptr<A>() + v * d);
    }
  });
  return out;
}

Tensor mfac_insert_gemv_cuda(Tensor G, int64_t row, std::vector<Tensor> grads, std::vector<Tensor> params,
                             double weight_decay) {
  const char* op = "mfac_insert_gemv_";
  const ScalarType A_t = check_buffer(G, true, op);
  const int64_t m = G.size(0), d = G.size(1);
  STD_TORCH_CHECK(row >= 0 && row < m, op, ": row ", row, " is out of range for a buffer of m = ", m, " rows");
  const std::vector<int64_t> sizes = check_list(grads, true, A_t, d, op, "grads");
  for (const Tensor& t : grads) check_same_device(G, t, op, "G", "grads");
  const bool wd = !params.empty();
  if (wd) {
    check_params_like(params, sizes, true, A_t, op, "params");
    for (const Tensor& t : params) check_same_device(G, t, op, "G", "params");
  }
  Tensor out = torch::stable::new_empty(G, {m}, ScalarType::Double);
  int64_t ntiles = 0;
  for (int64_t n : sizes) ntiles += ceil_div(n, kCudaTile);
  if (ntiles == 0) {
    torch::stable::zero_(out);
    return out;
  }
  DeviceGuard guard(G.get_device_index());
  cudaStream_t stream = current_stream(G);
  Tensor partial = torch::stable::new_empty(G, {ntiles, m}, A_t);
  dispatch_storage(G.scalar_type(), [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    using A = typename Compute<S>::type;
    S* g = static_cast<S*>(G.mutable_data_ptr());
    const int64_t ld = G.stride(0);
    A* part = partial.mutable_data_ptr<A>();
    int64_t col = 0, tile0 = 0;
    for (size_t t = 0; t < grads.size(); ++t) {
      const int64_t n = sizes[t];
      const int64_t tiles = ceil_div(n, kCudaTile);
      if (tiles > 0) {
        launch<pass1_kernel<S, A>>(
            static_cast<unsigned>(tiles), kThreads, 0, stream, g + col, ld, m, n, grads[t].const_data_ptr<A>(),
            wd ? params[t].const_data_ptr<A>() : nullptr,
            static_cast<A>(weight_decay), g + row * ld + col, part, tile0);
      }
      col += n;
      tile0 += tiles;
    }
    launch<reduce_tiles_kernel<A, double>>(
        static_cast<unsigned>(ceil_div(m, kThreads)), kThreads, 0, stream, part, ntiles, m,
        out.mutable_data_ptr<double>());
  });
  return out;
}

void mfac_step_cuda(Tensor G, Tensor b, std::vector<Tensor> params, std::vector<Tensor> grads,
                    std::optional<Tensor> momentum_buffer, double alpha, double beta, double lr, double weight_decay,
                    double momentum) {
  const char* op = "mfac_step_";
  const ScalarType A_t = check_buffer(G, true, op);
  const int64_t m = G.size(0), d = G.size(1);
  check_vector_tensor(b, true, A_t, op, "b");
  check_same_device(G, b, op, "G", "b");
  STD_TORCH_CHECK(b.dim() == 1 && b.size(0) == m, op, ": b must have shape [m] = [", m, "]");
  const std::vector<int64_t> sizes = check_list(grads, true, A_t, d, op, "grads");
  check_params_like(params, sizes, true, A_t, op, "params");
  for (size_t t = 0; t < grads.size(); ++t) {
    check_same_device(G, grads[t], op, "G", "grads");
    check_same_device(G, params[t], op, "G", "params");
  }
  STD_TORCH_CHECK(momentum >= 0.0 && momentum < 1.0, op, ": momentum must be in [0, 1), got ", momentum);
  if (momentum > 0.0) {
    STD_TORCH_CHECK(momentum_buffer.has_value(), op, ": momentum > 0 needs a momentum_buffer");
  }
  if (momentum_buffer.has_value()) {
    check_vector_tensor(*momentum_buffer, true, A_t, op, "momentum_buffer");
    check_same_device(G, *momentum_buffer, op, "G", "momentum_buffer");
    STD_TORCH_CHECK(momentum_buffer->numel() == d, op, ": momentum_buffer must have d = ", d, " elements");
  }
  if (d == 0) return;
  DeviceGuard guard(G.get_device_index());
  cudaStream_t stream = current_stream(G);
  dispatch_storage(G.scalar_type(), [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    using A = typename Compute<S>::type;
    const S* g = static_cast<const S*>(G.const_data_ptr());
    A* vp = momentum > 0.0 ? momentum_buffer->mutable_data_ptr<A>() : nullptr;
    int64_t col = 0;
    for (size_t t = 0; t < grads.size(); ++t) {
      const int64_t n = sizes[t];
      if (n > 0) {
        launch<step_kernel<S, A>>(
            pass2_blocks(n), kThreads, 0, stream, g + col, G.stride(0), m, n, b.const_data_ptr<A>(),
            grads[t].const_data_ptr<A>(),
            params[t].mutable_data_ptr<A>(), vp ? vp + col : nullptr, static_cast<A>(alpha), static_cast<A>(beta),
            static_cast<A>(lr), static_cast<A>(weight_decay), static_cast<A>(momentum));
      }
      col += n;
    }
  });
}

Tensor mfac_chol_replace_oldest_cuda(Tensor U, Tensor k, double shift) {
  const char* op = "mfac_chol_replace_oldest_";
  check_device(U, true, op, "U");
  check_dtype(U, ScalarType::Double, op, "U");
  check_contiguous(U, op, "U");
  STD_TORCH_CHECK(U.dim() == 2 && U.size(0) == U.size(1) && U.size(0) >= 1, op, ": U must be square [n, n], n >= 1");
  const int64_t n = U.size(0);
  check_device(k, true, op, "k");
  check_same_device(U, k, op, "U", "k");
  check_dtype(k, ScalarType::Double, op, "k");
  check_contiguous(k, op, "k");
  STD_TORCH_CHECK(k.dim() == 1 && k.size(0) == n, op, ": k must have shape [n] = [", n, "]");
  DeviceGuard guard(U.get_device_index());
  cudaStream_t stream = current_stream(U);
  Tensor piv = torch::stable::new_empty(U, {1}, ScalarType::Double);
  Tensor ws = torch::stable::new_empty(U, {std::max<int64_t>(2 * (n - 1), 1)}, ScalarType::Double);
  launch<chol_replace_oldest_kernel>(1, kThreads, 0, stream, U.mutable_data_ptr<double>(), k.const_data_ptr<double>(),
                                     shift, n, ws.mutable_data_ptr<double>(), piv.mutable_data_ptr<double>());
  return piv;
}

}  // namespace
}  // namespace mfac
}  // namespace lossforge

STABLE_TORCH_LIBRARY_IMPL(lossforge, CUDA, m) {
  using namespace lossforge::mfac;
  m.impl("mfac_gemv", TORCH_BOX(&mfac_gemv_cuda));
  m.impl("mfac_gemv_t", TORCH_BOX(&mfac_gemv_t_cuda));
  m.impl("mfac_insert_gemv_", TORCH_BOX(&mfac_insert_gemv_cuda));
  m.impl("mfac_step_", TORCH_BOX(&mfac_step_cuda));
  m.impl("mfac_chol_replace_oldest_", TORCH_BOX(&mfac_chol_replace_oldest_cuda));
}
