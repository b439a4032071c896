// M-FAC CPU kernels: the two memory-bound passes over the gradient buffer G [m, d] and the O(m^2)
// Cholesky "drop the oldest gradient" update (spec: shared/specs/mfac.md).
//
// Both passes split the columns of G into chunks of kChunk columns (never crossing a tensor of the
// parameter list) and run one chunk per task on torch's pool: a task walks all m rows over its
// columns, so each pass reads G exactly once, and the few vectors it multiplies stay in L1/L2.
// Pass 1 (t = G x) keeps one partial m-vector per chunk (float32 or float64 accumulators, then
// float64) and sums the chunks in order afterwards: the result is the same for any thread count.
// Pass 2 (y = beta x + alpha G^T b) has no cross-chunk reduction at all.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/common.h"
#include "mfac/mfac.h"
#include "mfac/mfac_host.h"

namespace lossforge {
namespace mfac {
namespace {

// ---------------------------------------------------------------------------------------------
// Inner loops (mfac_cpu_kernels.h), compiled for generic x86-64 and for AVX2, chosen at run time. Both give
// the same bits: same lanes, same order of operations, and no FMA contraction (mul and add stay apart).
// LOSSFORGE_MFAC_CPU_KERNELS=generic forces the generic ones (tests use it to cover both).

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors in internal, inlined helpers: no ABI involved
namespace generic {
#include "mfac/mfac_cpu_kernels.h"
}  // namespace generic
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LF_MFAC_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")  // no FMA: the same roundings as the generic build (bitwise the same results)
#define LF_MFAC_KERNELS_AVX2 1
namespace avx2 {
#include "mfac/mfac_cpu_kernels.h"
}  // namespace avx2
#undef LF_MFAC_KERNELS_AVX2
#pragma GCC pop_options
#endif
#pragma GCC diagnostic pop

template <typename S, typename A>
struct Kernels {
  void (*dots)(const S*, int64_t, int64_t, int64_t, const A*, int64_t, double*);
  void (*gemv_t)(const S*, int64_t, int64_t, int64_t, const A*, A*);
  void (*insert)(int64_t, const A*, const A*, A, S*, A*);
  void (*step)(int64_t, const A*, const A*, A*, A*, A, A, A, A, A);
};

inline bool use_avx2() {
#if defined(LF_MFAC_AVX2)
  static const bool cpu = __builtin_cpu_supports("avx2");
  const char* env = std::getenv("LOSSFORGE_MFAC_CPU_KERNELS");
  if (env != nullptr && std::strcmp(env, "generic") == 0) return false;
  return cpu;
#else
  return false;
#endif
}

template <typename S, typename A>
Kernels<S, A> kernels() {
#if defined(LF_MFAC_AVX2)
  if (use_avx2())
    return {&avx2::chunk_dots<S, A>, &avx2::chunk_gemv_t<S, A>, &avx2::chunk_insert<S, A>, &avx2::chunk_step<S, A>};
#endif
  return {&generic::chunk_dots<S, A>, &generic::chunk_gemv_t<S, A>, &generic::chunk_insert<S, A>,
          &generic::chunk_step<S, A>};
}

template <typename F>
void dispatch_storage(ScalarType s, F&& f) {
  switch (s) {
    case ScalarType::Float: f(static_cast<float*>(nullptr)); break;
    case ScalarType::Double: f(static_cast<double*>(nullptr)); break;
    default: f(static_cast<uint16_t*>(nullptr)); break;  // bfloat16 (checked before)
  }
}

// Sums the per-chunk partials [nchunks, W, m] in chunk order into out [W, m].
template <typename O>
void reduce_chunks(const std::vector<double>& part, int64_t nchunks, int64_t W, int64_t m, O* out) {
  std::vector<double> acc(W * m, 0.0);
  for (int64_t c = 0; c < nchunks; ++c) {
    const double* p = part.data() + c * W * m;
    for (int64_t k = 0; k < W * m; ++k) acc[k] += p[k];
  }
  for (int64_t k = 0; k < W * m; ++k) out[k] = static_cast<O>(acc[k]);
}

// ---------------------------------------------------------------------------------------------
// Ops.

// t = G x for x [d] or [V, d] (compute dtype); t [m] or [V, m].
Tensor mfac_gemv_cpu(Tensor G, Tensor x) {
  const char* op = "mfac_gemv";
  const ScalarType A_t = check_buffer(G, false, op);
  const int64_t m = G.size(0), d = G.size(1);
  check_vector_tensor(x, false, A_t, op, "x");
  const int64_t V = vector_count(x, d, op, "x");
  std::vector<int64_t> shape;
  if (x.dim() == 2) shape.push_back(V);
  shape.push_back(m);
  Tensor out = torch::stable::new_empty(x, shape, A_t);
  if (out.numel() == 0) return out;
  const std::vector<Chunk> chunks = make_chunks({d});
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  if (nchunks == 0) {
    torch::stable::zero_(out);
    return out;
  }
  std::vector<double> part(nchunks * V * m);
  dispatch_storage(G.scalar_type(), [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    using A = typename Compute<S>::type;
    const S* g = static_cast<const S*>(G.const_data_ptr());
    const int64_t ld = G.stride(0);
    const A* xp = x.const_data_ptr<A>();
    const Kernels<S, A> k = kernels<S, A>();
    torch::stable::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<A> xb(V * kChunk);
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        for (int64_t v = 0; v < V; ++v) std::copy_n(xp + v * d + ch.col, ch.len, xb.data() + v * ch.len);
        k.dots(g + ch.col, ld, m, ch.len, xb.data(), V, part.data() + c * V * m);
      }
    });
    reduce_chunks(part, nchunks, V, m, out.mutable_data_ptr<A>());
  });
  return out;
}

