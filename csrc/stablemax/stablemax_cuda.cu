// StableMax CUDA kernels. A group of G threads owns one row: G in {1, 2, ..., 32} threads of a warp
// for small and medium V (many rows per warp when V is ~10, as in HRM), the whole block (256 threads)
// for large V. Strided rows ([N, C, d1, ...]) use G = 1 so that neighbouring threads read neighbouring
// addresses. Reductions are fixed-order (deterministic) shuffles and shared memory.
#include "common/cuda_utils.cuh"
#include "stablemax/stablemax.h"

namespace lossforge {
namespace stablemax {
namespace {

constexpr int kBlock = 256;

// Sum over the G threads of a row: a warp slice (G <= 32) or the whole block (G == kBlock).
template <int G, typename A>
__device__ __forceinline__ A group_sum(A v) {
  if constexpr (G <= 32) {
#pragma unroll
    for (int off = G / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
  } else {
    LF_SHARED(A[G / 32], warp_sums);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    __syncthreads();  // a previous call's readers are done with warp_sums
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
    __syncthreads();
    A total = 0;
#pragma unroll
    for (int w = 0; w < G / 32; ++w) total += warp_sums[w];
    return total;
  }
}

// Whether b holds for any row of this thread's warp (G <= 32) or block (G == kBlock): the branches that reduce
// again (rows whose sum overflowed, see overflow_scale) must be taken by every lane of the warp's shuffles.
template <int G>
__device__ __forceinline__ bool group_any(bool b) {
  if constexpr (G == kBlock) {
    return b;  // one row per block: b is the same in every thread
  } else {
    int v = b;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v |= __shfl_xor_sync(0xffffffffu, v, off);
    return v != 0;
  }
}

// Row index and lane of this thread; rows past the end still take part in the group's shuffles.
template <int G>
__device__ __forceinline__ void row_and_lane(int64_t& row, int& lane) {
  if constexpr (G <= 32) {
    row = (int64_t)blockIdx.x * (kBlock / G) + threadIdx.x / G;
    lane = threadIdx.x % G;
  } else {
    row = blockIdx.x;
    lane = threadIdx.x;
  }
}

template <int G, typename T>
__global__ void stablemax_kernel(const T* __restrict__ x, T* __restrict__ out, RowLayout L, int64_t rows,
                                 bool log) {
  using A = typename Acc<T>::type;
  int64_t r;
  int lane;
  row_and_lane<G>(r, lane);
  const bool active = r < rows;
  const int64_t b = active ? L.base(r) : 0, st = L.inner, V = active ? L.V : 0;
  A S = 0;
  for (int64_t c = lane; c < V; c += G) S += s<A>(static_cast<A>(x[b + c * st]));
  S = group_sum<G>(S);
  A scale = 1;  // p_c = s_c scale / S
  if (group_any<G>(::isinf(S))) {
    const A sc = overflow_scale<A>(L.V);
    A Ss = 0;
    for (int64_t c = lane; c < V; c += G) Ss += s<A>(static_cast<A>(x[b + c * st])) * sc;
    Ss = group_sum<G>(Ss);
    if (::isinf(S)) {
      scale = sc;
      S = ::isinf(Ss) ? A(NAN) : Ss;  // a +inf logit: the whole row is NaN, as with softmax
    }
  }
  if (!active) return;
  if (log) {
    const A logS = ::log(S) - ::log(scale);
    for (int64_t c = lane; c < V; c += G)
      out[b + c * st] = static_cast<T>(log_s<A>(static_cast<A>(x[b + c * st])) - logS);
  } else {
    const A inv = A(1) / S;
    for (int64_t c = lane; c < V; c += G)
      out[b + c * st] = static_cast<T>(s<A>(static_cast<A>(x[b + c * st])) * scale * inv);
  }
}

template <int G, typename T>
__global__ void stablemax_backward_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                          const T* __restrict__ out, T* __restrict__ gx, RowLayout L,
                                          int64_t rows, bool log) {
  using A = typename Acc<T>::type;
  int64_t r;
  int lane;
  row_and_lane<G>(r, lane);
  const bool active = r < rows;
  const int64_t b = active ? L.base(r) : 0, st = L.inner, V = active ? L.V : 0;
  A dot = 0;
  for (int64_t c = lane; c < V; c += G) {
    const A gc = static_cast<A>(g[b + c * st]);
    dot += log ? gc : gc * static_cast<A>(out[b + c * st]);
  }
  dot = group_sum<G>(dot);
  if (!active) return;
  for (int64_t c = lane; c < V; c += G) {
    const int64_t i = b + c * st;
    const A xc = static_cast<A>(x[i]), gc = static_cast<A>(g[i]), yc = static_cast<A>(out[i]);
    gx[i] = static_cast<T>(log ? h<A>(xc) * (gc - ::exp(yc) * dot) : h<A>(xc) * yc * (gc - dot));
  }
}

template <int G, typename T>
__global__ void ce_forward_kernel(const T* __restrict__ x, const int64_t* __restrict__ target,
                                  const typename Acc<T>::type* __restrict__ weight,
                                  typename Acc<T>::type* __restrict__ loss, typename Acc<T>::type* __restrict__ stats,
                                  RowLayout L, int64_t rows, int64_t ignore_index, double eps) {
  using A = typename Acc<T>::type;
  int64_t r;
  int lane;
  row_and_lane<G>(r, lane);
  const int64_t y = r < rows ? target[r] : ignore_index;
  // Out-of-range targets cannot raise from a kernel without a host sync: their row gets a NaN loss
  // and nothing is read out of bounds (the CPU kernel raises instead).
  const bool valid = r < rows && y != ignore_index && y >= 0 && y < L.V;
  const int64_t b = valid ? L.base(r) : 0, st = L.inner, V = valid ? L.V : 0;
  A S_other = 0, sy = 0;
  for (int64_t c = lane; c < V; c += G) {
    const A sc = s<A>(static_cast<A>(x[b + c * st]));
    if (c == y) sy = sc;
    else S_other += sc;
  }
  S_other = group_sum<G>(S_other);
  sy = group_sum<G>(sy);
  A S = sy + S_other;
  A scale = 1, So = S_other, Ss = S;  // the sums the loss uses: scaled where S overflowed
  if (group_any<G>(::isinf(S))) {
    const A sc = overflow_scale<A>(L.V);
    A so = 0;
    for (int64_t c = lane; c < V; c += G)
      if (c != y) so += s<A>(static_cast<A>(x[b + c * st])) * sc;
    so = group_sum<G>(so);
    if (::isinf(S)) {
      scale = sc;
      So = so;
      Ss = sy * sc + so;
      if (::isinf(Ss)) S_other = S = So = Ss = A(NAN);  // a +inf logit: NaN loss and gradient, as with softmax
    }
  }
  A smooth = 0;
  if (eps > 0) {
    const A logS = ::log(Ss) - ::log(scale);
    for (int64_t c = lane; c < V; c += G)
      smooth += (weight ? weight[c] : A(1)) * (logS - log_s<A>(static_cast<A>(x[b + c * st])));
    smooth = group_sum<G>(smooth);
  }
  if (r >= rows || lane != 0) return;
  A* sr = stats + 3 * r;
  if (!valid) {
    loss[r] = y == ignore_index ? A(0) : A(NAN);
    sr[0] = sr[1] = sr[2] = 0;
    return;
  }
  const A wy = weight ? weight[y] : A(1);
  loss[r] = A(1 - eps) * wy * nll_term(So, sy, scale, static_cast<A>(x[b + y * st])) + A(eps / L.V) * smooth;
  sr[0] = S_other;
  sr[1] = S;  // inf where the sum overflowed: the backward then sums again, scaled
  sr[2] = wy;
}

template <int G, typename T>
__global__ void ce_backward_kernel(const typename Acc<T>::type* __restrict__ grad_rows, bool grad_scalar,
                                   const T* __restrict__ x, const int64_t* __restrict__ target,
                                   const typename Acc<T>::type* __restrict__ weight,
                                   const typename Acc<T>::type* __restrict__ weight_sum,
                                   const typename Acc<T>::type* __restrict__ stats, T* __restrict__ gx,
                                   RowLayout L, int64_t rows, int64_t ignore_index, double eps) {
  using A = typename Acc<T>::type;
  int64_t r;
  int lane;
  row_and_lane<G>(r, lane);
  const int64_t y = r < rows ? target[r] : ignore_index;
  const int64_t b = r < rows ? L.base(r) : 0, st = L.inner, V = L.V;
  const bool valid = r < rows && y != ignore_index && y >= 0 && y < V;
  const A* sr = stats + 3 * (valid ? r : 0);
  A S_other = valid ? sr[0] : A(0), S = valid ? sr[1] : A(1), scale = 1;  // p_c = s_c scale / S
  if (group_any<G>(::isinf(S))) {  // the forward's sum overflowed: sum again, scaled (see overflow_scale)
    const A sc = overflow_scale<A>(V);
    A so = 0, sa = 0;
    for (int64_t c = lane; valid && c < V; c += G) {
      const A t = s<A>(static_cast<A>(x[b + c * st])) * sc;
      sa += t;
      if (c != y) so += t;
    }
    so = group_sum<G>(so);
    sa = group_sum<G>(sa);
    if (::isinf(S)) {
      scale = sc;
      S_other = so;
      S = sa;
    }
  }
  if (r >= rows) return;
  if (!valid) {
    for (int64_t c = lane; c < V; c += G) gx[b + c * st] = static_cast<T>(0);
    return;
  }
  const A g = grad_rows[grad_scalar ? 0 : r];
  const A invS = A(1) / S, coef_t = A(1 - eps) * sr[2], coef_s = A(eps / V);
  const A W = weight ? *weight_sum : A(V);
  for (int64_t c = lane; c < V; c += G) {
    const A xc = static_cast<A>(x[b + c * st]);
    const A p = s<A>(xc) * scale * invS;
    const A wc = weight ? weight[c] : A(1);
    // p_y - 1 = -S_-y / S from the saved stats: no cancellation for confident rows.
    const A nll = c == y ? -S_other * invS : p;
    gx[b + c * st] = static_cast<T>(g * h<A>(xc) * (coef_t * nll + coef_s * (p * W - wc)));
  }
}

// Picks G from the row length (see the file comment) and calls launch(integral_constant<int, G>, grid).
template <typename F>
void dispatch_group(const RowLayout& L, int64_t rows, F&& launch) {
  STD_TORCH_CHECK(rows <= 0x7fffffffLL, "stablemax: more than 2^31 - 1 rows are not supported on CUDA");
  auto go = [&](auto g) {
    constexpr int G = decltype(g)::value;
    launch(g, (unsigned)(G <= 32 ? ceil_div(rows, kBlock / G) : rows));
  };
  if (L.inner != 1 || L.V <= 4) return go(std::integral_constant<int, 1>{});
  if (L.V <= 8) return go(std::integral_constant<int, 2>{});
  if (L.V <= 16) return go(std::integral_constant<int, 4>{});
  if (L.V <= 32) return go(std::integral_constant<int, 8>{});
  if (L.V <= 64) return go(std::integral_constant<int, 16>{});
  if (L.V <= 2048) return go(std::integral_constant<int, 32>{});
  return go(std::integral_constant<int, kBlock>{});
}

Tensor stablemax_cuda(Tensor x, int64_t dim, bool log) {
  check_input(x, true, "stablemax", "x");
  const DimSplit d = split_at_dim(x, dim, "stablemax");
  Tensor out = torch::stable::empty_like(x);
  if (x.numel() == 0) return out;
  DeviceGuard guard(x.get_device_index());
  const RowLayout L{d.size, d.inner};
  cudaStream_t stream = current_stream(x);
  LF_DISPATCH_FLOATING(x.scalar_type(), "stablemax", [&] {
    dispatch_group(L, d.rows(), [&](auto g, unsigned grid) {
      launch<stablemax_kernel<decltype(g)::value, scalar_t>>(
          grid, kBlock, 0, stream, x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), L, d.rows(), log);
    });
  });
  return out;
}

Tensor stablemax_backward_cuda(Tensor grad, Tensor x, Tensor out, int64_t dim, bool log) {
  const char* op = "stablemax_backward";
  check_stablemax_backward_args(grad, x, out, true, op);
  const DimSplit d = split_at_dim(x, dim, op);
  Tensor gx = torch::stable::empty_like(x);
  if (x.numel() == 0) return gx;
  DeviceGuard guard(x.get_device_index());
  const RowLayout L{d.size, d.inner};
  cudaStream_t stream = current_stream(x);
  LF_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    dispatch_group(L, d.rows(), [&](auto g, unsigned grid) {
      launch<stablemax_backward_kernel<decltype(g)::value, scalar_t>>(
          grid, kBlock, 0, stream, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          out.const_data_ptr<scalar_t>(),
          gx.mutable_data_ptr<scalar_t>(), L, d.rows(), log);
    });
  });
  return gx;
}

