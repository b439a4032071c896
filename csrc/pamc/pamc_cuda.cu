// PamC CUDA kernels (spec: shared/specs/pamc.md; math in pamc.h). Kept simple on purpose:
// - one warp per row for the CSR walks (forward, backward pass 1) and one warp per column for the
//   transposed walk (backward pass 2): each lane owns the feature columns lane, lane + 32, ...; a row's
//   dot products are warp shuffles, its online log-sum-exp state lives (identically) in every lane;
// - meta-nodes by atomicAdd (one thread per element; the summation order is not deterministic);
// - the tiled pairwise loss: the same host loop over blocks of rows and columns as the CPU kernel, the
//   similarity tile from cuBLAS (aten::mm.out into one reused buffer), one warp per tile row for the
//   online log-sum-exp, one thread per tile element for the backward's weights.
// Nothing here synchronises with the host. Values the CPU kernels reject (node indices out of range,
// negative weights, labels out of range) cannot raise here without a sync: Python validates them when a
// graph is prepared, and the kernels skip such entries rather than read out of bounds.
#include <algorithm>
#include <cmath>

#include "common/cuda_utils.cuh"
#include "pamc/pamc.h"
#include "pamc/pamc_mm.h"

namespace lossforge {
namespace pamc {
namespace {

constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_min(T v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = min(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// u_i . u_j over d features, summed across the warp (every lane gets the sum).
template <typename T>
__device__ __forceinline__ T warp_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t d, int lane) {
  T s = 0;
  for (int64_t k = lane; k < d; k += 32) s += a[k] * b[k];
  return warp_sum(s);
}

__device__ __forceinline__ int64_t warp_row() {
  return (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
}

unsigned warp_grid(int64_t rows) { return (unsigned)ceil_div(std::max<int64_t>(rows, 1), kWarpsPerBlock); }
unsigned elem_grid(int64_t n) { return (unsigned)std::min<int64_t>(ceil_div(std::max<int64_t>(n, 1), kBlock), 65535); }

// Offsets of row i clamped into [0, nnz], so a corrupt rowptr cannot send a walk out of bounds.
__device__ __forceinline__ void row_range(const int64_t* __restrict__ ptr, int64_t i, int64_t nnz, int64_t& b,
                                          int64_t& e) {
  b = min(max(ptr[i], (int64_t)0), nnz);
  e = min(max(ptr[i + 1], b), nnz);
}

// ---- kernels ---------------------------------------------------------------------------------------

template <typename T>
__global__ void normalize_kernel(const T* __restrict__ z, T* __restrict__ u, T* __restrict__ inv, int64_t n,
                                 int64_t d) {
  const int64_t i = warp_row();
  const int lane = threadIdx.x % 32;
  if (i >= n) return;  // whole warps leave together: i is the same in every lane
  const T* zi = z + i * d;
  const T nrm = sqrt(warp_dot(zi, zi, d, lane));
  const T iv = T(1) / max(nrm, T(kNormEps));
  for (int64_t k = lane; k < d; k += 32) u[i * d + k] = zi[k] * iv;
  if (lane == 0) inv[i] = iv;
}

template <typename T>
__global__ void positive_forward_kernel(const T* __restrict__ u, int64_t n, int64_t d,
                                        const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                                        const T* __restrict__ w, int64_t nnz, double tau, double eps,
                                        T* __restrict__ lse) {
  const int64_t i = warp_row();
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  int64_t pb, pe;
  row_range(rowptr, i, nnz, pb, pe);
  const T* ui = u + i * d;
  OnlineLSE s;
  s.init();
  for (int64_t p = pb; p < pe; ++p) {
    const int64_t j = col[p];
    const T wp = w[p];
    if (j < 0 || j >= n || !(wp > T(0))) continue;
    const double x = j == i ? 0.0 : tau * static_cast<double>(warp_dot(ui, u + j * d, d, lane));
    s.add(x, static_cast<double>(wp));
  }
  if (lane == 0) lse[i] = static_cast<T>(log_plus_eps(s.value(), eps));
}

// Backward pass 1 (rows): c_p and gu_i (= or +=) sum_p c_p u_j.
template <typename T>
__global__ void positive_backward_rows_kernel(const T* __restrict__ u, int64_t n, int64_t d,
                                              const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                                              const T* __restrict__ w, int64_t nnz, const T* __restrict__ grad,
                                              const T* __restrict__ lse, double tau, T* __restrict__ c,
                                              T* __restrict__ gu, bool accumulate) {
  const int64_t i = warp_row();
  const int lane = threadIdx.x % 32;
  if (i >= n) return;
  T* gi = gu + i * d;
  if (!accumulate)
    for (int64_t k = lane; k < d; k += 32) gi[k] = T(0);
  int64_t pb, pe;
  row_range(rowptr, i, nnz, pb, pe);
  const T* ui = u + i * d;
  const double gscale = static_cast<double>(grad[i]) * tau;
  const double li = static_cast<double>(lse[i]);
  const bool live = gscale != 0.0 && li != -INFINITY;
  for (int64_t p = pb; p < pe; ++p) {
    const int64_t j = col[p];
    const T wp = w[p];
    if (!live || j == i || !(wp > T(0)) || j < 0 || j >= n) {
      if (lane == 0) c[p] = T(0);
      continue;
    }
    const T* uj = u + j * d;
    const double x = tau * static_cast<double>(warp_dot(ui, uj, d, lane));
    const T cp = static_cast<T>(gscale * static_cast<double>(wp) * exp(x - li));
    if (lane == 0) c[p] = cp;
    for (int64_t k = lane; k < d; k += 32) gi[k] += cp * uj[k];
  }
}

// Backward pass 2 (columns, transposed list): gu_j += sum c_p u_i, then gz_j = inv_j (gu_j - (gu_j.u_j) u_j)
// (inv_j gu_j for a clamped row). gz may alias gu.
template <typename T>
__global__ void positive_backward_cols_kernel(const T* __restrict__ u, const T* __restrict__ inv, int64_t n, int64_t d,
                                              const int64_t* __restrict__ colptr, const int64_t* __restrict__ trow,
                                              const int64_t* __restrict__ tedge, int64_t nnz, const T* __restrict__ c,
                                              T* gu, T* gz) {
  const int64_t j = warp_row();
  const int lane = threadIdx.x % 32;
  if (j >= n) return;
  T* gj = gu + j * d;
  int64_t qb, qe;
  row_range(colptr, j, nnz, qb, qe);
  for (int64_t q = qb; q < qe; ++q) {
    const int64_t p = tedge[q], i = trow[q];
    if (p < 0 || p >= nnz || i < 0 || i >= n) continue;
    const T cp = c[p];
    if (cp == T(0)) continue;
    const T* ui = u + i * d;
    for (int64_t k = lane; k < d; k += 32) gj[k] += cp * ui[k];
  }
  // each lane reads back only the features it wrote (k = lane, lane + 32, ...): no __syncwarp needed
  const T* uj = u + j * d;
  const T iv = inv[j];
  const T clamped = T(1) / T(kNormEps);
  const T proj = iv < clamped ? warp_dot(gj, uj, d, lane) : T(0);
  for (int64_t k = lane; k < d; k += 32) gz[j * d + k] = iv * (gj[k] - proj * uj[k]);
}

template <typename T>
__global__ void segment_sum_kernel(const T* __restrict__ z, const int64_t* __restrict__ labels, int64_t n, int64_t d,
                                   int64_t k, T* __restrict__ sums, unsigned long long* __restrict__ counts) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n * d; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = e / d, f = e % d;
    const int64_t a = labels[i];
    if (a < 0 || a >= k) continue;  // rejected in Python; never written out of bounds
    atomicAdd(sums + a * d + f, z[e]);
    if (f == 0) atomicAdd(counts + a, 1ull);
  }
}

// counts for d == 0 (no element to carry them)
__global__ void count_kernel(const int64_t* __restrict__ labels, int64_t n, int64_t k,
                             unsigned long long* __restrict__ counts) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t a = labels[i];
    if (a >= 0 && a < k) atomicAdd(counts + a, 1ull);
  }
}

// ---- tiled pairwise kernels ----------------------------------------------------------------------------

__global__ void lse_init_kernel(double* __restrict__ m, double* __restrict__ l, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    m[i] = -INFINITY;
    l[i] = 0.0;
  }
}