// y = beta x + alpha G^T b for b [m] or [V, m]; x (optional) like y: [d] or [V, d].
Tensor mfac_gemv_t_cpu(Tensor G, Tensor b, std::optional<Tensor> x, double alpha, double beta) {
  const char* op = "mfac_gemv_t";
  const ScalarType A_t = check_buffer(G, false, op);
  const int64_t m = G.size(0), d = G.size(1);
  check_vector_tensor(b, false, A_t, op, "b");
  const int64_t V = vector_count(b, m, op, "b");
  if (x.has_value()) {
    check_vector_tensor(*x, false, A_t, op, "x");
    STD_TORCH_CHECK(x->dim() == b.dim() && vector_count(*x, d, op, "x") == V, op,
                    ": x must be [d] or [k, d] matching b's [m] or [k, m]");
  }
  std::vector<int64_t> shape;
  if (b.dim() == 2) shape.push_back(V);
  shape.push_back(d);
  Tensor out = torch::stable::new_empty(b, shape, A_t);
  if (out.numel() == 0) return out;
  const std::vector<Chunk> chunks = make_chunks({d});
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  dispatch_storage(G.scalar_type(), [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    using A = typename Compute<S>::type;
    const S* g = static_cast<const S*>(G.const_data_ptr());
    const int64_t ld = G.stride(0);
    const A* bp = b.const_data_ptr<A>();
    const A* xp = x.has_value() ? x->const_data_ptr<A>() : nullptr;
    A* yp = out.mutable_data_ptr<A>();
    const A a = static_cast<A>(alpha), be = static_cast<A>(beta);
    const Kernels<S, A> k = kernels<S, A>();
    torch::stable::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<A> acc(kChunk);
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        for (int64_t v = 0; v < V; ++v) {
          k.gemv_t(g + ch.col, ld, m, ch.len, bp + v * m, acc.data());
          A* y = yp + v * d + ch.col;
          if (xp) {
            const A* xv = xp + v * d + ch.col;
            for (int64_t j = 0; j < ch.len; ++j) y[j] = be * xv[j] + a * acc[j];
          } else {
            for (int64_t j = 0; j < ch.len; ++j) y[j] = a * acc[j];
          }
        }
      }
    });
  });
  return out;
}