std::tuple<Tensor, Tensor> stablemax_cross_entropy_cuda(Tensor input, Tensor target, std::optional<Tensor> weight,
                                                        int64_t dim, int64_t ignore_index, double label_smoothing) {
  const char* op = "stablemax_cross_entropy";
  const DimSplit d = check_ce_args(input, target, weight, dim, true, op);
  STD_TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                  ": label_smoothing must be in [0, 1], got ", label_smoothing);
  Tensor loss, stats;
  std::tie(loss, stats) = new_ce_outputs(input, target);
  if (d.rows() == 0) return {loss, stats};
  STD_TORCH_CHECK(d.size > 0, op, ": input has no classes (size 0 at the class dimension)");
  DeviceGuard guard(input.get_device_index());
  const RowLayout L{d.size, d.inner};
  cudaStream_t stream = current_stream(input);
  LF_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
    using A = typename Acc<scalar_t>::type;
    const A* wp = weight.has_value() ? weight->const_data_ptr<A>() : nullptr;
    dispatch_group(L, d.rows(), [&](auto g, unsigned grid) {
      launch<ce_forward_kernel<decltype(g)::value, scalar_t>>(
          grid, kBlock, 0, stream, input.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), wp,
          loss.mutable_data_ptr<A>(),
          stats.mutable_data_ptr<A>(), L, d.rows(), ignore_index, label_smoothing);
    });
  });
  return {loss, stats};
}

