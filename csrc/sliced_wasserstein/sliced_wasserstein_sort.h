// CPU sorting of one side of one slice by (value, index), the order of torch.sort(stable=True).
// Plain C++ (no torch): used by sliced_wasserstein_cpu.cpp and tested on its own in tests/cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sliced_wasserstein/sliced_wasserstein.h"

namespace lossforge {
namespace sliced_wasserstein {

// Fast path: an order-preserving affine key k(v) = floor((v - min) * (2^16 - 1) / (max - min)) (monotone
// non-decreasing in v under IEEE rounding), packed with the point index as (k << 16 | i) for n <= 2^16
// or (k << 32 | i) with a 22-bit key otherwise, sorted by two stable byte passes (LSD). Equal keys then
// sit together in index order, and keys are ordered wherever values are, so one insertion pass on the
// values makes the order exactly (value, index): it only moves elements whose keys collided. Spread
// data (the usual case) collides rarely; if the moves exceed a budget (heavily clustered data, or an
// outlier that squeezes everything into a few keys) the slice falls back to an exact LSD radix sort of
// the values' bit patterns, which gives the same (value, index) order.

// Stable LSD radix sort of (key, index) on all bytes of the keys (a pass whose byte is the same for every
// key is skipped). Returns the buffers holding the result.
template <typename K>
inline void radix_sort_exact(K* a, uint32_t* ia, K* b, uint32_t* ib, int64_t n, K** keys_out, uint32_t** idx_out) {
  constexpr int P = sizeof(K);
  uint32_t hist[P][256];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < n; ++i) {
    const K k = a[i];
    for (int p = 0; p < P; ++p) ++hist[p][(k >> (8 * p)) & 0xff];
  }
  for (int p = 0; p < P; ++p) {
    uint32_t* h = hist[p];
    if (h[(a[0] >> (8 * p)) & 0xff] == static_cast<uint32_t>(n)) continue;
    uint32_t sum = 0;
    for (int c = 0; c < 256; ++c) {
      const uint32_t t = h[c];
      h[c] = sum;
      sum += t;
    }
    const int shift = 8 * p;
    for (int64_t i = 0; i < n; ++i) {
      const K k = a[i];
      const uint32_t dst = h[(k >> shift) & 0xff]++;
      b[dst] = k;
      ib[dst] = ia[i];
    }
    std::swap(a, b);
    std::swap(ia, ib);
  }
  *keys_out = a;
  *idx_out = ia;
}

template <typename T>
struct SideScratch {
  using K = typename KeyOf<T>::type;
  std::vector<T> v;           // projected values, original order
  std::vector<T> sv;          // sorted values
  std::vector<uint32_t> si;   // sorted indices
  std::vector<uint64_t> a, b; // packed items (also reused as exact-radix key buffers)
  std::vector<uint32_t> ia, ib;
  void resize(int64_t n) {
    v.resize(n); sv.resize(n); si.resize(n); a.resize(n); b.resize(n);
  }
};

// Exact (value, index) order by the bit-pattern radix sort.
template <typename T>
inline void sort_exact(SideScratch<T>& s, int64_t n) {
  using K = typename KeyOf<T>::type;
  s.ia.resize(n);
  s.ib.resize(n);
  static_assert(sizeof(K) <= sizeof(uint64_t), "key width");
  K* ka = reinterpret_cast<K*>(s.a.data());
  K* kb = reinterpret_cast<K*>(s.b.data());
  for (int64_t i = 0; i < n; ++i) {
    ka[i] = to_key(s.v[i]);
    s.ia[i] = static_cast<uint32_t>(i);
  }
  K* keys;
  uint32_t* idx;
  radix_sort_exact<K>(ka, s.ia.data(), kb, s.ib.data(), n, &keys, &idx);
  for (int64_t i = 0; i < n; ++i) {
    s.si[i] = idx[i];
    s.sv[i] = s.v[idx[i]];
  }
}

// Inserts the elements of (sorted-by-key) order `order` one by one into (sv, si), restoring the exact
// (value, index) order. Returns false if it needed more than `budget` moves.
template <typename T, typename Item, int IdxBits>
inline bool insertion_fixup(const T* v, const Item* order, int64_t n, T* sv, uint32_t* si, int64_t budget) {
  constexpr Item mask = (Item(1) << IdxBits) - 1;
  int64_t moves = 0;
  {
    const uint32_t i0 = static_cast<uint32_t>(order[0] & mask);
    sv[0] = v[i0];
    si[0] = i0;
  }
  for (int64_t i = 1; i < n; ++i) {
    const uint32_t xi = static_cast<uint32_t>(order[i] & mask);
    const T x = v[xi];
    int64_t j = i - 1;
    if (!(x < sv[j])) {  // equal values keep index order: equal values have equal keys
      sv[i] = x;
      si[i] = xi;
      continue;
    }
    do {
      sv[j + 1] = sv[j];
      si[j + 1] = si[j];
      --j;
    } while (j >= 0 && x < sv[j]);
    moves += i - 1 - j;
    sv[j + 1] = x;
    si[j + 1] = xi;
    if (moves > budget) return false;
  }
  return true;
}

// Which way sort_side went (for tests): all values equal, the affine-key sort, or the exact radix sort.
enum class SortPath { kTrivial, kAffine, kExact };

// The affine-key sort: v[i] -> a key of 2 * DigitBits bits, linear in the value over [lo, hi], packed
// above its index in one Item and sorted by two LSD passes; an insertion pass then restores the
// exact (value, index) order, or gives up (false) after `budget` moves.
template <typename T, typename Item, int IdxBits, int DigitBits>
inline bool affine_sort(SideScratch<T>& s, int64_t n, T lo, T hi, int64_t budget) {
  constexpr uint32_t kDigits = 1u << DigitBits, kMaxKey = (1u << (2 * DigitBits)) - 1;
  const T scale = T(kMaxKey) / (hi - lo);
  if (!(scale > T(0)) || !std::isfinite(scale)) return false;
  const T* v = s.v.data();
  Item* a = reinterpret_cast<Item*>(s.a.data());
  Item* b = reinterpret_cast<Item*>(s.b.data());
  uint32_t h0[kDigits] = {}, h1[kDigits] = {};
  for (int64_t i = 0; i < n; ++i) {
    uint32_t k = static_cast<uint32_t>(static_cast<int64_t>((v[i] - lo) * scale));
    k = k < kMaxKey ? k : kMaxKey;
    a[i] = (static_cast<Item>(k) << IdxBits) | static_cast<Item>(i);
    ++h0[k & (kDigits - 1)];
    ++h1[k >> DigitBits];
  }
  uint32_t s0 = 0, s1 = 0;
  for (uint32_t c = 0; c < kDigits; ++c) {
    const uint32_t t0 = h0[c], t1 = h1[c];
    h0[c] = s0;
    h1[c] = s1;
    s0 += t0;
    s1 += t1;
  }
  for (int64_t i = 0; i < n; ++i) {
    const Item it = a[i];
    b[h0[(it >> IdxBits) & (kDigits - 1)]++] = it;
  }
  for (int64_t i = 0; i < n; ++i) {
    const Item it = b[i];
    a[h1[it >> (IdxBits + DigitBits)]++] = it;
  }
  return insertion_fixup<T, Item, IdxBits>(v, a, n, s.sv.data(), s.si.data(), budget);
}

// Sorts s.v[0..n) (finite values, min lo, max hi) into s.sv / s.si in (value, index) order.
template <typename T>
inline SortPath sort_side(SideScratch<T>& s, int64_t n, T lo, T hi) {
  if (n == 1 || !(hi > lo)) {  // one point, or all values equal: index order
    for (int64_t i = 0; i < n; ++i) {
      s.si[i] = static_cast<uint32_t>(i);
      s.sv[i] = s.v[i];
    }
    return SortPath::kTrivial;
  }
  const int64_t budget = 4 * n + 1024;
  // n <= 2^16: a 16-bit key (two 8-bit passes) and a 16-bit index in 32 bits; larger n: a 22-bit key
  // (two 11-bit passes) and a 32-bit index in 64 bits.
  const bool sorted = n <= 65536 ? affine_sort<T, uint32_t, 16, 8>(s, n, lo, hi, budget)
                                 : affine_sort<T, uint64_t, 32, 11>(s, n, lo, hi, budget);
  if (sorted) return SortPath::kAffine;
  sort_exact(s, n);
  return SortPath::kExact;
}

}  // namespace sliced_wasserstein
}  // namespace lossforge
