// Sliced Wasserstein CPU kernel: project, sort and the 1D distance fused per (pair, slice), parallel over
// (pair, block of slices) tasks on torch's thread pool. Each task's working set (the pair's points, two
// key/index arrays, per-point coefficients) stays in L1/L2; only B x L slice values and, when asked, the
// gradients of each pair's value (same sizes as the inputs) are written.
//
// The op returns value[b] = mean_l W_p^p(theta_l # mu_b, theta_l # nu_b) and, in the same pass, the
// gradient of value[b] with respect to the points, the weights and the projections. Autograd (Python)
// scales these by the incoming gradient, so every slice is sorted exactly once per forward+backward.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/common.h"
#include "sliced_wasserstein/sliced_wasserstein.h"
#include "sliced_wasserstein/sliced_wasserstein_args.h"
#include "sliced_wasserstein/sliced_wasserstein_sort.h"

namespace lossforge {
namespace sliced_wasserstein {
namespace {

// ---------------------------------------------------------------------------------------------------
// One pair's inputs and the options shared by all its slices.
template <typename T>
struct Pair {
  const T* x;        // [N, d]
  const T* y;        // [M, d]
  const T* wx;       // [N] or nullptr (uniform)
  const T* wy;       // [M] or nullptr
  double inv_sx, inv_sy;  // 1 / sum of the weights
  const T* theta;    // the projections tensor, indexed through ProjLayout with pair index bt
  int64_t bt;
};

struct Options {
  int64_t N, M, d, L;
  ProjLayout P;
  bool fast;  // equal sizes and uniform weights
  bool grad_points, grad_weights, grad_projections;
};

// Per-thread scratch, reused across tasks. Points are kept transposed ([d][n], coordinate-major) for the
// task's pair, so projecting, the point gradients (an axpy per coordinate) and the projection gradients
// (a dot product per coordinate) all run over contiguous arrays and vectorise.
template <typename T>
struct Scratch {
  SideScratch<T> X, Y;
  std::vector<T> xt, yt;        // the pair's points, [d][N] and [d][M]
  std::vector<T> gxt, gyt;      // the task's point gradients, [d][N] and [d][M]
  std::vector<T> cx, cy;        // d value / d projection of the current slice, per point (original order)
  std::vector<double> Ax, By;   // cumulative weights of the sorted atoms
  std::vector<double> gu, gv;   // d W / d u_(i), d W / d v_(j)
  std::vector<double> dA, dB;   // d W / d A_i, d W / d B_j
  std::vector<T> th;            // theta_l

  Scratch(int64_t N, int64_t M, int64_t d, bool general, bool grad_points) {
    X.resize(N);
    Y.resize(M);
    xt.resize(N * d);
    yt.resize(M * d);
    if (grad_points) {
      gxt.resize(N * d);
      gyt.resize(M * d);
    }
    cx.resize(N);
    cy.resize(M);
    th.resize(d);
    if (general) {
      Ax.resize(N); By.resize(M); gu.resize(N); gv.resize(M); dA.resize(N); dB.resize(M);
    }
  }
};

template <typename T>
void transpose_in(const T* pts, int64_t n, int64_t d, T* out) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) out[k * n + i] = pts[i * d + k];
}

// Projects the n points (transposed, [d][n]) onto th into v; returns their min and max, and false if a
// projected value is not finite.
template <typename T>
bool project(const T* pt, int64_t n, int64_t d, const T* th, T* v, T& lo, T& hi) {
  {
    const T t0 = th[0];
    for (int64_t i = 0; i < n; ++i) v[i] = pt[i] * t0;
  }
  for (int64_t k = 1; k < d; ++k) {
    const T tk = th[k];
    const T* pk = pt + k * n;
    for (int64_t i = 0; i < n; ++i) v[i] += pk[i] * tk;
  }
  constexpr int W = 8;
  T l[W], h[W], bad[W];
  for (int w = 0; w < W; ++w) {
    l[w] = std::numeric_limits<T>::infinity();
    h[w] = -std::numeric_limits<T>::infinity();
    bad[w] = 0;
  }
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int w = 0; w < W; ++w) {
      const T s = v[i + w];
      l[w] = s < l[w] ? s : l[w];
      h[w] = s > h[w] ? s : h[w];
      bad[w] += s * T(0);  // NaN if s is NaN or infinite
    }
  for (; i < n; ++i) {
    const T s = v[i];
    l[0] = s < l[0] ? s : l[0];
    h[0] = s > h[0] ? s : h[0];
    bad[0] += s * T(0);
  }
  T b = 0;
  lo = l[0];
  hi = h[0];
  for (int w = 0; w < W; ++w) {
    lo = l[w] < lo ? l[w] : lo;
    hi = h[w] > hi ? h[w] : hi;
    b += bad[w];
  }
  return b == T(0);
}

