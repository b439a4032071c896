// A minimal test harness for the C++ unit tests (no framework dependency): CHECK and CHECK_NEAR
// record failures; main() returns the failure count for ctest.
#pragma once
#include <cmath>
#include <cstdio>

inline int& failures() {
  static int n = 0;
  return n;
}

#define CHECK(cond)                                                         \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::printf("%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures();                                                         \
    }                                                                       \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                                          \
  do {                                                                                                 \
    const double a_ = (a), b_ = (b);                                                                   \
    if (!(std::fabs(a_ - b_) <= (tol) * (1 + std::fabs(b_)))) {                                        \
      std::printf("%s:%d: CHECK_NEAR failed: %s = %.17g vs %s = %.17g\n", __FILE__, __LINE__, #a, a_, \
                  #b, b_);                                                                             \
      ++failures();                                                                                    \
    }                                                                                                  \
  } while (0)
