// Betti matching loss terms, shared by the CPU and CUDA kernels.
//
// A row (segment, a, b, c, d) of betti_matching_pairs is one bar or one matched pair of bars of one
// instance; segment = (n * D + k) * 3 + kind with k the homology dimension and
//   kind 0  matched:            pred bar (a, b) and target bar (c, d),  2 ((p_a - t_c)^2 + (p_b - t_d)^2)
//   kind 1  unmatched in pred:  (p_a - p_b)^2
//   kind 2  unmatched in target: (t_c - t_d)^2            (constant in pred)
// a, b, c, d are flat pixel indices into the instance's image (birth and death critical pixels).
// The squared differences are the same for f = 1 - p (superlevel) and f = p (sublevel), so the loss
// reads the probabilities directly. Each term is scaled by weights[k * 3 + kind].
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace lossforge {
namespace betti_matching {

template <typename A, typename T>
LF_HOST_DEVICE A row_loss(const int64_t* row, const T* p, const T* t, const double* w, int64_t D) {
  const int64_t seg = row[0];
  const int64_t kind = seg % 3;
  const A wk = static_cast<A>(w[seg % (3 * D)]);
  if (kind == 0) {
    const A db = static_cast<A>(p[row[1]]) - static_cast<A>(t[row[3]]);
    const A dd = static_cast<A>(p[row[2]]) - static_cast<A>(t[row[4]]);
    return wk * A(2) * (db * db + dd * dd);
  }
  if (kind == 1) {
    const A l = static_cast<A>(p[row[1]]) - static_cast<A>(p[row[2]]);
    return wk * l * l;
  }
  const A l = static_cast<A>(t[row[3]]) - static_cast<A>(t[row[4]]);
  return wk * l * l;
}

// d(row loss)/d p at pixels row[1] (d0) and row[2] (d1); false when the row does not depend on p.
template <typename A, typename T>
LF_HOST_DEVICE bool row_grad(const int64_t* row, const T* p, const T* t, const double* w, int64_t D, A& d0, A& d1) {
  const int64_t seg = row[0];
  const int64_t kind = seg % 3;
  const A wk = static_cast<A>(w[seg % (3 * D)]);
  if (kind == 0) {
    d0 = wk * A(4) * (static_cast<A>(p[row[1]]) - static_cast<A>(t[row[3]]));
    d1 = wk * A(4) * (static_cast<A>(p[row[2]]) - static_cast<A>(t[row[4]]));
    return true;
  }
  if (kind == 1) {
    d0 = wk * A(2) * (static_cast<A>(p[row[1]]) - static_cast<A>(p[row[2]]));
    d1 = -d0;
    return true;
  }
  return false;
}

}  // namespace betti_matching
}  // namespace lossforge
