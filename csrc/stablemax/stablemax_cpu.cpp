// StableMax CPU kernels: one pass per row for the forward, one for the backward, parallel over rows
// on torch's thread pool. Rows are contiguous (class dim last) or strided ([N, C, d1, ...]).
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/common.h"
#include "stablemax/stablemax.h"

namespace lossforge {
namespace stablemax {
namespace {

constexpr const char* kCE = "stablemax_cross_entropy";

// Vectorised sum over a loop (float addition is not associative, so the compiler needs leave to
// reorder it; -fopenmp-simd gives that leave per loop without an OpenMP runtime).
#define LF_PRAGMA(x) _Pragma(#x)
#define LF_SIMD_SUM(var) LF_PRAGMA(omp simd reduction(+ : var))
#define LF_SIMD _Pragma("omp simd")

// Rows per task: enough elements that a task amortises the pool's overhead.
int64_t grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// Calls f(std::integral_constant<bool, contiguous>) so the row loops see a compile-time stride of 1
// in the common case and vectorise.
template <typename F>
void with_layout(bool contiguous, F&& f) {
  if (contiguous) f(std::true_type{});
  else f(std::false_type{});
}

// A row whose plain sum of s(x) overflowed, summed again scaled by overflow_scale: S and S_-y (the sum
// without class y; y = -1: none), both times `scale`. Rare, so plain loops.
template <typename A>
struct ScaledSums {
  A scale, S, S_other;
};

template <typename A, typename T>
ScaledSums<A> scaled_sums(const T* xr, int64_t V, int64_t st, int64_t y) {
  const A scale = overflow_scale<A>(V);
  A S = 0, S_other = 0;
  for (int64_t c = 0; c < V; ++c) {
    const A t = s<A>(static_cast<A>(xr[c * st])) * scale;
    S += t;
    S_other += c != y ? t : A(0);
  }
  return {scale, S, S_other};
}

template <typename T, bool Contig>
void stablemax_rows(const T* x, T* out, RowLayout L, int64_t r0, int64_t r1, bool log) {
  using A = typename Acc<T>::type;
  const int64_t V = L.V, st = Contig ? 1 : L.inner;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + L.base(r);
    T* o = out + L.base(r);
    A S = 0;
    LF_SIMD_SUM(S)
    for (int64_t c = 0; c < V; ++c) S += s<A>(static_cast<A>(xr[c * st]));
    A scale = 1;  // p_c = s_c scale / S; not 1 only where S overflowed
    if (std::isinf(S)) {
      const ScaledSums<A> r = scaled_sums<A>(xr, V, st, -1);
      scale = r.scale;
      S = std::isinf(r.S) ? A(NAN) : r.S;  // a +inf logit: the whole row is NaN, as with softmax
    }
    if (log) {
      const A logS = std::log(S) - std::log(scale);
      for (int64_t c = 0; c < V; ++c) o[c * st] = static_cast<T>(log_s<A>(static_cast<A>(xr[c * st])) - logS);
    } else if (scale == A(1)) {
      const A inv = A(1) / S;
      LF_SIMD
      for (int64_t c = 0; c < V; ++c) o[c * st] = static_cast<T>(s<A>(static_cast<A>(xr[c * st])) * inv);
    } else {
      const A inv = A(1) / S;
      for (int64_t c = 0; c < V; ++c) o[c * st] = static_cast<T>(s<A>(static_cast<A>(xr[c * st])) * scale * inv);
    }
  }
}

// d stablemax:     gx = h * p * (g - sum(g * p))
// d log_stablemax: gx = h * (g - exp(y) * sum(g))
template <typename T, bool Contig>
void stablemax_backward_rows(const T* g, const T* x, const T* out, T* gx, RowLayout L, int64_t r0,
                             int64_t r1, bool log) {
  using A = typename Acc<T>::type;
  const int64_t V = L.V, st = Contig ? 1 : L.inner;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = L.base(r);
    const T *gr = g + b, *xr = x + b, *yr = out + b;
    T* o = gx + b;
    A dot = 0;
    if (log) {
      LF_SIMD_SUM(dot)
      for (int64_t c = 0; c < V; ++c) dot += static_cast<A>(gr[c * st]);
      for (int64_t c = 0; c < V; ++c) {
        const A p = std::exp(static_cast<A>(yr[c * st]));
        o[c * st] = static_cast<T>(h<A>(static_cast<A>(xr[c * st])) * (static_cast<A>(gr[c * st]) - p * dot));
      }
    } else {
      LF_SIMD_SUM(dot)
      for (int64_t c = 0; c < V; ++c) dot += static_cast<A>(gr[c * st]) * static_cast<A>(yr[c * st]);
      LF_SIMD
      for (int64_t c = 0; c < V; ++c) {
        const A p = static_cast<A>(yr[c * st]);
        o[c * st] = static_cast<T>(h<A>(static_cast<A>(xr[c * st])) * p * (static_cast<A>(gr[c * st]) - dot));
      }
    }
  }
}

// Remembers the first row whose target is out of range; the error is raised after the parallel loop
// (throwing inside torch's pool would cross the stable C ABI).
struct BadTarget {
  std::atomic<int64_t> row{-1};
  void record(int64_t r) {
    int64_t expected = -1;
    row.compare_exchange_strong(expected, r);
  }
};

template <typename T, bool Contig>
void ce_forward_rows(const T* x, const int64_t* target, const typename Acc<T>::type* weight,
                     typename Acc<T>::type* loss, typename Acc<T>::type* stats, RowLayout L, int64_t r0,
                     int64_t r1, int64_t ignore_index, double eps, BadTarget& bad) {
  using A = typename Acc<T>::type;
  const int64_t V = L.V, st = Contig ? 1 : L.inner;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t y = target[r];
    A* sr = stats + 3 * r;
    if (y == ignore_index) {
      loss[r] = 0;
      sr[0] = sr[1] = sr[2] = 0;
      continue;
    }
    if (y < 0 || y >= V) {
      bad.record(r);
      loss[r] = NAN;
      sr[0] = sr[1] = sr[2] = 0;
      continue;
    }
    const T* xr = x + L.base(r);
    // The non-target sum is kept apart from s(x_y): log S - log s_y = log1p(S_-y / s_y) keeps the
    // loss of confident rows, which log(S) - log(s_y) would round to exactly 0 in float32.
    // One masked loop rather than two around y (rows of ~10 classes, as in HRM, are common); 32-bit
    // indices so that the mask is one SSE2 compare.
    A S_other = 0;
    const int32_t V32 = static_cast<int32_t>(V), y32 = static_cast<int32_t>(y);
    LF_SIMD_SUM(S_other)
    for (int32_t c = 0; c < V32; ++c) {
      const A sc = s<A>(static_cast<A>(xr[c * st]));
      S_other += c != y32 ? sc : A(0);
    }
    const A sy = s<A>(static_cast<A>(xr[y * st]));
    A S = sy + S_other;
    A scale = 1, So = S_other, Ss = S;  // the sums the loss uses: scaled where S overflowed
    if (std::isinf(S)) {
      const ScaledSums<A> r = scaled_sums<A>(xr, V, st, y);
      scale = r.scale;
      So = r.S_other;
      Ss = r.S;
      if (std::isinf(Ss)) S_other = S = So = Ss = NAN;  // a +inf logit: NaN loss and gradient, as with softmax
    }
    const A wy = weight ? weight[y] : A(1);
    A l = A(1 - eps) * wy * nll_term(So, sy, scale, static_cast<A>(xr[y * st]));
    if (eps > 0) {
      // label smoothing: (eps / V) * sum_c w_c * (log S - log s(x_c))
      const A logS = std::log(Ss) - std::log(scale);
      A smooth = 0;
      if (weight) {
        LF_SIMD_SUM(smooth)
        for (int64_t c = 0; c < V; ++c) smooth += weight[c] * (logS - log_s<A>(static_cast<A>(xr[c * st])));
      } else {
        LF_SIMD_SUM(smooth)
        for (int64_t c = 0; c < V; ++c) smooth += logS - log_s<A>(static_cast<A>(xr[c * st]));
      }
      l += A(eps / V) * smooth;
    }
    loss[r] = l;
    sr[0] = S_other;
    sr[1] = S;  // inf where the sum overflowed: the backward then sums again, scaled
    sr[2] = wy;
  }
}