// sum_i a[i] * b[i] with 8 independent partial sums (vectorises; float32 partials are exact enough).
template <typename T>
double dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int w = 0; w < 8; ++w) acc[w] += a[i + w] * b[i + w];
  double s = 0;
  for (; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  for (int w = 0; w < 8; ++w) s += acc[w];
  return s;
}

// One side's share of a slice's gradients: G_k += c * theta_k (G transposed, if given) and
// gt_k += <c, pts_k> (if given).
template <typename T>
void side_grads(const T* c, const T* pt, int64_t n, int64_t d, const T* th, T* G, double* gt) {
  for (int64_t k = 0; k < d; ++k) {
    if (G) {
      const T tk = th[k];
      T* Gk = G + k * n;
      for (int64_t i = 0; i < n; ++i) Gk[i] += c[i] * tk;
    }
    if (gt) gt[k] += dot(c, pt + k * n, n);
  }
}

// Outputs of one task (one pair, a block of slices): gradient accumulators, possibly private partials.
template <typename T>
struct TaskOut {
  T* gx;          // [N, d] or nullptr
  T* gy;          // [M, d] or nullptr
  double* gax;    // [N] d value / d (normalised weight), or nullptr
  double* gay;    // [M]
  T* gtheta;      // this pair's [d, L] block of the projection gradient, or nullptr
  double* vals;   // this pair's [L] slice values
};

// Cumulative weights A[i] = a_(0) + ... + a_(i) of the sorted atoms (uniform 1/n without weights). Their
// total is 1 up to rounding: every entry at the final total (the last atom of positive weight and the
// zero-weight atoms sorted after it) is set to exactly 1, so that no rounding sliver is charged to a
// zero-weight atom (a padding point far away would otherwise change the value).
template <typename T>
void cumulative_weights(double* A, const T* w, const uint32_t* idx, int64_t n, double inv_sum) {
  double acc = 0;
  if (w) {
    for (int64_t i = 0; i < n; ++i) A[i] = (acc += static_cast<double>(w[idx[i]]) * inv_sum);
  } else {
    for (int64_t i = 0; i < n; ++i) A[i] = static_cast<double>(i + 1) / static_cast<double>(n);
  }
  const double total = A[n - 1];
  for (int64_t i = n - 1; i >= 0 && A[i] == total; --i) A[i] = 1.0;
}

// The slice's d W / d a_(k) into g (scaled by invL), up to a constant shared by every atom, which the
// normalisation removes: the change of W per unit of mass moved to atom k from the reference atom r, the
// last of positive weight (the first with A == 1). For k <= r the boundaries A_k .. A_{r-1} move up
// (dA[i]: d W / d A_i from the merge; at A_i = 0, before the first atom of positive weight, the boundary
// meets the first v of positive weight); for k > r (zero weight, sorted after r) the mass moves from u_r
// to u_k at the top, against the last v of positive weight. The boundaries at the top are never summed
// into an atom of positive weight: a zero-weight atom far away leaves their gradients as they are.
template <typename T>
void weight_gradient(const double* A, const T* u, int64_t n, const double* B, const T* v, int64_t m,
                     const double* dA, const PowP<T>& pw, const uint32_t* idx, double invL, double* g) {
  auto cost = [&](T a, T b) { return static_cast<double>(pw.value(a - b)); };
  const int64_t r = std::lower_bound(A, A + n, 1.0) - A;
  const int64_t z = std::upper_bound(A, A + n, 0.0) - A;
  const T v_first = v[std::upper_bound(B, B + m, 0.0) - B];
  const T v_top = v[std::lower_bound(B, B + m, 1.0) - B];
  double suffix = 0;
  for (int64_t k = r; k >= 0; --k) {
    if (k < r) suffix += k < z ? cost(u[k], v_first) - cost(u[k + 1], v_first) : dA[k];
    g[idx[k]] += suffix * invL;
  }
  const double top = cost(u[r], v_top);
  for (int64_t k = r + 1; k < n; ++k) g[idx[k]] += (cost(u[k], v_top) - top) * invL;
}

