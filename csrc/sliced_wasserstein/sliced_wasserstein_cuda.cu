// Sliced Wasserstein CUDA kernels. One block of kThreads threads owns one pair and a contiguous run of
// its slices (grid = slice chunks x pairs). Per slice the block projects both clouds, sorts them with a
// bitonic network over a power-of-two length (padding sorts last), computes W_p^p and the per-atom
// gradient coefficients, and adds the slice's gradient shares to its own partial buffers: each point
// index is written by exactly one thread per slice, so no atomics are needed and the result is
// deterministic. Small follow-up kernels sum the partial buffers in a fixed order and finish the
// per-pair values and the weight gradients.
//
// Working arrays live in shared memory when they fit (padded length up to a few thousand points) and in
// a per-block slice of a global scratch tensor otherwise; the code is the same, only the pointers differ.
// Written to be obviously correct rather than fast: plain loops, block-wide __syncthreads between
// phases, fixed-order tree reductions.
#include <climits>

#include "common/cuda_utils.cuh"
#include "sliced_wasserstein/sliced_wasserstein.h"
#include "sliced_wasserstein/sliced_wasserstein_args.h"

namespace lossforge {
namespace sliced_wasserstein {
namespace {

constexpr int kThreads = 256;  // a power of two (tree reductions)

struct Shape {
  int64_t B, N, M, d, L;
  int64_t C, Lc;  // slice chunks per pair and slices per chunk
  int Npad;       // power of two >= max(N, M)
  ProjLayout P;
  bool fast, grad_points, grad_weights, grad_projections, has_wx, has_wy;
};

// Bytes of one block's working arrays (shared or global), each array aligned to 16 bytes.
__host__ __device__ inline size_t align16(size_t n) { return (n + 15) & ~size_t(15); }

template <typename T>
__host__ __device__ inline size_t work_bytes(const Shape& s) {
  size_t b = 0;
  b += 4 * align16(sizeof(T) * s.Npad);        // kx, ky, cu, cv
  b += 2 * align16(sizeof(int) * s.Npad);      // ix, iy
  if (!s.fast) b += 4 * align16(sizeof(T) * s.Npad);  // A, Bc, dA, dB
  b += align16(sizeof(double) * kThreads);     // reductions
  return b;
}

template <typename T>
struct Work {
  T *kx, *ky, *cu, *cv;
  int *ix, *iy;
  T *A, *Bc, *dA, *dB;
  double* red;
};

template <typename T>
__device__ Work<T> carve(unsigned char* base, const Shape& s) {
  Work<T> w;
  auto take = [&](size_t bytes) {
    unsigned char* p = base;
    base += align16(bytes);
    return p;
  };
  w.kx = reinterpret_cast<T*>(take(sizeof(T) * s.Npad));
  w.ky = reinterpret_cast<T*>(take(sizeof(T) * s.Npad));
  w.cu = reinterpret_cast<T*>(take(sizeof(T) * s.Npad));
  w.cv = reinterpret_cast<T*>(take(sizeof(T) * s.Npad));
  w.ix = reinterpret_cast<int*>(take(sizeof(int) * s.Npad));
  w.iy = reinterpret_cast<int*>(take(sizeof(int) * s.Npad));
  if (!s.fast) {
    w.A = reinterpret_cast<T*>(take(sizeof(T) * s.Npad));
    w.Bc = reinterpret_cast<T*>(take(sizeof(T) * s.Npad));
    w.dA = reinterpret_cast<T*>(take(sizeof(T) * s.Npad));
    w.dB = reinterpret_cast<T*>(take(sizeof(T) * s.Npad));
  } else {
    w.A = w.Bc = w.dA = w.dB = nullptr;
  }
  w.red = reinterpret_cast<double*>(take(sizeof(double) * kThreads));
  return w;
}

// Sum of v over the block, in a fixed order; every thread gets the result.
__device__ double block_sum(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const double r = red[0];
  __syncthreads();
  return r;
}

// In-place inclusive scan of a[0..n) (reverse = suffix sums), deterministic: each thread sums a
// contiguous chunk, thread 0 scans the chunk totals, then each thread rescans its chunk from its offset
// with a float64 running sum (so the scan of non-negative weights is non-decreasing after rounding).
template <typename T>
__device__ void block_scan(T* a, int n, bool reverse, double* red) {
  const int chunk = (n + kThreads - 1) / kThreads;
  const int lo = threadIdx.x * chunk, hi = min(n, lo + chunk);
  double s = 0;
  for (int k = lo; k < hi; ++k) s += static_cast<double>(a[reverse ? n - 1 - k : k]);
  red[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double run = 0;
    for (int t = 0; t < kThreads; ++t) {
      const double v = red[t];
      red[t] = run;  // exclusive offsets
      run += v;
    }
  }
  __syncthreads();
  double run = red[threadIdx.x];
  for (int k = lo; k < hi; ++k) {
    const int i = reverse ? n - 1 - k : k;
    run += static_cast<double>(a[i]);
    a[i] = static_cast<T>(run);
  }
  __syncthreads();
}

// The projections accumulate with add_mul (common/host_device.h, never fused into an FMA): they then
// equal the CPU kernel's bit for bit (the same products and sums in the same order), so both devices
// sort every slice the same way.

// Padding carries the index kPad.
constexpr int kPad = INT_MAX;

// (key, index) order: the total order that a stable sort by key produces. Padding comes after every
// point whatever the keys: a NaN or infinite projection (not rejected on CUDA) must never move padding
// into the first N slots, whose indices address the points and their gradients.
template <typename T>
__device__ __forceinline__ bool before(T ka, int ia, T kb, int ib) {
  if (ia == kPad || ib == kPad) return ia < ib;
  return ka < kb || (ka == kb && ia < ib);
}

// Bitonic sort of both (kx, ix) and (ky, iy), n a power of two, ascending by (key, index).
template <typename T>
__device__ void bitonic_sort2(T* kx, int* ix, T* ky, int* iy, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n; i += kThreads) {
        const int p = i ^ j;
        if (p > i) {
          const bool up = (i & k) == 0;
          if (before(kx[p], ix[p], kx[i], ix[i]) == up) {
            const T tk = kx[i]; kx[i] = kx[p]; kx[p] = tk;
            const int ti = ix[i]; ix[i] = ix[p]; ix[p] = ti;
          }
          if (before(ky[p], iy[p], ky[i], iy[i]) == up) {
            const T tk = ky[i]; ky[i] = ky[p]; ky[p] = tk;
            const int ti = iy[i]; iy[i] = iy[p]; iy[p] = ti;
          }
        }
      }
      __syncthreads();
    }
  }
}