// One warp per row of a [rr, cc] similarity tile (rows r0.., columns c0..): masks s_ii, merges the tile's
// sum of exp(tau s) into the row's online state.
template <typename T>
__global__ void tile_lse_kernel(T* __restrict__ s, int64_t rr, int64_t cc, int64_t r0, int64_t c0, double tau,
                                bool fixed, double* __restrict__ m, double* __restrict__ l) {
  const int64_t r = warp_row();
  const int lane = threadIdx.x % 32;
  if (r >= rr) return;
  const int64_t i = r0 + r;
  T* srow = s + r * cc;
  if (lane == 0 && i >= c0 && i < c0 + cc) srow[i - c0] = T(0);
  __syncwarp();
  const T tt = static_cast<T>(tau);
  T mx = fabs(tt);
  if (!fixed) {
    T lo = srow[0], hi = srow[0];
    for (int64_t c = lane; c < cc; c += 32) {
      lo = min(lo, srow[c]);
      hi = max(hi, srow[c]);
    }
    lo = warp_min(lo);
    hi = warp_max(hi);
    mx = tt >= T(0) ? tt * hi : tt * lo;
  }
  T part = 0;
  for (int64_t c = lane; c < cc; c += 32) part += exp(tt * srow[c] - mx);
  part = warp_sum(part);
  if (lane == 0) {
    OnlineLSE st{m[i], l[i]};
    st.merge(static_cast<double>(mx), static_cast<double>(part));
    m[i] = st.m;
    l[i] = st.l;
  }
}