// dL/dx_c = g_row * h(x_c) * [(1 - eps) w_y (p_c - [c == y]) + (eps / V) (p_c W - w_c)],  W = sum_c w_c,
// with p_y - 1 = -S_-y / S taken from the saved stats (no cancellation for confident rows).
template <typename T, bool Contig>
void ce_backward_rows(const typename Acc<T>::type* grad_rows, bool grad_scalar, const T* x,
                      const int64_t* target, const typename Acc<T>::type* weight, typename Acc<T>::type W,
                      const typename Acc<T>::type* stats, T* gx, RowLayout L, int64_t r0, int64_t r1,
                      int64_t ignore_index, double eps, BadTarget& bad) {
  using A = typename Acc<T>::type;
  const int64_t V = L.V, st = Contig ? 1 : L.inner;
  const A coef_s = A(eps / V);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t y = target[r];
    const int64_t b = L.base(r);
    T* o = gx + b;
    const bool valid = y != ignore_index && y >= 0 && y < V;
    if (!valid) {
      if (y != ignore_index) bad.record(r);
      for (int64_t c = 0; c < V; ++c) o[c * st] = static_cast<T>(0);
      continue;
    }
    const T* xr = x + b;
    const A* sr = stats + 3 * r;
    const A g = grad_rows[grad_scalar ? 0 : r];
    A S_other = sr[0], S = sr[1], scale = 1;  // p_c = s_c scale / S; not 1 only where S overflowed
    if (std::isinf(S)) {  // the forward's sum overflowed: sum again, scaled (see overflow_scale)
      const ScaledSums<A> r = scaled_sums<A>(xr, V, st, y);
      scale = r.scale;
      S = r.S;
      S_other = r.S_other;
    }
    const A invS = A(1) / S, coef_t = A(1 - eps) * sr[2];
    // the rows' loops, with s_c scaled (kScaled) or as they are (every row but an overflowed one)
    auto row = [&](auto scaled) {
      constexpr bool kScaled = decltype(scaled)::value;
      if (weight) {
        LF_SIMD
        for (int64_t c = 0; c < V; ++c) {
          A sc, hc;
          s_and_h<A>(static_cast<A>(xr[c * st]), sc, hc);
          const A p = (kScaled ? sc * scale : sc) * invS;
          o[c * st] = static_cast<T>(g * hc * (coef_t * p + coef_s * (p * W - weight[c])));
        }
      } else {
        // without class weights W = V and w_c = 1: d = p (coef_t + eps) - eps / V
        const A a = coef_t + coef_s * W, b = coef_s;
        LF_SIMD
        for (int64_t c = 0; c < V; ++c) {
          A sc, hc;
          s_and_h<A>(static_cast<A>(xr[c * st]), sc, hc);
          o[c * st] = static_cast<T>(g * hc * (a * (kScaled ? sc * scale : sc) * invS - b));
        }
      }
    };
    if (scale == A(1)) row(std::false_type{});
    else row(std::true_type{});
    const A xy = static_cast<A>(xr[y * st]);
    const A py = s<A>(xy) * scale * invS;
    const A wy = weight ? weight[y] : A(1);
    o[y * st] = static_cast<T>(g * h<A>(xy) * (-coef_t * S_other * invS + coef_s * (py * W - wy)));
  }
}