// One slice l of one pair: projects, sorts, computes W_p^p into out.vals[l] and adds this slice's share
// (1/L) of the gradients to the task's accumulators. Returns false if a projected value is not finite.
template <typename T>
bool run_slice(Scratch<T>& s, const Pair<T>& pr, const Options& o, const PowP<T>& pw, int64_t l,
               const TaskOut<T>& out) {
  const int64_t N = o.N, M = o.M, d = o.d;
  for (int64_t k = 0; k < d; ++k) s.th[k] = pr.theta[o.P.at(pr.bt, k, l)];
  const T* th = s.th.data();
  T xlo, xhi, ylo, yhi;
  if (!project(s.xt.data(), N, d, th, s.X.v.data(), xlo, xhi) ||
      !project(s.yt.data(), M, d, th, s.Y.v.data(), ylo, yhi))
    return false;
  sort_side(s.X, N, xlo, xhi);
  sort_side(s.Y, M, ylo, yhi);
  const T* u = s.X.sv.data();
  const T* v = s.Y.sv.data();
  const uint32_t* ix = s.X.si.data();
  const uint32_t* iy = s.Y.si.data();

  const bool grad_pos = o.grad_points || o.grad_projections;
  const double invL = 1.0 / static_cast<double>(o.L);
  T* cx = s.cx.data();
  T* cy = s.cy.data();

  if (o.fast) {
    // Equal sizes, uniform weights: the i-th smallest of u meets the i-th smallest of v.
    double W = 0;
    if (!grad_pos) {
      T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 8 <= N; i += 8)
        for (int w = 0; w < 8; ++w) acc[w] += pw.value(u[i + w] - v[i + w]);
      for (; i < N; ++i) W += static_cast<double>(pw.value(u[i] - v[i]));
      for (int w = 0; w < 8; ++w) W += static_cast<double>(acc[w]);
    } else {
      const T scale = static_cast<T>(invL / static_cast<double>(N));
      for (int64_t i = 0; i < N; ++i) {
        const T t = u[i] - v[i];
        W += static_cast<double>(pw.value(t));
        const T c = pw.deriv(t) * scale;
        cx[ix[i]] = c;
        cy[iy[i]] = -c;
      }
    }
    out.vals[l] = W / static_cast<double>(N);
  } else {
    // General: merge the cumulative weights of the two sorted sides in one walk.
    double* A = s.Ax.data();
    double* Bc = s.By.data();
    cumulative_weights(A, pr.wx, ix, N, pr.inv_sx);
    cumulative_weights(Bc, pr.wy, iy, M, pr.inv_sy);
    const bool gw = o.grad_weights;
    double* gu = s.gu.data();
    double* gv = s.gv.data();
    double* dA = s.dA.data();
    double* dB = s.dB.data();
    if (grad_pos) {
      std::fill(gu, gu + N, 0.0);
      std::fill(gv, gv + M, 0.0);
    }
    if (gw) {
      std::fill(dA, dA + N, 0.0);
      std::fill(dB, dB + M, 0.0);
    }
    double W = 0, q = 0;
    int64_t i = 0, j = 0;
    while (i < N && j < M) {
      const double a = A[i], b = Bc[j];
      const T t = u[i] - v[j];
      const double end = a < b ? a : b;
      const double len = end > q ? end - q : 0.0;
      const double cost = static_cast<double>(pw.value(t));
      W += len * cost;
      if (grad_pos && len > 0) {
        const double g = len * static_cast<double>(pw.deriv(t));
        gu[i] += g;
        gv[j] -= g;
      }
      if (end > q) q = end;
      // Moving A_i (the end of u_(i)'s step) trades u_(i+1) for u_(i) against the v active at A_i.
      if (gw && a <= b && i + 1 < N) dA[i] = cost - static_cast<double>(pw.value(u[i + 1] - v[j]));
      if (gw && b <= a && j + 1 < M) dB[j] = cost - static_cast<double>(pw.value(v[j + 1] - u[i]));
      if (a <= b) ++i;
      if (b <= a) ++j;
    }
    out.vals[l] = W;
    if (grad_pos) {
      for (int64_t k = 0; k < N; ++k) cx[ix[k]] = static_cast<T>(gu[k] * invL);
      for (int64_t k = 0; k < M; ++k) cy[iy[k]] = static_cast<T>(gv[k] * invL);
    }
    if (gw) {
      if (out.gax) weight_gradient(A, u, N, Bc, v, M, dA, pw, ix, invL, out.gax);
      if (out.gay) weight_gradient(Bc, v, M, A, u, N, dB, pw, iy, invL, out.gay);
    }
  }

  if (grad_pos) {
    double gtl[16];
    std::vector<double> big;
    double* gt = nullptr;
    if (o.grad_projections) {
      if (d > 16) {
        big.assign(d, 0.0);
        gt = big.data();
      } else {
        for (int64_t k = 0; k < d; ++k) gtl[k] = 0;
        gt = gtl;
      }
    }
    T* gxt = o.grad_points ? s.gxt.data() : nullptr;
    T* gyt = o.grad_points ? s.gyt.data() : nullptr;
    side_grads(cx, s.xt.data(), N, d, th, gxt, gt);
    side_grads(cy, s.yt.data(), M, d, th, gyt, gt);
    if (gt)
      for (int64_t k = 0; k < d; ++k) out.gtheta[k * o.L + l] = static_cast<T>(gt[k]);
  }
  return true;
}