Tensor stablemax_cross_entropy_backward_cuda(Tensor grad_rows, Tensor input, Tensor target,
                                             std::optional<Tensor> weight, Tensor stats, int64_t dim,
                                             int64_t ignore_index, double label_smoothing) {
  const char* op = "stablemax_cross_entropy_backward";
  const DimSplit d = check_ce_args(input, target, weight, dim, true, op);
  check_ce_backward_args(grad_rows, stats, input, d, op);
  Tensor gx = torch::stable::empty_like(input);
  if (input.numel() == 0) return gx;
  DeviceGuard guard(input.get_device_index());
  const RowLayout L{d.size, d.inner};
  cudaStream_t stream = current_stream(input);
  // W = sum of the class weights, computed on the device (no host sync).
  std::optional<Tensor> weight_sum;
  if (weight.has_value()) weight_sum = torch::stable::sum(*weight, std::nullopt);
  LF_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
    using A = typename Acc<scalar_t>::type;
    const A* wp = weight.has_value() ? weight->const_data_ptr<A>() : nullptr;
    const A* wsum = weight_sum.has_value() ? weight_sum->const_data_ptr<A>() : nullptr;
    const bool scalar = grad_rows.numel() == 1 && d.rows() != 1;
    dispatch_group(L, d.rows(), [&](auto g, unsigned grid) {
      launch<ce_backward_kernel<decltype(g)::value, scalar_t>>(
          grid, kBlock, 0, stream, grad_rows.const_data_ptr<A>(), scalar, input.const_data_ptr<scalar_t>(),
          target.const_data_ptr<int64_t>(),
          wp, wsum, stats.const_data_ptr<A>(), gx.mutable_data_ptr<scalar_t>(), L, d.rows(), ignore_index,
          label_smoothing);
    });
  });
  return gx;
}