// Pass 1 of a step, fused with the insertion: x = concat(grads) + weight_decay * concat(params); writes
// G[row] = x rounded to the storage dtype (x_s) and returns G x_s [m] float64 (the new row of G G^T, and
// the t = G x_s of the step: with bfloat16 storage the step preconditions x_s, which lies in the
// window's span, rather than x, whose rounding residual F^-1 would amplify by 1 / damp).
Tensor mfac_insert_gemv_cpu(Tensor G, int64_t row, std::vector<Tensor> grads, std::vector<Tensor> params,
                            double weight_decay) {
  const char* op = "mfac_insert_gemv_";
  const ScalarType A_t = check_buffer(G, false, op);
  const int64_t m = G.size(0), d = G.size(1);
  STD_TORCH_CHECK(row >= 0 && row < m, op, ": row ", row, " is out of range for a buffer of m = ", m, " rows");
  const std::vector<int64_t> sizes = check_list(grads, false, A_t, d, op, "grads");
  const bool wd = !params.empty();
  if (wd) check_params_like(params, sizes, false, A_t, op, "params");
  Tensor out = torch::stable::new_empty(G, {m}, ScalarType::Double);
  const std::vector<Chunk> chunks = make_chunks(sizes);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  if (nchunks == 0) {
    torch::stable::zero_(out);
    return out;
  }
  std::vector<double> part(nchunks * m);
  dispatch_storage(G.scalar_type(), [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    using A = typename Compute<S>::type;
    S* g = static_cast<S*>(G.mutable_data_ptr());
    const int64_t ld = G.stride(0);
    std::vector<const A*> gp(grads.size()), pp(params.size());
    for (size_t t = 0; t < grads.size(); ++t) gp[t] = grads[t].const_data_ptr<A>();
    for (size_t t = 0; t < params.size(); ++t) pp[t] = params[t].const_data_ptr<A>();
    const A lam = static_cast<A>(weight_decay);
    const Kernels<S, A> k = kernels<S, A>();
    torch::stable::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<A> xb(kChunk);
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        A* xs = xb.data();
        k.insert(ch.len, gp[ch.tensor] + ch.start, wd ? pp[ch.tensor] + ch.start : nullptr, lam,
                 g + row * ld + ch.col, xs);
        k.dots(g + ch.col, ld, m, ch.len, xs, 1, part.data() + c * m);
      }
    });
    reduce_chunks(part, nchunks, 1, m, out.mutable_data_ptr<double>());
  });
  return out;
}

// Pass 2 of a step, fused with the optimizer: per coordinate, x = grad + weight_decay * p rounded to the
// storage dtype (as pass 1 stored it), y = beta x + alpha (G^T b), v = momentum v + (1 - momentum) y (momentum > 0), p -= lr * (v or y).
void mfac_step_cpu(Tensor G, Tensor b, std::vector<Tensor> params, std::vector<Tensor> grads,
                   std::optional<Tensor> momentum_buffer, double alpha, double beta, double lr,
                   double weight_decay, double momentum) {
  const char* op = "mfac_step_";
  const ScalarType A_t = check_buffer(G, false, op);
  const int64_t m = G.size(0), d = G.size(1);
  check_vector_tensor(b, false, A_t, op, "b");
  STD_TORCH_CHECK(b.dim() == 1 && b.size(0) == m, op, ": b must have shape [m] = [", m, "]");
  const std::vector<int64_t> sizes = check_list(grads, false, A_t, d, op, "grads");
  check_params_like(params, sizes, false, A_t, op, "params");
  STD_TORCH_CHECK(momentum >= 0.0 && momentum < 1.0, op, ": momentum must be in [0, 1), got ", momentum);
  if (momentum > 0.0) {
    STD_TORCH_CHECK(momentum_buffer.has_value(), op, ": momentum > 0 needs a momentum_buffer");
  }
  if (momentum_buffer.has_value()) {
    check_vector_tensor(*momentum_buffer, false, A_t, op, "momentum_buffer");
    STD_TORCH_CHECK(momentum_buffer->numel() == d, op, ": momentum_buffer must have d = ", d, " elements");
  }
  const std::vector<Chunk> chunks = make_chunks(sizes);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  if (nchunks == 0) return;
  dispatch_storage(G.scalar_type(), [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    using A = typename Compute<S>::type;
    const S* g = static_cast<const S*>(G.const_data_ptr());
    const int64_t ld = G.stride(0);
    const A* bp = b.const_data_ptr<A>();
    std::vector<const A*> gp(grads.size());
    std::vector<A*> pp(params.size());
    for (size_t t = 0; t < grads.size(); ++t) gp[t] = grads[t].const_data_ptr<A>();
    for (size_t t = 0; t < params.size(); ++t) pp[t] = params[t].mutable_data_ptr<A>();
    A* vp = (momentum > 0.0) ? momentum_buffer->mutable_data_ptr<A>() : nullptr;
    const A a = static_cast<A>(alpha), be = static_cast<A>(beta), lr_ = static_cast<A>(lr),
            wd = static_cast<A>(weight_decay), mu = static_cast<A>(momentum);
    const Kernels<S, A> k = kernels<S, A>();
    torch::stable::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<A> acc(kChunk);
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& ch = chunks[c];
        k.gemv_t(g + ch.col, ld, m, ch.len, bp, acc.data());
        k.step(ch.len, acc.data(), gp[ch.tensor] + ch.start, pp[ch.tensor] + ch.start, vp ? vp + ch.col : nullptr,
               a, be, lr_, wd, mu);
      }
    });
  });
}