void raise_bad_target(const BadTarget& bad, const Tensor& target, int64_t V, int64_t ignore_index) {
  const int64_t r = bad.row.load();
  if (r < 0) return;
  STD_TORCH_CHECK(false, kCE, ": target value ", target.const_data_ptr<int64_t>()[r], " at flat index ", r,
                  " is out of range: expected a class index in [0, ", V, ") or ignore_index=", ignore_index);
}

Tensor stablemax_cpu(Tensor x, int64_t dim, bool log) {
  check_input(x, false, "stablemax", "x");
  const DimSplit d = split_at_dim(x, dim, "stablemax");
  Tensor out = torch::stable::empty_like(x);
  if (x.numel() == 0) return out;
  const RowLayout L{d.size, d.inner};
  LF_DISPATCH_FLOATING(x.scalar_type(), "stablemax", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    with_layout(d.inner == 1, [&](auto contig) {
      torch::stable::parallel_for(0, d.rows(), grain(d.size), [&](int64_t a, int64_t b) {
        stablemax_rows<scalar_t, decltype(contig)::value>(xp, op, L, a, b, log);
      });
    });
  });
  return out;
}

Tensor stablemax_backward_cpu(Tensor grad, Tensor x, Tensor out, int64_t dim, bool log) {
  const char* op = "stablemax_backward";
  check_stablemax_backward_args(grad, x, out, false, op);
  const DimSplit d = split_at_dim(x, dim, op);
  Tensor gx = torch::stable::empty_like(x);
  if (x.numel() == 0) return gx;
  const RowLayout L{d.size, d.inner};
  LF_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                   *yp = out.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    with_layout(d.inner == 1, [&](auto contig) {
      torch::stable::parallel_for(0, d.rows(), grain(d.size), [&](int64_t a, int64_t b) {
        stablemax_backward_rows<scalar_t, decltype(contig)::value>(gp, xp, yp, gxp, L, a, b, log);
      });
    });
  });
  return gx;
}

