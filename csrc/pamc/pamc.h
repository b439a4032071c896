// PamC math shared by the CPU and CUDA kernels (spec: shared/specs/pamc.md).
//
//   u_i  = z_i / max(|z_i|, 1e-12)                        (F.normalize; s_ij = u_i . u_j = cos(z_i, z_j))
//   x_e  = tau * s_ij for an edge e = (i, j), i != j;  x_e = 0 for a self-loop (self-similarity masked)
//   lse_i = log(sum_{e in row i} w_e exp(x_e) + eps)      (PamC: eps = 1e-10; pairwise: eps = 0)
//
// Rows are reduced with an online log-sum-exp: a running maximum m and a sum l of w * exp(x - m), so no
// exp overflows for any tau and nothing of size E x d is ever gathered. The backward needs, per edge,
// c_e = g_i * tau * w_e * exp(x_e - lse_i), recomputed from the saved lse_i.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/host_device.h"

namespace lossforge {
namespace pamc {

// Norm clamp of the cosine similarity (the eps of torch.nn.functional.normalize).
constexpr double kNormEps = 1e-12;
// The 1e-10 inside the log of the authors' PamC loss, and the 1e-8 of Graph-MLP's Ncontrast.
constexpr double kPamCEps = 1e-10;
constexpr double kPairwiseEps = 1e-8;

// Online log-sum-exp state of one row: sum_k w_k exp(x_k) = exp(m) * l.
struct OnlineLSE {
  double m;
  double l;
  LF_HOST_DEVICE void init() {
    m = -INFINITY;
    l = 0.0;
  }
  // Adds w * exp(x), w > 0.
  LF_HOST_DEVICE void add(double x, double w) {
    if (x > m) {
      l = l * exp(m - x) + w;
      m = x;
    } else {
      l += w * exp(x - m);
    }
  }
  // Merges another state (partial sums of one row computed apart). A NaN sum is merged: NaN propagates.
  LF_HOST_DEVICE void merge(double m2, double l2) {
    if (l2 == 0.0) return;
    if (m2 > m) {
      l = l * exp(m - m2) + l2;
      m = m2;
    } else {
      l += l2 * exp(m2 - m);
    }
  }
  // log(exp(m) * l), -inf for an empty row, NaN if a NaN was added (NaN z propagates, as in torch).
  LF_HOST_DEVICE double value() const { return l == 0.0 ? -INFINITY : m + log(l); }
};

// log(exp(a) + exp(b)) without overflow; either may be -inf.
LF_HOST_DEVICE double logaddexp(double a, double b) {
  if (a == -INFINITY) return b;
  if (b == -INFINITY) return a;
  const double hi = a > b ? a : b, lo = a > b ? b : a;
  return hi + log1p(exp(lo - hi));
}

// log(P + eps) from the row state (eps = 0 gives log P).
LF_HOST_DEVICE double log_plus_eps(double logp, double eps) {
  return eps > 0.0 ? logaddexp(logp, log(eps)) : logp;
}

// Graph-MLP's per-row loss  -log(P / N + 1e-8)  from log P and log N, and its derivative
// a = r / (r + 1e-8), r = P / N:  d loss / d log P = -a,  d loss / d log N = +a.
LF_HOST_DEVICE double pairwise_row_loss(double logp, double logn) {
  return -logaddexp(logp - logn, log(kPairwiseEps));
}
LF_HOST_DEVICE double pairwise_row_weight(double logp, double logn) {
  if (logp == -INFINITY) return 0.0;
  const double x = logp - logn;
  return exp(x - logaddexp(x, log(kPairwiseEps)));
}

}  // namespace pamc
}  // namespace lossforge