// First index in a[0..n) with a[i] > v (upper) or a[i] >= v (lower); n if none.
template <typename T>
__device__ int bound(const T* a, int n, T v, bool upper) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (upper ? !(v < a[mid]) : a[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
sw_kernel(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ wx, const T* __restrict__ wy,
          const double* __restrict__ inv_sums, const T* __restrict__ theta, Shape s, double p_,
          double* __restrict__ vals, T* __restrict__ pgx, T* __restrict__ pgy, T* __restrict__ pgwx,
          T* __restrict__ pgwy, T* __restrict__ gth, unsigned char* __restrict__ gscratch) {
  LF_DYNAMIC_SHARED(unsigned char, smem);
  const int64_t c = blockIdx.x, b = blockIdx.y;
  const int tid = threadIdx.x;
  const int64_t slot = b * s.C + c;  // this block's partial buffers
  unsigned char* base = gscratch ? gscratch + slot * work_bytes<T>(s) : smem;
  Work<T> w = carve<T>(base, s);
  const PowP<T> pw = PowP<T>::make(p_);
  const int N = static_cast<int>(s.N), M = static_cast<int>(s.M), d = static_cast<int>(s.d), n2 = s.Npad;
  const T* xb = x + b * s.N * s.d;
  const T* yb = y + b * s.M * s.d;
  const T* wxb = wx ? wx + b * s.N : nullptr;
  const T* wyb = wy ? wy + b * s.M : nullptr;
  const double inv_sx = wx ? inv_sums[2 * b] : 0.0, inv_sy = wy ? inv_sums[2 * b + 1] : 0.0;
  T* gxb = s.grad_points ? pgx + slot * s.N * s.d : nullptr;
  T* gyb = s.grad_points ? pgy + slot * s.M * s.d : nullptr;
  T* gwxb = pgwx ? pgwx + slot * s.N : nullptr;
  T* gwyb = pgwy ? pgwy + slot * s.M : nullptr;
  const int64_t bt = s.P.pair_stride == 0 ? 0 : b;
  const T invL = static_cast<T>(1.0 / static_cast<double>(s.L));

  const int64_t l0 = c * s.Lc, l1 = min(s.L, l0 + s.Lc);
  for (int64_t l = l0; l < l1; ++l) {
    // 1. project (padding: index kPad, sorts last whatever its key)
    for (int i = tid; i < n2; i += kThreads) {
      T u = 0, v = 0;
      if (i < N) {
        u = 0;
        for (int k = 0; k < d; ++k) u = add_mul(u, xb[static_cast<int64_t>(i) * d + k], theta[s.P.at(bt, k, l)]);
        u += T(0);  // -0 -> +0: ties with +0 by index
      }
      if (i < M) {
        v = 0;
        for (int k = 0; k < d; ++k) v = add_mul(v, yb[static_cast<int64_t>(i) * d + k], theta[s.P.at(bt, k, l)]);
        v += T(0);
      }
      w.kx[i] = u;
      w.ix[i] = i < N ? i : kPad;
      w.ky[i] = v;
      w.iy[i] = i < M ? i : kPad;
    }
    __syncthreads();
    // 2. sort both sides
    bitonic_sort2(w.kx, w.ix, w.ky, w.iy, n2);

    // 3. the 1D distance and d W / d u_(i), d W / d v_(j) (scaled by 1/L) into cu, cv
    double part = 0;
    if (s.fast) {
      const T scale = invL / static_cast<T>(N);
      for (int i = tid; i < N; i += kThreads) {
        const T t = w.kx[i] - w.ky[i];
        part += static_cast<double>(pw.value(t));
        const T g = pw.deriv(t) * scale;
        w.cu[i] = g;
        w.cv[i] = -g;
      }
    } else {
      for (int i = tid; i < N; i += kThreads) w.A[i] = wxb ? static_cast<T>(wxb[w.ix[i]] * inv_sx) : T(1) / T(N);
      for (int j = tid; j < M; j += kThreads) w.Bc[j] = wyb ? static_cast<T>(wyb[w.iy[j]] * inv_sy) : T(1) / T(M);
      __syncthreads();
      block_scan(w.A, N, false, w.red);
      block_scan(w.Bc, M, false, w.red);
      // The totals are 1 up to rounding: the entries at the total (the last atom of positive weight and the
      // zero-weight atoms after it) become exactly 1, so that no sliver is charged to a zero-weight atom.
      const T total_a = w.A[N - 1], total_b = w.Bc[M - 1];
      __syncthreads();  // every thread has read the totals
      for (int i = tid; i < N; i += kThreads)
        if (w.A[i] == total_a) w.A[i] = T(1);
      for (int j = tid; j < M; j += kThreads)
        if (w.Bc[j] == total_b) w.Bc[j] = T(1);
      __syncthreads();
      // Every merged piece lies in exactly one u-step (A_{i-1}, A_i] and one v-step (B_{j-1}, B_j]; the
      // u side sums the cost, each side its own derivative (each piece is visited once per side).
      for (int i = tid; i < N; i += kThreads) {
        const T lo = i ? w.A[i - 1] : T(0), hi = w.A[i], u = w.kx[i];
        T gu = 0;
        for (int j = min(bound(w.Bc, M, lo, true), M - 1); j < M; ++j) {
          const T blo = j ? w.Bc[j - 1] : T(0);
          const T len = min(hi, w.Bc[j]) - max(lo, blo);
          if (len > T(0)) {
            part += static_cast<double>(len * pw.value(u - w.ky[j]));
            gu += len * pw.deriv(u - w.ky[j]);
          }
          if (!(w.Bc[j] < hi)) break;
        }
        w.cu[i] = gu * invL;
        if (s.grad_weights) {
          // d W / d A_i: the v atom active at A_i trades u_(i+1) for u_(i); at A_i = 0 the first v of positive
          // weight. 0 at the top (A_i = 1): see weight_gradient in sliced_wasserstein_cpu.cpp.
          T dA = 0;
          if (hi < T(1)) {
            const T v = w.ky[hi == T(0) ? bound(w.Bc, M, T(0), true) : bound(w.Bc, M, hi, false)];
            dA = pw.value(u - v) - pw.value(w.kx[i + 1] - v);
          }
          w.dA[i] = dA;
        }
      }
      for (int j = tid; j < M; j += kThreads) {
        const T lo = j ? w.Bc[j - 1] : T(0), hi = w.Bc[j], v = w.ky[j];
        T gv = 0;
        for (int i = min(bound(w.A, N, lo, true), N - 1); i < N; ++i) {
          const T alo = i ? w.A[i - 1] : T(0);
          const T len = min(hi, w.A[i]) - max(lo, alo);
          if (len > T(0)) gv -= len * pw.deriv(w.kx[i] - v);
          if (!(w.A[i] < hi)) break;
        }
        w.cv[j] = gv * invL;
        if (s.grad_weights) {
          T dB = 0;
          if (hi < T(1)) {
            const T u = w.kx[hi == T(0) ? bound(w.A, N, T(0), true) : bound(w.A, N, hi, false)];
            dB = pw.value(v - u) - pw.value(w.ky[j + 1] - u);
          }
          w.dB[j] = dB;
        }
      }
    }
    const double W = block_sum(part, w.red);  // also orders the writes above before the reads below
    if (tid == 0) vals[b * s.L + l] = s.fast ? W / static_cast<double>(N) : W;

    // 4. the slice's gradient shares (point i of each side is written by one thread only)
    if (s.grad_points) {
      for (int i = tid; i < N; i += kThreads) {
        T* g = gxb + static_cast<int64_t>(w.ix[i]) * d;
        for (int k = 0; k < d; ++k) g[k] += w.cu[i] * theta[s.P.at(bt, k, l)];
      }
      for (int j = tid; j < M; j += kThreads) {
        T* g = gyb + static_cast<int64_t>(w.iy[j]) * d;
        for (int k = 0; k < d; ++k) g[k] += w.cv[j] * theta[s.P.at(bt, k, l)];
      }
    }
    if (s.grad_projections) {
      for (int k = 0; k < d; ++k) {
        double acc = 0;
        for (int i = tid; i < N; i += kThreads)
          acc += static_cast<double>(w.cu[i]) * xb[static_cast<int64_t>(w.ix[i]) * d + k];
        for (int j = tid; j < M; j += kThreads)
          acc += static_cast<double>(w.cv[j]) * yb[static_cast<int64_t>(w.iy[j]) * d + k];
        const double g = block_sum(acc, w.red);
        if (tid == 0) gth[(b * s.d + k) * s.L + l] = static_cast<T>(g);
      }
    }
    if (s.grad_weights) {
      // d W / d a_(k) up to a constant (see weight_gradient in sliced_wasserstein_cpu.cpp): with r the last atom
      // of positive weight, sum_{k <= i < r} d W / d A_i for k <= r (suffix sums), c(u_k - v_top) - c(u_r - v_top)
      // for k > r. The atoms r and v_top are read here, before the scans' barriers.
      const int rx = bound(w.A, N, T(1), false), ry = bound(w.Bc, M, T(1), false);
      const T x_top = w.ky[ry], y_top = w.kx[rx];
      const T x_base = pw.value(w.kx[rx] - x_top), y_base = pw.value(w.ky[ry] - y_top);
      if (gwxb) block_scan(w.dA, N, true, w.red);
      if (gwyb) block_scan(w.dB, M, true, w.red);
      if (gwxb)
        for (int i = tid; i < N; i += kThreads)
          gwxb[w.ix[i]] += (i <= rx ? w.dA[i] : pw.value(w.kx[i] - x_top) - x_base) * invL;
      if (gwyb)
        for (int j = tid; j < M; j += kThreads)
          gwyb[w.iy[j]] += (j <= ry ? w.dB[j] : pw.value(w.ky[j] - y_top) - y_base) * invL;
    }
    // No barrier before the next slice: since the last barrier above, each thread reads only entries
    // i = tid, tid + kThreads, ... of the working arrays, the ones it writes first in the next projection.
  }
}

// 1 / (sum of the weights) per pair and side: inv[2 b] (x), inv[2 b + 1] (y).
template <typename T>
__global__ void __launch_bounds__(kThreads)
inverse_sums_kernel(const T* __restrict__ wx, const T* __restrict__ wy, int64_t N, int64_t M, double* inv) {
  LF_SHARED(double[kThreads], red);
  const int64_t b = blockIdx.x;
  for (int side = 0; side < 2; ++side) {
    const T* w = side == 0 ? wx : wy;
    if (!w) continue;  // uniform on the host's side of the branch for every thread of the block
    const int64_t n = side == 0 ? N : M;
    double s = 0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) s += static_cast<double>(w[b * n + i]);
    s = block_sum(s, red);
    if (threadIdx.x == 0) inv[2 * b + side] = 1.0 / s;
  }
}

// out[i] = sum_c part[c * stride + i] for i < count, in chunk order (the partial point gradients).
template <typename T>
__global__ void sum_chunks_kernel(const T* __restrict__ part, int64_t C, int64_t per_pair, int64_t B,
                                  T* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= B * per_pair) return;
  const int64_t b = e / per_pair, i = e % per_pair;
  T s = 0;
  for (int64_t c = 0; c < C; ++c) s += part[(b * C + c) * per_pair + i];
  out[e] = s;
}