std::tuple<Tensor, Tensor> stablemax_cross_entropy_cpu(Tensor input, Tensor target, std::optional<Tensor> weight,
                                                       int64_t dim, int64_t ignore_index, double label_smoothing) {
  const DimSplit d = check_ce_args(input, target, weight, dim, false, kCE);
  STD_TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, kCE,
                  ": label_smoothing must be in [0, 1], got ", label_smoothing);
  Tensor loss, stats;
  std::tie(loss, stats) = new_ce_outputs(input, target);
  if (d.rows() == 0) return {loss, stats};
  STD_TORCH_CHECK(d.size > 0, kCE, ": input has no classes (size 0 at the class dimension)");
  STD_TORCH_CHECK(d.size <= INT32_MAX, kCE, ": more than 2^31 - 1 classes are not supported");  // 32-bit loop
  const RowLayout L{d.size, d.inner};
  BadTarget bad;
  LF_DISPATCH_FLOATING(input.scalar_type(), kCE, [&] {
    using A = typename Acc<scalar_t>::type;
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const int64_t* tp = target.const_data_ptr<int64_t>();
    const A* wp = weight.has_value() ? weight->const_data_ptr<A>() : nullptr;
    A* lp = loss.mutable_data_ptr<A>();
    A* sp = stats.mutable_data_ptr<A>();
    with_layout(d.inner == 1, [&](auto contig) {
      torch::stable::parallel_for(0, d.rows(), grain(d.size), [&](int64_t a, int64_t b) {
        ce_forward_rows<scalar_t, decltype(contig)::value>(xp, tp, wp, lp, sp, L, a, b, ignore_index,
                                                           label_smoothing, bad);
      });
    });
  });
  raise_bad_target(bad, target, d.size, ignore_index);
  return {loss, stats};
}

Tensor stablemax_cross_entropy_backward_cpu(Tensor grad_rows, Tensor input, Tensor target,
                                            std::optional<Tensor> weight, Tensor stats, int64_t dim,
                                            int64_t ignore_index, double label_smoothing) {
  const char* op = "stablemax_cross_entropy_backward";
  const DimSplit d = check_ce_args(input, target, weight, dim, false, op);
  check_ce_backward_args(grad_rows, stats, input, d, op);
  Tensor gx = torch::stable::empty_like(input);
  if (input.numel() == 0) return gx;
  const RowLayout L{d.size, d.inner};
  BadTarget bad;
  LF_DISPATCH_FLOATING(input.scalar_type(), op, [&] {
    using A = typename Acc<scalar_t>::type;
    const A* wp = weight.has_value() ? weight->const_data_ptr<A>() : nullptr;
    A W = A(d.size);
    if (wp) {
      W = 0;
      for (int64_t c = 0; c < d.size; ++c) W += wp[c];
    }
    const A* gp = grad_rows.const_data_ptr<A>();
    const bool scalar = grad_rows.numel() == 1 && d.rows() != 1;
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const int64_t* tp = target.const_data_ptr<int64_t>();
    const A* sp = stats.const_data_ptr<A>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    with_layout(d.inner == 1, [&](auto contig) {
      torch::stable::parallel_for(0, d.rows(), grain(d.size), [&](int64_t a, int64_t b) {
        ce_backward_rows<scalar_t, decltype(contig)::value>(gp, scalar, xp, tp, wp, W, sp, gxp, L, a, b,
                                                            ignore_index, label_smoothing, bad);
      });
    });
  });
  raise_bad_target(bad, target, d.size, ignore_index);
  return gx;
}