// loss_i and stats (log P_i, log N_i) from the two row states.
template <typename T>
__global__ void pairwise_finish_kernel(const T* __restrict__ logp, const double* __restrict__ m,
                                       const double* __restrict__ l, int64_t n, T* __restrict__ loss,
                                       T* __restrict__ stats) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const OnlineLSE st{m[i], l[i]};
    const double lp = static_cast<double>(logp[i]), ln = st.value();
    loss[i] = static_cast<T>(pairwise_row_loss(lp, ln));
    stats[2 * i] = static_cast<T>(lp);
    stats[2 * i + 1] = static_cast<T>(ln);
  }
}

// Per-row factors of the backward: alpha = g a (d loss / d log N), gamma = -alpha (d loss / d log P),
// half = log N / 2, h = e^{half}, beta = alpha / h.
template <typename T>
__global__ void pairwise_factors_kernel(const T* __restrict__ grad, const T* __restrict__ stats, int64_t n,
                                        T* __restrict__ alpha, T* __restrict__ gamma, T* __restrict__ logp,
                                        T* __restrict__ logn, T* __restrict__ half, T* __restrict__ h,
                                        T* __restrict__ beta) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const T lp = stats[2 * i], ln = stats[2 * i + 1];
    const T a = static_cast<T>(static_cast<double>(grad[i]) * pairwise_row_weight(lp, ln));
    alpha[i] = a;
    gamma[i] = -a;
    logp[i] = lp;
    logn[i] = ln;
    half[i] = ln / T(2);
    h[i] = exp(half[i]);
    beta[i] = a / h[i];
  }
}

// The backward's weight of every pair of a tile, in place over the similarities.
template <typename T>
__global__ void tile_weights_kernel(T* __restrict__ s, int64_t rr, int64_t cc, int64_t r0, int64_t c0, double tau,
                                    bool one_exp, const T* __restrict__ alpha, const T* __restrict__ logn,
                                    const T* __restrict__ half, const T* __restrict__ h, const T* __restrict__ beta) {
  const T tt = static_cast<T>(tau);
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < rr * cc; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = r0 + e / cc, j = c0 + e % cc;
    const T x = tt * s[e];
    T q;
    if (i == j) {
      q = T(0);  // s_ii is a constant
    } else if (one_exp) {
      q = tt * exp(x - half[i] - half[j]) * (beta[i] * h[j] + beta[j] * h[i]);
    } else {
      q = tt * (alpha[i] * exp(x - logn[i]) + alpha[j] * exp(x - logn[j]));
    }
    s[e] = q;
  }
}

template <typename T>
__global__ void add_rows_kernel(const T* __restrict__ src, T* __restrict__ dst, int64_t count) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < count; e += (int64_t)gridDim.x * blockDim.x)
    dst[e] += src[e];
}