// Per pair: value[b] = mean_l vals[b, l]; the weight gradients: g_a = sum over chunks, then
// d / d w_i = (g_a[i] - sum_k a_k g_a[k]) / S with a = w / S.
template <typename T>
__global__ void __launch_bounds__(kThreads)
finish_pairs_kernel(const double* __restrict__ vals, int64_t L, T* __restrict__ value, const T* __restrict__ wx,
                    const T* __restrict__ wy, const double* __restrict__ inv, const T* __restrict__ pgwx,
                    const T* __restrict__ pgwy, int64_t C, int64_t N, int64_t M, T* __restrict__ gwx,
                    T* __restrict__ gwy) {
  LF_SHARED(double[kThreads], red);
  const int64_t b = blockIdx.x;
  double s = 0;
  for (int64_t l = threadIdx.x; l < L; l += kThreads) s += vals[b * L + l];
  s = block_sum(s, red);
  if (threadIdx.x == 0) value[b] = static_cast<T>(s / static_cast<double>(L));
  for (int side = 0; side < 2; ++side) {
    const T* part = side == 0 ? pgwx : pgwy;
    T* out = side == 0 ? gwx : gwy;
    if (!part || !out) continue;
    const T* w = side == 0 ? wx : wy;
    const int64_t n = side == 0 ? N : M;
    const double is = inv[2 * b + side];
    double dot = 0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      if (w[b * n + i] == T(0)) continue;  // its g may be inf (a padding point far away): 0 * inf is NaN
      double g = 0;
      for (int64_t c = 0; c < C; ++c) g += static_cast<double>(part[(b * C + c) * n + i]);
      dot += g * static_cast<double>(w[b * n + i]) * is;
    }
    dot = block_sum(dot, red);
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      double g = 0;
      for (int64_t c = 0; c < C; ++c) g += static_cast<double>(part[(b * C + c) * n + i]);
      out[b * n + i] = static_cast<T>((g - dot) * is);
    }
  }
}

