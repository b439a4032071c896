// M-FAC CPU inner loops, included twice by mfac_cpu.cpp: once for generic x86-64 (SSE2) and once
// under `#pragma GCC target("avx2")`, picked at run time by CPU feature (no -march flags in
// anything that ships). No include guard on purpose; no #include here (the includer provides them).
//
// S is the storage type (float, double, uint16_t = bfloat16 bits), A the compute type. GCC/Clang
// vector types of 32 bytes (8 floats or 4 doubles): two SSE registers on the generic build, one AVX
// register on the AVX2 build. The order of the additions is fixed, so on a given build and machine a
// result does not depend on the thread count.

typedef float vf __attribute__((vector_size(32)));
typedef double vd __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));
typedef uint32_t vu __attribute__((vector_size(32)));

template <typename A>
struct VecOf;
template <>
struct VecOf<float> {
  using type = vf;
  static constexpr int lanes = 8;
};
template <>
struct VecOf<double> {
  using type = vd;
  static constexpr int lanes = 4;
};

// Unaligned vector loads and stores (memcpy compiles to one or two movups).
inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vd vload(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vf vload(const uint16_t* p) {  // 8 bfloat16 -> 8 float: the bits shifted into the high half
#if defined(LF_MFAC_KERNELS_AVX2)
  // one vpmovzxwd + one vpslld (GCC splits the generic conversion below into 128-bit halves)
  const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<vf>(_mm256_castsi256_ps(u));
#else
  vh h;
  std::memcpy(&h, p, sizeof(h));
  const vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
#endif
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline void vstore(double* p, vd v) { std::memcpy(p, &v, sizeof(v)); }

template <typename V, int L>
inline auto hsum(V v) {
  auto s = v[0];
  for (int l = 1; l < L; ++l) s += v[l];
  return s;
}

// out[q] = sum_j rows[q][j] * x[j] for four rows at once (x is loaded once for the four rows).
template <typename S, typename A>
inline void dot4(const S* __restrict g0, const S* __restrict g1, const S* __restrict g2,
                 const S* __restrict g3, const A* __restrict x, int64_t n, A* out) {
  using V = typename VecOf<A>::type;
  constexpr int L = VecOf<A>::lanes;
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V xv = vload(x + j);
    a0 += vload(g0 + j) * xv;
    a1 += vload(g1 + j) * xv;
    a2 += vload(g2 + j) * xv;
    a3 += vload(g3 + j) * xv;
  }
  A t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (; j < n; ++j) {
    const A xv = x[j];
    t0 += static_cast<A>(load(g0[j])) * xv;
    t1 += static_cast<A>(load(g1[j])) * xv;
    t2 += static_cast<A>(load(g2[j])) * xv;
    t3 += static_cast<A>(load(g3[j])) * xv;
  }
  out[0] = hsum<V, L>(a0) + t0;
  out[1] = hsum<V, L>(a1) + t1;
  out[2] = hsum<V, L>(a2) + t2;
  out[3] = hsum<V, L>(a3) + t3;
}

template <typename S, typename A>
inline A dot1(const S* __restrict g, const A* __restrict x, int64_t n) {
  using V = typename VecOf<A>::type;
  constexpr int L = VecOf<A>::lanes;
  V a = {};
  int64_t j = 0;
  for (; j + L <= n; j += L) a += vload(g + j) * vload(x + j);
  A t = 0;
  for (; j < n; ++j) t += static_cast<A>(load(g[j])) * x[j];
  return hsum<V, L>(a) + t;
}

// Pass 1 over one chunk: part[w * m + i] = G[i, chunk] . xb[w] for the W vectors of xb ([W, n]).
template <typename S, typename A>
void chunk_dots(const S* G, int64_t ld, int64_t m, int64_t n, const A* xb, int64_t W, double* part) {
  int64_t i = 0;
  A r[4];
  for (; i + 4 <= m; i += 4) {
    const S* g0 = G + i * ld;
    for (int64_t w = 0; w < W; ++w) {
      dot4<S, A>(g0, g0 + ld, g0 + 2 * ld, g0 + 3 * ld, xb + w * n, n, r);
      for (int q = 0; q < 4; ++q) part[w * m + i + q] = static_cast<double>(r[q]);
    }
  }
  for (; i < m; ++i)
    for (int64_t w = 0; w < W; ++w) part[w * m + i] = static_cast<double>(dot1<S, A>(G + i * ld, xb + w * n, n));
}

// Pass 2 over one chunk: acc[j] = sum_i b[i] G[i, chunk j], eight rows per sweep of acc (acc stays in L1;
// fewer sweeps, fewer loads and stores of it), then four, then one.
template <typename S, typename A>
void chunk_gemv_t(const S* G, int64_t ld, int64_t m, int64_t n, const A* b, A* __restrict acc) {
  constexpr int L = VecOf<A>::lanes;
  std::fill(acc, acc + n, A(0));
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) {
    const S* __restrict g0 = G + i * ld;
    const S* __restrict g1 = g0 + ld;
    const S* __restrict g2 = g1 + ld;
    const S* __restrict g3 = g2 + ld;
    const S* __restrict g4 = g3 + ld;
    const S* __restrict g5 = g4 + ld;
    const S* __restrict g6 = g5 + ld;
    const S* __restrict g7 = g6 + ld;
    const A c0 = b[i], c1 = b[i + 1], c2 = b[i + 2], c3 = b[i + 3];
    const A c4 = b[i + 4], c5 = b[i + 5], c6 = b[i + 6], c7 = b[i + 7];
    int64_t j = 0;
    for (; j + L <= n; j += L) {
      const auto lo = (c0 * vload(g0 + j) + c1 * vload(g1 + j)) + (c2 * vload(g2 + j) + c3 * vload(g3 + j));
      const auto hi = (c4 * vload(g4 + j) + c5 * vload(g5 + j)) + (c6 * vload(g6 + j) + c7 * vload(g7 + j));
      vstore(acc + j, vload(acc + j) + (lo + hi));
    }
    for (; j < n; ++j) {
      const A lo = (c0 * static_cast<A>(load(g0[j])) + c1 * static_cast<A>(load(g1[j]))) +
                   (c2 * static_cast<A>(load(g2[j])) + c3 * static_cast<A>(load(g3[j])));
      const A hi = (c4 * static_cast<A>(load(g4[j])) + c5 * static_cast<A>(load(g5[j]))) +
                   (c6 * static_cast<A>(load(g6[j])) + c7 * static_cast<A>(load(g7[j])));
      acc[j] += lo + hi;
    }
  }
  for (; i + 4 <= m; i += 4) {
    const S* __restrict g0 = G + i * ld;
    const S* __restrict g1 = g0 + ld;
    const S* __restrict g2 = g1 + ld;
    const S* __restrict g3 = g2 + ld;
    const A c0 = b[i], c1 = b[i + 1], c2 = b[i + 2], c3 = b[i + 3];
    int64_t j = 0;
    for (; j + L <= n; j += L)
      vstore(acc + j, vload(acc + j) + ((c0 * vload(g0 + j) + c1 * vload(g1 + j)) + (c2 * vload(g2 + j) + c3 * vload(g3 + j))));
    for (; j < n; ++j)
      acc[j] += (c0 * static_cast<A>(load(g0[j])) + c1 * static_cast<A>(load(g1[j]))) +
                (c2 * static_cast<A>(load(g2[j])) + c3 * static_cast<A>(load(g3[j])));
  }
  for (; i < m; ++i) {
    const S* __restrict g = G + i * ld;
    const A c = b[i];
    int64_t j = 0;
    for (; j + L <= n; j += L) vstore(acc + j, vload(acc + j) + c * vload(g + j));
    for (; j < n; ++j) acc[j] += c * static_cast<A>(load(g[j]));
  }
}