// ---- host side ---------------------------------------------------------------------------------------

void check_z(const Tensor& z, const char* op) {
  check_device(z, true, op, "z");
  STD_TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D [num_nodes, dim], got ", z.dim(), "-D");
  STD_TORCH_CHECK(z.scalar_type() == ScalarType::Float || z.scalar_type() == ScalarType::Double, op,
                  ": z must be float32 or float64, got ", dtype_name(z.scalar_type()));
  check_contiguous(z, op, "z");
}

void check_vec(const Tensor& t, const Tensor& z, ScalarType dtype, int64_t size, const char* op, const char* arg) {
  check_device(t, true, op, arg);
  check_same_device(t, z, op, arg, "z");
  check_dtype(t, dtype, op, arg);
  check_contiguous(t, op, arg);
  STD_TORCH_CHECK(t.dim() == 1, op, ": ", arg, " must be 1-D");
  if (size >= 0) STD_TORCH_CHECK(t.size(0) == size, op, ": ", arg, " must have ", size, " entries, got ", t.size(0));
}

// Shapes, dtypes and devices of the CSR and transposed lists (their values are validated in Python).
int64_t check_graph(const Tensor& z, const Tensor& rowptr, const Tensor& col, const Tensor& weight,
                    const Tensor& colptr, const Tensor& trow, const Tensor& tedge, const char* op) {
  const int64_t n = z.size(0);
  check_vec(col, z, ScalarType::Long, -1, op, "col");
  const int64_t nnz = col.size(0);
  check_vec(rowptr, z, ScalarType::Long, n + 1, op, "rowptr");
  check_vec(weight, z, z.scalar_type(), nnz, op, "weight");
  check_vec(colptr, z, ScalarType::Long, n + 1, op, "colptr");
  check_vec(trow, z, ScalarType::Long, nnz, op, "trow");
  check_vec(tedge, z, ScalarType::Long, nnz, op, "tedge");
  return nnz;
}

constexpr double kFixedShiftTau = 40.0;

template <typename T>
bool one_exp_backward(double tau, int64_t n) {
  const double limit = std::is_same<T, float>::value ? 150.0 : 1300.0;
  return std::fabs(tau) + std::log(static_cast<double>(n) + 1.0) < limit;
}

std::tuple<Tensor, Tensor, Tensor> pamc_positive_cuda(Tensor z, Tensor rowptr, Tensor col, Tensor weight,
                                                      Tensor colptr, Tensor trow, Tensor tedge, double tau,
                                                      double eps) {
  const char* op = "pamc_positive";
  check_z(z, op);
  STD_TORCH_CHECK(std::isfinite(tau), op, ": tau must be finite, got ", tau);
  STD_TORCH_CHECK(eps >= 0.0, op, ": eps must be non-negative, got ", eps);
  const int64_t nnz = check_graph(z, rowptr, col, weight, colptr, trow, tedge, op);
  const int64_t n = z.size(0), d = z.size(1);
  DeviceGuard guard(z.get_device_index());
  Tensor lse = torch::stable::new_empty(z, {n});
  Tensor u = torch::stable::empty_like(z);
  Tensor inv = torch::stable::new_empty(z, {n});
  if (n == 0) return {lse, u, inv};
  cudaStream_t stream = current_stream(z);
  LF_DISPATCH_FLOAT_DOUBLE(z.scalar_type(), op, [&] {
    launch<normalize_kernel<scalar_t>>(warp_grid(n), kBlock, 0, stream,
        z.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(), inv.mutable_data_ptr<scalar_t>(), n, d);
    launch<positive_forward_kernel<scalar_t>>(warp_grid(n), kBlock, 0, stream,
        u.const_data_ptr<scalar_t>(), n, d, rowptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
        weight.const_data_ptr<scalar_t>(), nnz, tau, eps, lse.mutable_data_ptr<scalar_t>());
  });
  return {lse, u, inv};
}

