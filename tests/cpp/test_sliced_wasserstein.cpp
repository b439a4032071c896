// Sliced Wasserstein math (csrc/sliced_wasserstein/sliced_wasserstein.h) and the CPU sort
// (sliced_wasserstein_sort.h): order-preserving keys, |t|^p and its derivative, and the (value, index)
// sort against std::sort on data that exercise each path (spread, ties, clustered, outlier, constant,
// more than 2^16 points).
#include <algorithm>
#include <random>
#include <vector>

#include "check.h"
#include "sliced_wasserstein/sliced_wasserstein.h"
#include "sliced_wasserstein/sliced_wasserstein_sort.h"

using namespace lossforge::sliced_wasserstein;

template <typename T>
SortPath check_sort(std::vector<T> v, const char* what) {
  const int64_t n = static_cast<int64_t>(v.size());
  SideScratch<T> s;
  s.resize(n);
  std::copy(v.begin(), v.end(), s.v.begin());
  const T lo = *std::min_element(v.begin(), v.end()), hi = *std::max_element(v.begin(), v.end());
  const SortPath path = sort_side(s, n, lo, hi);
  std::vector<uint32_t> want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = static_cast<uint32_t>(i);
  std::stable_sort(want.begin(), want.end(), [&](uint32_t a, uint32_t b) { return v[a] < v[b]; });
  bool same = true;
  for (int64_t i = 0; i < n; ++i) same &= s.si[i] == want[i] && s.sv[i] == v[want[i]];
  if (!same) std::printf("sort mismatch: %s (n = %lld)\n", what, static_cast<long long>(n));
  CHECK(same);
  return path;
}

template <typename T>
void sort_cases() {
  std::mt19937 g(7);
  std::normal_distribution<double> nd;
  auto gauss = [&](int64_t n) {
    std::vector<T> v(n);
    for (auto& x : v) x = static_cast<T>(nd(g));
    return v;
  };
  CHECK(check_sort(gauss(2048), "gaussian") == SortPath::kAffine);
  CHECK(check_sort(gauss(1), "one point") == SortPath::kTrivial);
  CHECK(check_sort(gauss(7), "seven points") == SortPath::kAffine);
  std::vector<T> ties(3000);
  for (auto& x : ties) x = static_cast<T>(std::round(nd(g) * 2)) / T(2);
  ties[5] = T(-0.0);
  ties[9] = T(0.0);
  check_sort(ties, "ties");
  std::vector<T> cluster = gauss(4000);
  for (size_t i = 0; i < cluster.size(); ++i) cluster[i] = T(1e-9) * cluster[i] + T(i % 3);
  CHECK(check_sort(cluster, "three tight clusters") == SortPath::kExact);
  std::vector<T> outlier = gauss(4000);
  outlier[17] = T(1e30);
  CHECK(check_sort(outlier, "one far outlier") == SortPath::kExact);
  CHECK(check_sort(std::vector<T>(100, T(0.5)), "constant") == SortPath::kTrivial);
  CHECK(check_sort(gauss(70000), "more than 2^16 points") == SortPath::kAffine);
  std::vector<T> huge = gauss(1000);
  huge[0] = T(-3e38);
  huge[1] = T(3e38);
  check_sort(huge, "range that overflows the key scale");
}

int main() {
  // keys sort like the floats; -0 maps to +0; decoding inverts the encoding
  const float fs[] = {-3e38f, -2.5f, -1e-30f, 0.0f, 1e-30f, 1.0f, 2.5f, 3e38f};
  for (int i = 0; i + 1 < 8; ++i) CHECK(to_key(fs[i]) < to_key(fs[i + 1]));
  CHECK(to_key(-0.0f) == to_key(0.0f));
  for (float f : fs) CHECK(from_key(to_key(f)) == f);
  const double ds[] = {-1e300, -2.5, -1e-300, 0.0, 1e-300, 2.5, 1e300};
  for (int i = 0; i + 1 < 7; ++i) CHECK(to_key(ds[i]) < to_key(ds[i + 1]));
  CHECK(to_key(-0.0) == to_key(0.0));
  for (double d : ds) CHECK(from_key(to_key(d)) == d);

  // |t|^p and its derivative p |t|^(p-1) sign(t), against pow and central differences
  for (double p : {1.0, 1.5, 2.0, 3.0, 4.25}) {
    const PowP<double> pw = PowP<double>::make(p);
    for (double t : {-2.0, -0.3, 0.7, 1.9}) {
      CHECK_NEAR(pw.value(t), std::pow(std::fabs(t), p), 1e-14);
      const double e = 1e-6;
      CHECK_NEAR(pw.deriv(t), (pw.value(t + e) - pw.value(t - e)) / (2 * e), 1e-7);
    }
    CHECK(pw.value(0.0) == 0.0 && pw.deriv(0.0) == 0.0);
  }

  sort_cases<float>();
  sort_cases<double>();

  ProjLayout shared{10, 3, 0}, per_pair{10, 3, 30};
  CHECK(shared.at(4, 2, 7) == 27 && per_pair.at(1, 2, 7) == 57);
  if (failures() == 0) std::printf("test_sliced_wasserstein: all checks passed\n");
  return failures();
}