// ⊥Grad in three kernels, no host sync: (w.g, w.w, g.g), then the squared norm of g_perp = g - proj w
// exactly as the last kernel writes it, then g <- g_perp * |g| / (|g_perp| + 1e-30) in place. The norm
// is measured, not taken from the closed form |g|^2 - (w.g)^2 / |w|^2, which cancels to ~0 when g is
// (nearly) parallel to w (always so for a one-element parameter) while g_perp is rounding noise.
// Float64 block sums, one atomicAdd per block into sums[4] = (w.g, w.w, g.g, |g_perp|^2).
template <typename T>
__global__ void orthograd_dots_kernel(const T* __restrict__ w, const T* __restrict__ g, int64_t n,
                                      double* __restrict__ sums) {
  using A = typename Acc<T>::type;
  double wg = 0, ww = 0, gg = 0;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const double wi = static_cast<A>(w[i]), gi = static_cast<A>(g[i]);
    wg += wi * gi;
    ww += wi * wi;
    gg += gi * gi;
  }
  wg = group_sum<kBlock>(wg);
  ww = group_sum<kBlock>(ww);
  gg = group_sum<kBlock>(gg);
  if (threadIdx.x == 0) {
    atomicAdd(sums, wg);
    atomicAdd(sums + 1, ww);
    atomicAdd(sums + 2, gg);
  }
}