// Runs slices l0 .. l1 - 1 of one pair: loads the pair (transposed), runs the slices, and adds the
// accumulated point gradients to out.gx / out.gy. Returns the first failing slice, or -1.
template <typename T>
int64_t run_task(Scratch<T>& s, const Pair<T>& pr, const Options& o, const PowP<T>& pw, int64_t l0, int64_t l1,
                 const TaskOut<T>& out) {
  const int64_t N = o.N, M = o.M, d = o.d;
  transpose_in(pr.x, N, d, s.xt.data());
  transpose_in(pr.y, M, d, s.yt.data());
  if (o.grad_points) {
    std::fill(s.gxt.begin(), s.gxt.end(), T(0));
    std::fill(s.gyt.begin(), s.gyt.end(), T(0));
  }
  for (int64_t l = l0; l < l1; ++l)
    if (!run_slice(s, pr, o, pw, l, out)) return l;
  if (o.grad_points) {
    for (int64_t i = 0; i < N; ++i)
      for (int64_t k = 0; k < d; ++k) out.gx[i * d + k] += s.gxt[k * N + i];
    for (int64_t j = 0; j < M; ++j)
      for (int64_t k = 0; k < d; ++k) out.gy[j * d + k] += s.gyt[k * M + j];
  }
  return -1;
}

// Records the first failure seen inside the parallel loop; raised after it (never throw in the pool).
struct Failure {
  std::atomic<int> kind{0};  // 1: non-finite projection
  std::atomic<int64_t> pair{-1}, slice{-1};
  void record(int k, int64_t b, int64_t l) {
    int expected = 0;
    if (kind.compare_exchange_strong(expected, k)) {
      pair.store(b);
      slice.store(l);
    }
  }
};

// Checks one weights tensor row by row and returns 1 / row sums (float64).
template <typename T>
std::vector<double> weight_inverse_sums(const T* w, int64_t B, int64_t n, const char* arg) {
  std::vector<double> inv(B);
  for (int64_t b = 0; b < B; ++b) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double wi = static_cast<double>(w[b * n + i]);
      STD_TORCH_CHECK(std::isfinite(wi) && wi >= 0, kOp, ": ", arg, " must be finite and non-negative; got ", wi,
                      " at pair ", b, ", point ", i);
      s += wi;
    }
    STD_TORCH_CHECK(s > 0 && std::isfinite(s), kOp, ": ", arg, " of pair ", b,
                    " sum to 0 (each row needs a positive total)");
    inv[b] = 1.0 / s;
  }
  return inv;
}

