// PamC math (csrc/pamc/pamc.h): the online log-sum-exp against a direct sum, merging partial states in
// any order, empty rows, extreme exponents, and the pairwise row loss and its derivative.
#include <cmath>
#include <limits>
#include <vector>

#include "check.h"
#include "pamc/pamc.h"

using namespace lossforge::pamc;

int main() {
  const double inf = std::numeric_limits<double>::infinity();
  // sum_k w_k exp(x_k) in one pass, in any order
  const std::vector<double> x{0.3, -1.2, 2.5, 0.0, -0.7, 1.9, 2.5}, w{0.5, 2.0, 1.0, 0.25, 3.0, 1.5, 0.1};
  double direct = 0;
  for (size_t k = 0; k < x.size(); ++k) direct += w[k] * std::exp(x[k]);
  OnlineLSE fwd, rev;
  fwd.init();
  rev.init();
  for (size_t k = 0; k < x.size(); ++k) fwd.add(x[k], w[k]);
  for (size_t k = x.size(); k-- > 0;) rev.add(x[k], w[k]);
  CHECK_NEAR(fwd.value(), std::log(direct), 1e-14);
  CHECK_NEAR(rev.value(), std::log(direct), 1e-14);
  // two partial states merged equal one pass (the tiled forward merges one state per column tile)
  OnlineLSE a, b;
  a.init();
  b.init();
  for (size_t k = 0; k < 3; ++k) a.add(x[k], w[k]);
  for (size_t k = 3; k < x.size(); ++k) b.add(x[k], w[k]);
  OnlineLSE ab = a, ba = b;
  ab.merge(b.m, b.l);
  ba.merge(a.m, a.l);
  CHECK_NEAR(ab.value(), std::log(direct), 1e-14);
  CHECK_NEAR(ba.value(), std::log(direct), 1e-14);
  // an empty row is log 0 = -inf; merging an empty state changes nothing
  OnlineLSE e;
  e.init();
  CHECK(e.value() == -inf);
  OnlineLSE a2 = a;
  a2.merge(e.m, e.l);
  CHECK(a2.value() == a.value());
  e.merge(a.m, a.l);
  CHECK(e.value() == a.value());
  // exponents far beyond exp's range stay finite: log(e^1000 + e^999) = 1000 + log(1 + e^-1)
  OnlineLSE big;
  big.init();
  big.add(999.0, 1.0);
  big.add(1000.0, 1.0);
  CHECK_NEAR(big.value(), 1000.0 + std::log1p(std::exp(-1.0)), 1e-14);
  // NaN propagates: a NaN term, or a NaN partial sum merged in, makes the row NaN (never -inf or finite)
  OnlineLSE nan_term = a, nan_merge = a;
  nan_term.add(std::nan(""), 1.0);
  nan_term.add(5.0, 1.0);
  nan_merge.merge(0.0, std::nan(""));
  CHECK(std::isnan(nan_term.value()) && std::isnan(nan_merge.value()));
  // logaddexp and log(P + eps)
  CHECK_NEAR(logaddexp(std::log(2.0), std::log(3.0)), std::log(5.0), 1e-15);
  CHECK(logaddexp(-inf, 1.5) == 1.5 && logaddexp(1.5, -inf) == 1.5 && logaddexp(-inf, -inf) == -inf);
  CHECK_NEAR(log_plus_eps(-inf, kPamCEps), std::log(kPamCEps), 1e-15);  // an isolated node
  CHECK_NEAR(log_plus_eps(std::log(0.5), kPamCEps), std::log(0.5 + kPamCEps), 1e-15);
  CHECK(log_plus_eps(-inf, 0.0) == -inf);
  // pairwise row: -log(P / N + 1e-8) and its derivative a = r / (r + 1e-8), r = P / N
  for (double p : {1e-12, 0.3, 2.0}) {
    for (double n : {1.0, 7.5}) {
      CHECK_NEAR(pairwise_row_loss(std::log(p), std::log(n)), -std::log(p / n + kPairwiseEps), 1e-13);
      const double h = 1e-6;
      const double num = (pairwise_row_loss(std::log(p) - h, std::log(n)) -
                          pairwise_row_loss(std::log(p) + h, std::log(n))) / (2 * h);
      CHECK_NEAR(pairwise_row_weight(std::log(p), std::log(n)), num, 1e-7);
    }
  }
  CHECK(pairwise_row_weight(-inf, 0.0) == 0.0);
  CHECK_NEAR(pairwise_row_loss(-inf, 0.0), -std::log(kPairwiseEps), 1e-15);
  if (failures() == 0) std::printf("test_pamc: all checks passed\n");
  return failures();
}