Tensor pamc_positive_backward_cuda(Tensor grad, Tensor u, Tensor inv, Tensor rowptr, Tensor col, Tensor weight,
                                   Tensor colptr, Tensor trow, Tensor tedge, Tensor lse, double tau) {
  const char* op = "pamc_positive_backward";
  check_z(u, op);
  const int64_t n = u.size(0), d = u.size(1);
  check_vec(grad, u, u.scalar_type(), n, op, "grad");
  check_vec(inv, u, u.scalar_type(), n, op, "inv");
  check_vec(lse, u, u.scalar_type(), n, op, "lse");
  const int64_t nnz = check_graph(u, rowptr, col, weight, colptr, trow, tedge, op);
  DeviceGuard guard(u.get_device_index());
  Tensor gz = torch::stable::empty_like(u);
  if (n == 0) return gz;
  Tensor c = torch::stable::new_empty(u, {std::max<int64_t>(nnz, 1)});
  cudaStream_t stream = current_stream(u);
  LF_DISPATCH_FLOAT_DOUBLE(u.scalar_type(), op, [&] {
    scalar_t* gzp = gz.mutable_data_ptr<scalar_t>();
    launch<positive_backward_rows_kernel<scalar_t>>(warp_grid(n), kBlock, 0, stream,
        u.const_data_ptr<scalar_t>(), n, d, rowptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
        weight.const_data_ptr<scalar_t>(), nnz, grad.const_data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(), tau,
        c.mutable_data_ptr<scalar_t>(), gzp, false);
    launch<positive_backward_cols_kernel<scalar_t>>(warp_grid(n), kBlock, 0, stream,
        u.const_data_ptr<scalar_t>(), inv.const_data_ptr<scalar_t>(), n, d, colptr.const_data_ptr<int64_t>(),
        trow.const_data_ptr<int64_t>(), tedge.const_data_ptr<int64_t>(), nnz, c.const_data_ptr<scalar_t>(), gzp, gzp);
  });
  return gz;
}

std::tuple<Tensor, Tensor> pamc_segment_sum_cuda(Tensor z, Tensor labels, int64_t num_segments) {
  const char* op = "pamc_segment_sum";
  check_z(z, op);
  const int64_t n = z.size(0), d = z.size(1), k = num_segments;
  check_vec(labels, z, ScalarType::Long, n, op, "labels");
  STD_TORCH_CHECK(k >= 0, op, ": num_segments must be non-negative, got ", k);
  DeviceGuard guard(z.get_device_index());
  Tensor sums = torch::stable::new_zeros(z, {k, d});
  Tensor counts = torch::stable::new_zeros(labels, {k});
  if (n == 0 || k == 0) return {sums, counts};
  cudaStream_t stream = current_stream(z);
  // int64 counts through the unsigned 64-bit atomicAdd (same bits for non-negative values)
  auto* cnt = reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>());
  LF_DISPATCH_FLOAT_DOUBLE(z.scalar_type(), op, [&] {
    if (d > 0)
      launch<segment_sum_kernel<scalar_t>>(elem_grid(n * d), kBlock, 0, stream,
          z.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), n, d, k, sums.mutable_data_ptr<scalar_t>(),
          cnt);
    else
      launch<count_kernel>(elem_grid(n), kBlock, 0, stream, labels.const_data_ptr<int64_t>(), n, k, cnt);
  });
  return {sums, counts};
}

struct Tiles {
  int64_t rows, cols;
};

Tiles check_tiles(int64_t block_rows, int64_t block_cols, int64_t n, const char* op) {
  STD_TORCH_CHECK(block_rows > 0 && block_cols > 0, op, ": block_rows and block_cols must be positive, got ",
                  block_rows, " and ", block_cols);
  return Tiles{std::min(block_rows, std::max<int64_t>(n, 1)), std::min(block_cols, std::max<int64_t>(n, 1))};
}

Tensor tile_view(Tensor& flat, int64_t rows, int64_t cols) {
  return torch::stable::view(torch::stable::narrow(flat, 0, 0, rows * cols), {rows, cols});
}