// Pass 1 prologue over one chunk of a step: xs = grad + wd * p (p may be null), written into G's row as
// the storage type, and xs replaced by the stored values (what pass 1 multiplies).
template <typename S, typename A>
void chunk_insert(int64_t n, const A* __restrict gr, const A* __restrict pr, A wd, S* __restrict dst,
                  A* __restrict xs) {
  if (pr != nullptr) {
    for (int64_t j = 0; j < n; ++j) xs[j] = add_mul(gr[j], wd, pr[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) xs[j] = gr[j];
  }
  for (int64_t j = 0; j < n; ++j) {
    const S sv = store_value(xs[j], dst);
    dst[j] = sv;
    xs[j] = static_cast<A>(load(sv));
  }
}

// Pass 2 epilogue over one chunk of a step: y = beta * stored(grad + wd * p) + alpha * acc, then the
// momentum (v may be null: no momentum) and the parameter update.
template <typename S, typename A>
void chunk_step(int64_t n, const A* __restrict acc, const A* __restrict gr, A* __restrict p, A* __restrict v,
                A alpha, A beta, A lr, A wd, A mu) {
  const S* tag = nullptr;
  if (v != nullptr) {
    const A one_mu = A(1) - mu;
    for (int64_t j = 0; j < n; ++j) {
      const A y = beta * stored(add_mul(gr[j], wd, p[j]), tag) + alpha * acc[j];
      const A nv = mu * v[j] + one_mu * y;
      v[j] = nv;
      p[j] -= lr * nv;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) p[j] -= lr * (beta * stored(add_mul(gr[j], wd, p[j]), tag) + alpha * acc[j]);
  }
}
