// StableMax math (csrc/stablemax/stablemax.h) on known values, limits and the branch point.
#include <limits>

#include "check.h"
#include "stablemax/stablemax.h"

using namespace lossforge::stablemax;

int main() {
  const double inf = std::numeric_limits<double>::infinity();
  // s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0
  for (double x : {0.0, 1.0, 2.5, 1e6}) CHECK_NEAR(s(x), x + 1, 1e-15);
  for (double x : {-1.0, -0.25, -3.0, -1e6}) CHECK_NEAR(s(x), 1 / (1 - x), 1e-15);
  CHECK(s(1.0f) == 2.0f);           // exactly, in float32: the point where torch.where gives NaN grads
  CHECK(s(-inf) == 0.0);            // -inf logits are masked
  CHECK(s(inf) == inf);
  CHECK(std::isnan(s(std::nan(""))));
  // log s(x) = sign(x) log1p(|x|), and h = d log s / dx = 1 / (1 + |x|), continuous at 0 (s is C^1)
  for (double x : {-5.0, -0.5, -1e-9, 0.0, 1e-9, 0.5, 5.0}) {
    CHECK_NEAR(log_s(x), std::log(s(x)), 1e-14);
    const double e = 1e-6;
    CHECK_NEAR((log_s(x + e) - log_s(x - e)) / (2 * e), h(x), 1e-6);  // h has a kink at 0: O(e) error
    double sv, hv;
    s_and_h(x, sv, hv);
    CHECK(sv == s(x));
    CHECK_NEAR(hv, h(x), 1e-15);
  }
  CHECK(h(-inf) == 0.0 && h(inf) == 0.0);
  // the row layout of [outer, V, inner]
  RowLayout L{5, 3};
  CHECK(L.base(0) == 0 && L.base(2) == 2 && L.base(3) == 15 && L.base(4) == 16);
  if (failures() == 0) std::printf("test_stablemax: all checks passed\n");
  return failures();
}