// Float64 sums of K terms per element (term(i, sums) adds element i's), over fixed chunks added in chunk
// order: the same result for any number of threads.
template <int K, typename F>
std::array<double, K> chunked_sums(int64_t n, int64_t chunk, F term) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::vector<std::array<double, K>> partial(nchunks);
  torch::stable::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::array<double, K> s{};
      for (int64_t i = c * chunk, hi = std::min(n, i + chunk); i < hi; ++i) term(i, s);
      partial[c] = s;
    }
  });
  std::array<double, K> total{};
  for (const auto& p : partial)
    for (int k = 0; k < K; ++k) total[k] += p[k];
  return total;
}

// ⊥Grad: pass 1 sums w.g, w.w, g.g; pass 2 the squared norm of g_perp = g - proj w exactly as pass 3
// writes it; pass 3 writes g_perp * |g| / (|g_perp| + 1e-30) in place. The norm is measured, not taken
// from the closed form |g|^2 - (w.g)^2 / |w|^2: when g is (nearly) parallel to w, as it always is for a
// one-element parameter, that cancels to ~0 while g_perp is rounding noise, and g would be blown up.
void orthograd_cpu(Tensor grad, Tensor param) {
  const char* op = "orthograd_";
  check_orthograd_args(grad, param, false);
  const int64_t n = grad.numel();
  if (n == 0) return;
  constexpr int64_t kChunk = 1 << 16;
  LF_DISPATCH_FLOATING(grad.scalar_type(), op, [&] {
    using A = typename Acc<scalar_t>::type;
    const scalar_t* w = param.const_data_ptr<scalar_t>();
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const auto dots = chunked_sums<3>(n, kChunk, [&](int64_t i, std::array<double, 3>& s) {
      const double wi = static_cast<A>(w[i]), gi = static_cast<A>(g[i]);
      s[0] += wi * gi;
      s[1] += wi * wi;
      s[2] += gi * gi;
    });
    const A proj = static_cast<A>(dots[0] / (dots[1] + 1e-30));
    auto perp = [&](int64_t i) { return static_cast<A>(g[i]) - proj * static_cast<A>(w[i]); };
    const double perp2 = chunked_sums<1>(n, kChunk, [&](int64_t i, std::array<double, 1>& s) {
      const double p = perp(i);
      s[0] += p * p;
    })[0];
    const A scale = static_cast<A>(orthograd_scale<A>(dots[2], perp2));
    torch::stable::parallel_for(0, n, kChunk, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) g[i] = static_cast<scalar_t>(perp(i) * scale);
    });
  });
}

}  // namespace
}  // namespace stablemax
}  // namespace lossforge

STABLE_TORCH_LIBRARY_IMPL(lossforge, CPU, m) {
  using namespace lossforge::stablemax;
  m.impl("stablemax", TORCH_BOX(&stablemax_cpu));
  m.impl("stablemax_backward", TORCH_BOX(&stablemax_backward_cpu));
  m.impl("stablemax_cross_entropy", TORCH_BOX(&stablemax_cross_entropy_cpu));
  m.impl("stablemax_cross_entropy_backward", TORCH_BOX(&stablemax_cross_entropy_backward_cpu));
  m.impl("orthograd_", TORCH_BOX(&orthograd_cpu));
}