// Replaces the oldest gradient of the window in the factor, in O(n^2) and one sweep over U.
// U [n, n] float64 row-major upper triangular, K = U^T U with the gradients in age order (oldest first).
// k [n]: the new gradient's row of the new K in the new age order (the n - 1 kept gradients, then its
// own diagonal entry without the shift); shift: s * damp, added to that diagonal entry.
// 1. Drop the oldest: K[1:, 1:] = R^T R + u u^T with R = U[1:, 1:], u = U[0, 1:], a rank-1 *update*
//    (stable; LINPACK-style rotations), written one row up and one column left.
// 2. Append the new gradient: w = U'^-T k[:n-1] by forward substitution in the same sweep (row r of U'
//    is final once the rotation reaches it), new last column = w, new corner = sqrt(k[n-1] + shift - w.w).
// Returns the pivot k[n-1] + shift - w.w ([1], float64; >= shift in exact arithmetic): the caller
// refactors when it is not comfortably positive (the corner is then left at 0).
Tensor mfac_chol_replace_oldest_cpu(Tensor U, Tensor k, double shift) {
  const char* op = "mfac_chol_replace_oldest_";
  check_device(U, false, op, "U");
  check_dtype(U, ScalarType::Double, op, "U");
  check_contiguous(U, op, "U");
  STD_TORCH_CHECK(U.dim() == 2 && U.size(0) == U.size(1) && U.size(0) >= 1, op, ": U must be square [n, n], n >= 1");
  const int64_t n = U.size(0);
  check_device(k, false, op, "k");
  check_dtype(k, ScalarType::Double, op, "k");
  check_contiguous(k, op, "k");
  STD_TORCH_CHECK(k.dim() == 1 && k.size(0) == n, op, ": k must have shape [n] = [", n, "]");
  Tensor piv_t = torch::stable::new_empty(U, {1}, ScalarType::Double);
  double* Up = U.mutable_data_ptr<double>();
  const double* kp = k.const_data_ptr<double>();
  std::vector<double> u(Up + 1, Up + n);  // u[j] pairs with old column j + 1
  std::vector<double> kv(kp, kp + n - 1);  // right-hand side of the forward substitution
  double* __restrict uu = u.data();
  double* __restrict kk = kv.data();
  double ww = 0.0;
  for (int64_t r = 0; r + 1 < n; ++r) {
    const double* __restrict src = Up + (r + 1) * n + 1;  // old row r + 1, old column j + 1 at [j]
    double* __restrict dst = Up + r * n;                   // new row r
    const double rkk = src[r], ur = uu[r];
    const double rr = std::hypot(rkk, ur);
    const double c = rr / rkk, s = ur / rkk, inv_c = rkk / rr;
    const double wr = kk[r] / rr;
    for (int64_t j = 0; j < r; ++j) dst[j] = 0.0;
    dst[r] = rr;
    for (int64_t j = r + 1; j + 1 < n; ++j) {
      const double nr = (src[j] + s * uu[j]) * inv_c;
      uu[j] = c * uu[j] - s * nr;
      kk[j] -= nr * wr;
      dst[j] = nr;
    }
    dst[n - 1] = wr;
    ww += wr * wr;
  }
  const double piv = kp[n - 1] + shift - ww;
  double* last = Up + (n - 1) * n;
  for (int64_t j = 0; j + 1 < n; ++j) last[j] = 0.0;
  last[n - 1] = piv > 0.0 ? std::sqrt(piv) : 0.0;
  piv_t.mutable_data_ptr<double>()[0] = piv;
  return piv_t;
}