int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

Outputs sliced_wasserstein_cuda(Tensor x, Tensor y, std::optional<Tensor> x_weights, std::optional<Tensor> y_weights,
                                Tensor projections, double p, bool grad_points, bool grad_weights,
                                bool grad_projections) {
  const Args a = check_args(x, y, x_weights, y_weights, projections, p, grad_points, grad_weights, grad_projections,
                            /*cuda=*/true);
  // grid.y holds the pairs; the padded length (a power of two) must fit an int
  STD_TORCH_CHECK(a.B <= 65535, kOp, ": at most 65535 pairs per call on CUDA");
  STD_TORCH_CHECK(std::max(a.N, a.M) <= (int64_t(1) << 30), kOp, ": at most 2^30 points per cloud on CUDA");
  DeviceGuard guard(x.get_device_index());
  Outputs outs = allocate_outputs(x, a);
  if (a.B == 0) return outs;
  Tensor& value = std::get<0>(outs);
  Tensor& gx = std::get<1>(outs);
  Tensor& gy = std::get<2>(outs);
  Tensor& gwx = std::get<3>(outs);
  Tensor& gwy = std::get<4>(outs);
  Tensor& gth = std::get<5>(outs);
  cudaStream_t stream = current_stream(x);
  const int dev = x.get_device_index();

  Shape s;
  s.B = a.B;
  s.N = a.N;
  s.M = a.M;
  s.d = a.d;
  s.L = a.L;
  s.Npad = next_pow2(std::max(a.N, a.M));
  s.P = a.P;
  s.fast = a.fast;
  s.grad_points = a.grad_points;
  s.grad_weights = a.grad_weights;
  s.grad_projections = a.grad_projections;
  s.has_wx = a.has_wx;
  s.has_wy = a.has_wy;

  int sms = 0, smem_optin = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), kOp);
  check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), kOp);

  LF_DISPATCH_FLOAT_DOUBLE(x.scalar_type(), kOp, [&] {
    using T = scalar_t;
    const size_t wb = work_bytes<T>(s);
    const bool in_shared = wb <= static_cast<size_t>(smem_optin);
    // Chunks of slices per pair: about two blocks per SM in all; fewer when the partial gradient buffers
    // (or the global working arrays) would grow large. Depends on the shapes and the device only.
    const bool partial_grads = a.grad_points || a.grad_weights;
    int64_t C = std::min<int64_t>(a.L, std::max<int64_t>(1, (2 * sms + a.B - 1) / a.B));
    const int64_t per_chunk = (partial_grads ? (a.N + a.M) * (a.d + 1) * static_cast<int64_t>(sizeof(T)) : 0) +
                              (in_shared ? 0 : static_cast<int64_t>(wb));
    if (per_chunk > 0) C = std::max<int64_t>(1, std::min<int64_t>(C, (int64_t(256) << 20) / (a.B * per_chunk)));
    s.Lc = (a.L + C - 1) / C;
    s.C = (a.L + s.Lc - 1) / s.Lc;
    const bool partials = s.C > 1;

    auto scratch = [&](int64_t n) { return torch::stable::new_zeros(x, {n}); };
    Tensor vals = torch::stable::new_empty(x, {a.B * a.L}, ScalarType::Double);
    Tensor inv = torch::stable::new_zeros(x, {2 * a.B}, ScalarType::Double);
    Tensor pgx = a.grad_points && partials ? scratch(a.B * s.C * a.N * a.d) : gx;
    Tensor pgy = a.grad_points && partials ? scratch(a.B * s.C * a.M * a.d) : gy;
    std::optional<Tensor> pgwx, pgwy, gbuf;
    if (a.grad_weights && a.has_wx) pgwx = scratch(a.B * s.C * a.N);
    if (a.grad_weights && a.has_wy) pgwy = scratch(a.B * s.C * a.M);
    if (!in_shared) gbuf = torch::stable::new_empty(x, {static_cast<int64_t>(wb) * a.B * s.C}, ScalarType::Byte);

    const T* wxp = a.has_wx ? x_weights->const_data_ptr<T>() : nullptr;
    const T* wyp = a.has_wy ? y_weights->const_data_ptr<T>() : nullptr;
    if (wxp || wyp) {
      launch<inverse_sums_kernel<T>>(static_cast<unsigned>(a.B), kThreads, 0, stream, wxp, wyp, a.N, a.M,
                                     inv.mutable_data_ptr<double>());
    }
    const size_t shared_bytes = in_shared ? wb : 0;
    if (shared_bytes > 48 * 1024)
      check_cuda(cudaFuncSetAttribute(sw_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared_bytes)),
                 kOp);
    const dim3 grid(static_cast<unsigned>(s.C), static_cast<unsigned>(a.B));
    launch<sw_kernel<T>>(
        grid, kThreads, shared_bytes, stream, x.const_data_ptr<T>(), y.const_data_ptr<T>(), wxp, wyp,
        inv.const_data_ptr<double>(),
        projections.const_data_ptr<T>(), s, p, vals.mutable_data_ptr<double>(),
        a.grad_points ? pgx.mutable_data_ptr<T>() : nullptr, a.grad_points ? pgy.mutable_data_ptr<T>() : nullptr,
        pgwx ? pgwx->mutable_data_ptr<T>() : nullptr, pgwy ? pgwy->mutable_data_ptr<T>() : nullptr,
        a.grad_projections ? gth.mutable_data_ptr<T>() : nullptr,
        gbuf ? gbuf->mutable_data_ptr<unsigned char>() : nullptr);

    if (a.grad_points && partials) {
      const int64_t nx = a.B * a.N * a.d, ny = a.B * a.M * a.d;
      launch<sum_chunks_kernel<T>>(static_cast<unsigned>(ceil_div(nx, kThreads)), kThreads, 0, stream,
                                   pgx.const_data_ptr<T>(), s.C, a.N * a.d, a.B, gx.mutable_data_ptr<T>());
      launch<sum_chunks_kernel<T>>(static_cast<unsigned>(ceil_div(ny, kThreads)), kThreads, 0, stream,
                                   pgy.const_data_ptr<T>(), s.C, a.M * a.d, a.B, gy.mutable_data_ptr<T>());
    }
    launch<finish_pairs_kernel<T>>(
        static_cast<unsigned>(a.B), kThreads, 0, stream, vals.const_data_ptr<double>(), a.L,
        value.mutable_data_ptr<T>(), wxp, wyp, inv.const_data_ptr<double>(),
        pgwx ? pgwx->const_data_ptr<T>() : nullptr, pgwy ? pgwy->const_data_ptr<T>() : nullptr, s.C, a.N, a.M,
        gwx.numel() ? gwx.mutable_data_ptr<T>() : nullptr, gwy.numel() ? gwy.mutable_data_ptr<T>() : nullptr);
  });
  return outs;
}

}  // namespace
}  // namespace sliced_wasserstein
}  // namespace lossforge

STABLE_TORCH_LIBRARY_IMPL(lossforge, CUDA, m) {
  using namespace lossforge::sliced_wasserstein;
  m.impl("sliced_wasserstein", TORCH_BOX(&sliced_wasserstein_cuda));
}