Outputs sliced_wasserstein_cpu(Tensor x, Tensor y, std::optional<Tensor> x_weights, std::optional<Tensor> y_weights,
                               Tensor projections, double p, bool grad_points, bool grad_weights,
                               bool grad_projections) {
  const Args a = check_args(x, y, x_weights, y_weights, projections, p, grad_points, grad_weights, grad_projections,
                            /*cuda=*/false);
  Outputs outs = allocate_outputs(x, a);
  Tensor& value = std::get<0>(outs);
  Tensor& gx = std::get<1>(outs);
  Tensor& gy = std::get<2>(outs);
  Tensor& gwx = std::get<3>(outs);
  Tensor& gwy = std::get<4>(outs);
  Tensor& gth = std::get<5>(outs);
  const int64_t B = a.B, N = a.N, M = a.M, d = a.d, L = a.L;
  const bool shared = a.shared;
  grad_weights = a.grad_weights;
  if (B == 0) return outs;

  Options o;
  o.N = N;
  o.M = M;
  o.d = d;
  o.L = L;
  o.P = a.P;
  o.fast = a.fast;
  o.grad_points = grad_points;
  o.grad_weights = grad_weights;
  o.grad_projections = grad_projections;

  Failure fail;
  LF_DISPATCH_FLOAT_DOUBLE(x.scalar_type(), kOp, [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const T* yp = y.const_data_ptr<T>();
    const T* wxp = x_weights.has_value() ? x_weights->const_data_ptr<T>() : nullptr;
    const T* wyp = y_weights.has_value() ? y_weights->const_data_ptr<T>() : nullptr;
    const std::vector<double> inv_sx = wxp ? weight_inverse_sums(wxp, B, N, "x_weights") : std::vector<double>();
    const std::vector<double> inv_sy = wyp ? weight_inverse_sums(wyp, B, M, "y_weights") : std::vector<double>();
    const T* thp = projections.const_data_ptr<T>();
    const PowP<T> pw = PowP<T>::make(p);

    // Blocks of slices per pair: enough tasks to keep the pool busy when B is small. The split depends
    // only on the shapes (never on the thread count), and partial gradients are summed in block order,
    // so results are bitwise reproducible for any number of threads.
    const bool accumulates = grad_points || grad_weights;
    int64_t C = std::min<int64_t>(L, std::max<int64_t>(1, (32 + B - 1) / B));
    if (accumulates && C > 1) {
      const int64_t per_block = (N + M) * (d * static_cast<int64_t>(sizeof(T)) + 8);
      C = std::max<int64_t>(1, std::min<int64_t>(C, (int64_t(64) << 20) / std::max<int64_t>(1, B * per_block)));
    }
    const int64_t Lc = (L + C - 1) / C;
    C = (L + Lc - 1) / Lc;
    const bool partials = accumulates && C > 1;
    std::vector<T> pgx, pgy;
    std::vector<double> pgax, pgay;
    if (partials && grad_points) {
      pgx.assign(static_cast<size_t>(B * C * N * d), T(0));
      pgy.assign(static_cast<size_t>(B * C * M * d), T(0));
    }
    std::vector<double> gax, gay;  // [B (* C), n]: gradient w.r.t. the normalised weights
    if (grad_weights) {
      if (wxp) gax.assign(static_cast<size_t>(B * (partials ? C : 1) * N), 0.0);
      if (wyp) gay.assign(static_cast<size_t>(B * (partials ? C : 1) * M), 0.0);
    }
    std::vector<double> vals(static_cast<size_t>(B * L), 0.0);
    T* gxp = grad_points ? gx.mutable_data_ptr<T>() : nullptr;
    T* gyp = grad_points ? gy.mutable_data_ptr<T>() : nullptr;
    T* gthp = grad_projections ? gth.mutable_data_ptr<T>() : nullptr;

    // Tasks are handed out through an atomic counter rather than split statically, so a thread that the
    // OS preempts does not hold up the others (each task writes only its own slots: still deterministic).
    const int64_t tasks = B * C;
    std::atomic<int64_t> next{0};
    // Small problems run on the calling thread: waking the pool costs more than they do.
    const int64_t work = B * L * (N + M);
    const int64_t workers = work < (int64_t(1) << 18)
                                ? 1
                                : std::max<int64_t>(1, std::min<int64_t>(tasks, torch::stable::get_num_threads()));
    auto worker = [&](int64_t, int64_t) {
      Scratch<T> s(N, M, d, !o.fast, grad_points);
      for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
        const int64_t b = t / C, c = t % C;
        const int64_t slot = partials ? b * C + c : b;
        Pair<T> pr{xp + b * N * d, yp + b * M * d, wxp ? wxp + b * N : nullptr, wyp ? wyp + b * M : nullptr,
                   wxp ? inv_sx[b] : 0.0, wyp ? inv_sy[b] : 0.0, thp, shared ? 0 : b};
        TaskOut<T> out;
        out.gx = !grad_points ? nullptr : partials ? pgx.data() + slot * N * d : gxp + b * N * d;
        out.gy = !grad_points ? nullptr : partials ? pgy.data() + slot * M * d : gyp + b * M * d;
        out.gax = gax.empty() ? nullptr : gax.data() + slot * N;
        out.gay = gay.empty() ? nullptr : gay.data() + slot * M;
        out.gtheta = gthp ? gthp + b * d * L : nullptr;
        out.vals = vals.data() + b * L;
        const int64_t l1 = std::min(L, (c + 1) * Lc);
        const int64_t bad = run_task(s, pr, o, pw, c * Lc, l1, out);
        if (bad >= 0) {
          fail.record(1, b, bad);
          next.store(tasks);  // stop handing out work
          return;
        }
      }
    };
    if (workers == 1) worker(0, 1);
    else torch::stable::parallel_for(0, workers, 1, worker);
    if (fail.kind.load() != 0) return;

    // Deterministic reductions over slice blocks, then the per-pair values.
    const int64_t pair_grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, (N + M) * (d + 1)));
    torch::stable::parallel_for(0, B, pair_grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (partials && grad_points) {
          T* gxb = gxp + b * N * d;
          T* gyb = gyp + b * M * d;
          for (int64_t c = 0; c < C; ++c) {
            const T* src = pgx.data() + (b * C + c) * N * d;
            for (int64_t k = 0; k < N * d; ++k) gxb[k] += src[k];
            const T* srcy = pgy.data() + (b * C + c) * M * d;
            for (int64_t k = 0; k < M * d; ++k) gyb[k] += srcy[k];
          }
        }
        // d value / d w_i = (d value / d a_i - sum_k a_k d value / d a_k) / S   with a = w / S.
        for (int side = 0; side < 2; ++side) {
          const std::vector<double>& ga = side == 0 ? gax : gay;
          if (ga.empty()) continue;
          const int64_t n = side == 0 ? N : M;
          const T* w = (side == 0 ? wxp : wyp) + b * n;
          const double inv = side == 0 ? inv_sx[b] : inv_sy[b];
          T* dst = (side == 0 ? gwx : gwy).mutable_data_ptr<T>() + b * n;
          const int64_t nblk = partials ? C : 1;
          double dot = 0;
          for (int64_t i = 0; i < n; ++i) {
            if (w[i] == T(0)) continue;  // its g may be inf (a padding point far away): 0 * inf is NaN
            double g = 0;
            for (int64_t c = 0; c < nblk; ++c) g += ga[(b * nblk + c) * n + i];
            dot += g * static_cast<double>(w[i]) * inv;
          }
          for (int64_t i = 0; i < n; ++i) {
            double g = 0;
            for (int64_t c = 0; c < nblk; ++c) g += ga[(b * nblk + c) * n + i];
            dst[i] = static_cast<T>((g - dot) * inv);
          }
        }
        double sum = 0;
        for (int64_t l = 0; l < L; ++l) sum += vals[b * L + l];
        value.mutable_data_ptr<T>()[b] = static_cast<T>(sum / static_cast<double>(L));
      }
    });
  });
  STD_TORCH_CHECK(fail.kind.load() == 0, kOp, ": a projected value is not finite (pair ", fail.pair.load(),
                  ", projection ", fail.slice.load(), "): x, y and projections must be finite");
  return outs;
}

}  // namespace
}  // namespace sliced_wasserstein
}  // namespace lossforge

STABLE_TORCH_LIBRARY_IMPL(lossforge, CPU, m) {
  using namespace lossforge::sliced_wasserstein;
  m.impl("sliced_wasserstein", TORCH_BOX(&sliced_wasserstein_cpu));
}