std::tuple<Tensor, Tensor> pairwise_contrastive_cuda(Tensor z, Tensor rowptr, Tensor col, Tensor weight,
                                                     Tensor colptr, Tensor trow, Tensor tedge, double tau,
                                                     int64_t block_rows, int64_t block_cols) {
  const char* op = "pairwise_contrastive";
  check_z(z, op);
  STD_TORCH_CHECK(std::isfinite(tau), op, ": tau must be finite, got ", tau);
  const int64_t nnz = check_graph(z, rowptr, col, weight, colptr, trow, tedge, op);
  const int64_t n = z.size(0), d = z.size(1);
  const Tiles tl = check_tiles(block_rows, block_cols, n, op);
  DeviceGuard guard(z.get_device_index());
  Tensor loss = torch::stable::new_empty(z, {n});
  Tensor stats = torch::stable::new_empty(z, {n, 2});
  if (n == 0) return {loss, stats};
  cudaStream_t stream = current_stream(z);
  Tensor u = torch::stable::empty_like(z);
  Tensor inv = torch::stable::new_empty(z, {n});
  Tensor logp = torch::stable::new_empty(z, {n});
  Tensor m = torch::stable::new_empty(z, {n}, ScalarType::Double);
  Tensor l = torch::stable::new_empty(z, {n}, ScalarType::Double);
  Tensor flat = torch::stable::new_empty(z, {tl.rows * tl.cols});
  const bool fixed = std::fabs(tau) <= kFixedShiftTau;
  LF_DISPATCH_FLOAT_DOUBLE(z.scalar_type(), op, [&] {
    launch<normalize_kernel<scalar_t>>(warp_grid(n), kBlock, 0, stream,
        z.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(), inv.mutable_data_ptr<scalar_t>(), n, d);
    launch<positive_forward_kernel<scalar_t>>(warp_grid(n), kBlock, 0, stream,
        u.const_data_ptr<scalar_t>(), n, d, rowptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
        weight.const_data_ptr<scalar_t>(), nnz, tau, 0.0, logp.mutable_data_ptr<scalar_t>());
    launch<lse_init_kernel>(elem_grid(n), kBlock, 0, stream, m.mutable_data_ptr<double>(), l.mutable_data_ptr<double>(),
    n);
    for (int64_t r0 = 0; r0 < n; r0 += tl.rows) {
      const int64_t rr = std::min(tl.rows, n - r0);
      Tensor ur = torch::stable::narrow(u, 0, r0, rr);
      for (int64_t c0 = 0; c0 < n; c0 += tl.cols) {
        const int64_t cc = std::min(tl.cols, n - c0);
        Tensor s = tile_view(flat, rr, cc);
        mm_out(ur, torch::stable::transpose(torch::stable::narrow(u, 0, c0, cc), 0, 1), s);
        launch<tile_lse_kernel<scalar_t>>(warp_grid(rr), kBlock, 0, stream,
            s.mutable_data_ptr<scalar_t>(), rr, cc, r0, c0, tau, fixed, m.mutable_data_ptr<double>(),
            l.mutable_data_ptr<double>());
      }
    }
    launch<pairwise_finish_kernel<scalar_t>>(elem_grid(n), kBlock, 0, stream,
        logp.const_data_ptr<scalar_t>(), m.const_data_ptr<double>(), l.const_data_ptr<double>(), n,
        loss.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<scalar_t>());
  });
  return {loss, stats};
}