// g_perp's element i, for the norm and for the write: the same function and a product that is never
// contracted into an FMA (mul_rn, common/host_device.h), so that both round alike.

template <typename T, typename A>
__device__ __forceinline__ A orthograd_perp(const T* __restrict__ w, const T* __restrict__ g, int64_t i, A proj) {
  return static_cast<A>(g[i]) - mul_rn(proj, static_cast<A>(w[i]));
}

template <typename T>
__global__ void orthograd_perp_norm_kernel(const T* __restrict__ w, const T* __restrict__ g, int64_t n,
                                           double* __restrict__ sums) {
  using A = typename Acc<T>::type;
  const A proj = static_cast<A>(sums[0] / (sums[1] + 1e-30));
  double pp = 0;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const double p = orthograd_perp(w, g, i, proj);
    pp += p * p;
  }
  pp = group_sum<kBlock>(pp);
  if (threadIdx.x == 0) atomicAdd(sums + 3, pp);
}

template <typename T>
__global__ void orthograd_apply_kernel(const T* __restrict__ w, T* __restrict__ g, int64_t n,
                                       const double* __restrict__ sums) {
  using A = typename Acc<T>::type;
  const A proj = static_cast<A>(sums[0] / (sums[1] + 1e-30));
  const A scale = static_cast<A>(orthograd_scale<A>(sums[2], sums[3]));
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    g[i] = static_cast<T>(orthograd_perp(w, g, i, proj) * scale);
}

void orthograd_cuda(Tensor grad, Tensor param) {
  check_orthograd_args(grad, param, true);
  const int64_t n = grad.numel();
  if (n == 0) return;
  DeviceGuard guard(grad.get_device_index());
  cudaStream_t stream = current_stream(grad);
  Tensor sums = torch::stable::new_zeros(grad, {4}, ScalarType::Double);
  const unsigned grid = (unsigned)std::min<int64_t>(ceil_div(n, kBlock), 1024);
  LF_DISPATCH_FLOATING(grad.scalar_type(), "orthograd_", [&] {
    const scalar_t* w = param.const_data_ptr<scalar_t>();
    double* s = sums.mutable_data_ptr<double>();
    launch<orthograd_dots_kernel<scalar_t>>(grid, kBlock, 0, stream, w, grad.const_data_ptr<scalar_t>(), n, s);
    launch<orthograd_perp_norm_kernel<scalar_t>>(grid, kBlock, 0, stream, w, grad.const_data_ptr<scalar_t>(), n, s);
    launch<orthograd_apply_kernel<scalar_t>>(grid, kBlock, 0, stream, w, grad.mutable_data_ptr<scalar_t>(), n, s);
  });
}

}  // namespace
}  // namespace stablemax
}  // namespace lossforge

STABLE_TORCH_LIBRARY_IMPL(lossforge, CUDA, m) {
  using namespace lossforge::stablemax;
  m.impl("stablemax", TORCH_BOX(&stablemax_cuda));
  m.impl("stablemax_backward", TORCH_BOX(&stablemax_backward_cuda));
  m.impl("stablemax_cross_entropy", TORCH_BOX(&stablemax_cross_entropy_cuda));
  m.impl("stablemax_cross_entropy_backward", TORCH_BOX(&stablemax_cross_entropy_backward_cuda));
  m.impl("orthograd_", TORCH_BOX(&orthograd_cuda));
}