// b = K^-1 t with K = U^T U: forward substitution with U^T, then back substitution with U, both reading
// U by rows (row-major, contiguous). t [n] or [n, k] float64. O(n^2 k), single-threaded on purpose:
// it is the m x m part of a step, small next to the passes over G, and a threaded BLAS trsv on a
// loaded 2-core machine spends more time waiting than solving.
Tensor mfac_chol_solve_cpu(Tensor U, Tensor t) {
  const char* op = "mfac_chol_solve";
  check_device(U, false, op, "U");
  check_dtype(U, ScalarType::Double, op, "U");
  STD_TORCH_CHECK(U.dim() == 2 && U.size(0) == U.size(1), op, ": U must be square [n, n]");
  STD_TORCH_CHECK(U.size(1) <= 1 || U.stride(1) == 1, op, ": U's rows must be contiguous");
  const int64_t n = U.size(0), ld = U.size(0) <= 1 ? 1 : U.stride(0);
  check_device(t, false, op, "t");
  check_dtype(t, ScalarType::Double, op, "t");
  check_contiguous(t, op, "t");
  STD_TORCH_CHECK((t.dim() == 1 || t.dim() == 2) && t.size(0) == n, op, ": t must be [n] or [n, k] with n = ", n);
  const int64_t k = t.dim() == 2 ? t.size(1) : 1;
  Tensor b = torch::stable::clone(t);
  if (b.numel() == 0) return b;
  const double* u = U.const_data_ptr<double>();
  double* x = b.mutable_data_ptr<double>();
  if (k == 1) {  // the common case, with vectorisable inner loops
    for (int64_t i = 0; i < n; ++i) {
      const double* __restrict ui = u + i * ld;
      double* __restrict xs = x;
      const double zi = xs[i] / ui[i];
      xs[i] = zi;
      for (int64_t j = i + 1; j < n; ++j) xs[j] -= ui[j] * zi;
    }
    for (int64_t i = n - 1; i >= 0; --i) {
      const double* __restrict ui = u + i * ld;
      const double* __restrict xs = x;
      double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      int64_t j = i + 1;
      for (; j + 4 <= n; j += 4) {
        a0 += ui[j] * xs[j];
        a1 += ui[j + 1] * xs[j + 1];
        a2 += ui[j + 2] * xs[j + 2];
        a3 += ui[j + 3] * xs[j + 3];
      }
      for (; j < n; ++j) a0 += ui[j] * xs[j];
      x[i] = (x[i] - ((a0 + a1) + (a2 + a3))) / ui[i];
    }
    return b;
  }
  for (int64_t i = 0; i < n; ++i) {  // U^T z = t, column-oriented: z_i, then subtract U[i, i+1:] z_i
    const double* __restrict ui = u + i * ld;
    double* __restrict xi = x + i * k;
    const double inv = 1.0 / ui[i];
    for (int64_t c = 0; c < k; ++c) xi[c] *= inv;
    for (int64_t j = i + 1; j < n; ++j) {
      const double uij = ui[j];
      double* __restrict xj = x + j * k;
      for (int64_t c = 0; c < k; ++c) xj[c] -= uij * xi[c];
    }
  }
  std::vector<double> acc(k);
  for (int64_t i = n - 1; i >= 0; --i) {  // U b = z, row-oriented dot products
    const double* __restrict ui = u + i * ld;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t j = i + 1; j < n; ++j) {
      const double uij = ui[j];
      const double* __restrict xj = x + j * k;
      for (int64_t c = 0; c < k; ++c) acc[c] += uij * xj[c];
    }
    double* xi = x + i * k;
    const double inv = 1.0 / ui[i];
    for (int64_t c = 0; c < k; ++c) xi[c] = (xi[c] - acc[c]) * inv;
  }
  return b;
}

}  // namespace
}  // namespace mfac
}  // namespace lossforge

STABLE_TORCH_LIBRARY_IMPL(lossforge, CPU, m) {
  using namespace lossforge::mfac;
  m.impl("mfac_gemv", TORCH_BOX(&mfac_gemv_cpu));
  m.impl("mfac_gemv_t", TORCH_BOX(&mfac_gemv_t_cpu));
  m.impl("mfac_insert_gemv_", TORCH_BOX(&mfac_insert_gemv_cpu));
  m.impl("mfac_step_", TORCH_BOX(&mfac_step_cpu));
  m.impl("mfac_chol_solve", TORCH_BOX(&mfac_chol_solve_cpu));
  m.impl("mfac_chol_replace_oldest_", TORCH_BOX(&mfac_chol_replace_oldest_cpu));
}