Tensor pairwise_contrastive_backward_cuda(Tensor grad, Tensor z, Tensor rowptr, Tensor col, Tensor weight,
                                          Tensor colptr, Tensor trow, Tensor tedge, Tensor stats, double tau,
                                          int64_t block_rows, int64_t block_cols) {
  const char* op = "pairwise_contrastive_backward";
  check_z(z, op);
  const int64_t n = z.size(0), d = z.size(1);
  check_vec(grad, z, z.scalar_type(), n, op, "grad");
  check_device(stats, true, op, "stats");
  check_same_device(stats, z, op, "stats", "z");
  check_dtype(stats, z.scalar_type(), op, "stats");
  check_contiguous(stats, op, "stats");
  STD_TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == 2, op, ": stats must have shape [", n,
                  ", 2]");
  const int64_t nnz = check_graph(z, rowptr, col, weight, colptr, trow, tedge, op);
  const Tiles tl = check_tiles(block_rows, block_cols, n, op);
  DeviceGuard guard(z.get_device_index());
  Tensor gz = torch::stable::new_zeros(z, {n, d});  // accumulates gu, then becomes gz in place
  if (n == 0) return gz;
  cudaStream_t stream = current_stream(z);
  Tensor u = torch::stable::empty_like(z);
  Tensor inv = torch::stable::new_empty(z, {n});
  Tensor factors = torch::stable::new_empty(z, {7, n});  // alpha, gamma, logp, logn, half, h, beta
  Tensor c = torch::stable::new_empty(z, {std::max<int64_t>(nnz, 1)});
  Tensor flat = torch::stable::new_empty(z, {tl.rows * tl.cols});
  Tensor tmp = torch::stable::new_empty(z, {tl.rows, std::max<int64_t>(d, 1)});
  LF_DISPATCH_FLOAT_DOUBLE(z.scalar_type(), op, [&] {
    scalar_t* f = factors.mutable_data_ptr<scalar_t>();
    scalar_t *alpha = f, *gamma = f + n, *logp = f + 2 * n, *logn = f + 3 * n, *half = f + 4 * n, *h = f + 5 * n,
             *beta = f + 6 * n;
    scalar_t* gzp = gz.mutable_data_ptr<scalar_t>();
    launch<normalize_kernel<scalar_t>>(warp_grid(n), kBlock, 0, stream,
        z.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(), inv.mutable_data_ptr<scalar_t>(), n, d);
    launch<pairwise_factors_kernel<scalar_t>>(elem_grid(n), kBlock, 0, stream,
        grad.const_data_ptr<scalar_t>(), stats.const_data_ptr<scalar_t>(), n, alpha, gamma, logp, logn, half, h, beta);
    const bool one_exp = one_exp_backward<scalar_t>(tau, n);
    for (int64_t r0 = 0; d > 0 && r0 < n; r0 += tl.rows) {
      const int64_t rr = std::min(tl.rows, n - r0);
      Tensor ur = torch::stable::narrow(u, 0, r0, rr);
      Tensor out = torch::stable::narrow(tmp, 0, 0, rr);
      for (int64_t c0 = 0; c0 < n; c0 += tl.cols) {
        const int64_t cc = std::min(tl.cols, n - c0);
        Tensor uc = torch::stable::narrow(u, 0, c0, cc);
        Tensor s = tile_view(flat, rr, cc);
        mm_out(ur, torch::stable::transpose(uc, 0, 1), s);
        launch<tile_weights_kernel<scalar_t>>(elem_grid(rr * cc), kBlock, 0, stream,
            s.mutable_data_ptr<scalar_t>(), rr, cc, r0, c0, tau, one_exp, alpha, logn, half, h, beta);
        mm_out(s, uc, out);
        launch<add_rows_kernel<scalar_t>>(elem_grid(rr * d), kBlock, 0, stream, out.const_data_ptr<scalar_t>(),
                                                                            gzp + r0 * d, rr * d);
      }
    }
    launch<positive_backward_rows_kernel<scalar_t>>(warp_grid(n), kBlock, 0, stream,
        u.const_data_ptr<scalar_t>(), n, d, rowptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
        weight.const_data_ptr<scalar_t>(), nnz, gamma, logp, tau, c.mutable_data_ptr<scalar_t>(), gzp, true);
    launch<positive_backward_cols_kernel<scalar_t>>(warp_grid(n), kBlock, 0, stream,
        u.const_data_ptr<scalar_t>(), inv.const_data_ptr<scalar_t>(), n, d, colptr.const_data_ptr<int64_t>(),
        trow.const_data_ptr<int64_t>(), tedge.const_data_ptr<int64_t>(), nnz, c.const_data_ptr<scalar_t>(), gzp, gzp);
  });
  return gz;
}

}  // namespace
}  // namespace pamc
}  // namespace lossforge

STABLE_TORCH_LIBRARY_IMPL(lossforge, CUDA, m) {
  using namespace lossforge::pamc;
  m.impl("pamc_positive", TORCH_BOX(&pamc_positive_cuda));
  m.impl("pamc_positive_backward", TORCH_BOX(&pamc_positive_backward_cuda));
  m.impl("pamc_segment_sum", TORCH_BOX(&pamc_segment_sum_cuda));
  m.impl("pairwise_contrastive", TORCH_BOX(&pairwise_contrastive_cuda));
  m.impl("pairwise_contrastive_backward", TORCH_BOX(&pairwise_contrastive_backward_cuda));
}
