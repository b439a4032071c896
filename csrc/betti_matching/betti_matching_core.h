// The combinatorial core of the Betti matching family: persistence pairs of the V-construction
// cubical complex of 2D and 3D images (sublevel filtration) and the induced matching between two
// images f and g through their comparison image c = min(f, g).
//
// Pure C++ (no torch): flat uint32 arrays, one rank array per image, counting sorts, union-find.
//
// Order of cells (bit-parity with the Betti-Matching-3D reference): cells of one dimension are
// ordered by (value, id), where the id packs the lower corner in C order and then the cell type
// (the axis of an edge, the normal axis of a 3D face). A vertex value's rank (dense, ties share a
// rank) replaces the value everywhere, so a cell's key is (max rank of its vertices, id).
//
//   dim 0:       union-find on vertices over the edges in increasing order; the younger root
//                (larger (rank, vertex)) dies.
//   dim D-1:     dual union-find on top cells (squares / cubes) plus one boundary node over the
//                codimension-1 cells in decreasing order; the younger root (smaller (rank, id))
//                dies. The faces that merge are cleared from the dim-1 reduction (3D). In 2D each
//                edge merges in exactly one of dim 0 and the dual, so the first edge of each
//                vertex (a sure dim-0 merge) skips the dual sweep.
//   dim 1 (3D):  sparse column reduction over Z/2 of the boundary matrix (faces x edges) with
//                clearing, in two forms that race (see DimOneReducer): homology (the faces left
//                after the dual union-find, in increasing order) and cohomology (the edges left
//                after the dim-0 union-find, in decreasing order). A column whose pivot is still
//                free is paired at once (apparent pair); the others are reduced by sorted merges
//                and kept for later additions.
//   image:       the same algorithms with the columns ordered by c and the rows by f (or g):
//                dim 0 by a union-find over c's edges that also tracks each component's f-elder
//                and g-elder, dim D-1 by f's dual union-find that also tracks the c-elder, dim 1
//                by the boundary matrix with c-ordered columns and f-ordered rows.
//   matching:    an f-bar and a g-bar match when their image bars reach the same c-bar.
//
// Critical coordinates: a cell's vertex attaining its value; ties go to the largest linear index
// for edges and faces/squares and to the smallest linear index for 3D cubes (as the reference).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace lossforge {
namespace betti_matching {

using u32 = uint32_t;
using u64 = uint64_t;
constexpr u32 kNone = 0xFFFFFFFFu;

// ---------------------------------------------------------------------------------------------
// Ranks: an order-preserving integer key per value, LSD radix sort (stable, so ties keep the
// vertex order), then dense ranks.

inline u32 order_key(float v) {
  if (v == 0.0f) v = 0.0f;  // -0 == +0
  u32 u;
  std::memcpy(&u, &v, 4);
  return (u >> 31) ? ~u : (u | 0x80000000u);
}
inline u64 order_key(double v) {
  if (v == 0.0) v = 0.0;
  u64 u;
  std::memcpy(&u, &v, 8);
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

struct Ranks {
  std::vector<u32> rank;  // per vertex
  u32 nranks = 0;         // number of distinct values
  u32 elder = 0;          // vertex with the smallest (value, index): the essential H0 class
};

// Dense ranks from the sorted (key, vertex) sequence.
template <typename Get>
void dense_ranks(u32 V, Get&& at, Ranks& out) {
  out.rank.resize(V);
  u32 r = 0;
  for (u32 i = 0; i < V; ++i) {
    const auto kv = at(i);
    if (i > 0 && kv.first != at(i - 1).first) ++r;
    out.rank[kv.second] = r;
  }
  out.nranks = V ? r + 1 : 0;
  out.elder = V ? at(0).second : 0;
}

template <typename T>
void compute_ranks(const T* values, u32 V, Ranks& out) {
  using K = decltype(order_key(T()));
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  constexpr int kPasses = (8 * static_cast<int>(sizeof(K)) + kBits - 1) / kBits;
  std::vector<u32> hist(static_cast<size_t>(kPasses) * kBuckets, 0);
  // Sorts the items by their key bits from `shift` on, skipping the passes in which every key has
  // the same digit. 32-bit keys travel with their vertex in one 64-bit item (one stream to
  // scatter per pass), 64-bit keys beside a vertex array. (The arrays are filled before they are
  // read: not zeroed.)
  auto passes = [&](auto& items, auto& items2, auto idx, auto idx2, int shift) {
    for (int b = 0; b < kPasses; ++b) {
      u32* h = hist.data() + static_cast<size_t>(b) * kBuckets;
      bool trivial = false;
      for (int d = 0; d < kBuckets; ++d)
        if (h[d] == V) trivial = true;
      if (trivial) continue;
      u32 sum = 0;
      for (int d = 0; d < kBuckets; ++d) {
        const u32 c = h[d];
        h[d] = sum;
        sum += c;
      }
      const int sh = shift + kBits * b;
      for (u32 i = 0; i < V; ++i) {
        const u32 pos = h[(items[i] >> sh) & (kBuckets - 1)]++;
        items2[pos] = items[i];
        if constexpr (sizeof(K) == 8) (*idx2)[pos] = (*idx)[i];
      }
      items.swap(items2);
      if constexpr (sizeof(K) == 8) idx->swap(*idx2);
    }
  };
  if constexpr (sizeof(K) == 4) {
    std::unique_ptr<u64[]> items(new u64[V]), items2(new u64[V]);
    for (u32 i = 0; i < V; ++i) {
      const K k = order_key(values[i]);
      items[i] = (u64(k) << 32) | i;
      for (int b = 0; b < kPasses; ++b) hist[b * kBuckets + ((k >> (kBits * b)) & (kBuckets - 1))]++;
    }
    passes(items, items2, nullptr, nullptr, 32);
    dense_ranks(V, [&](u32 i) { return std::make_pair(static_cast<u32>(items[i] >> 32), static_cast<u32>(items[i])); }, out);
  } else {
    std::unique_ptr<K[]> keys(new K[V]), keys2(new K[V]);
    std::unique_ptr<u32[]> idx(new u32[V]), idx2(new u32[V]);
    for (u32 i = 0; i < V; ++i) {
      const K k = order_key(values[i]);
      keys[i] = k;
      idx[i] = i;
      for (int b = 0; b < kPasses; ++b) hist[b * kBuckets + ((k >> (kBits * b)) & (kBuckets - 1))]++;
    }
    passes(keys, keys2, &idx, &idx2, 0);
    dense_ranks(V, [&](u32 i) { return std::make_pair(keys[i], idx[i]); }, out);
  }
}

// Exact n / d for 32-bit n by a multiply and a shift (Lemire, Kaser & Kurz 2019: with
// M = ceil(2^64 / d), n / d = (M * n) >> 64 for every 32-bit n).
struct FastDiv {
  u64 M = 0;
  u32 d = 1;
  FastDiv() = default;
  explicit FastDiv(u32 divisor) : M(divisor > 1 ? ~u64(0) / divisor + 1 : 0), d(divisor) {}
  u32 div(u32 n) const {
    if (d == 1) return n;
    return static_cast<u32>((static_cast<unsigned __int128>(M) * n) >> 64);
  }
};

// ---------------------------------------------------------------------------------------------
// Geometry of a D-dimensional grid (D = 2 or 3). Vertex ids are C-order linear indices; edge ids
// are v*D + axis; 3D face ids are v*3 + normal axis.
// Top cells (squares / cubes) are numbered by their lower corner's vertex id plus one slab
// (vs[0]): the two cofaces of a codimension-1 cell (v, axis) are then v + slab and v + slab minus
// a stride, with no division and no bounds test. The slots that hold no top cell (a corner on a
// last row / column / slab, or in the extra front slab) belong to the boundary node B = P - 1 of
// the dual graph from the start. The numbering keeps the C order of the cells (ties of ranks).

template <int D>
struct Geom {
  int64_t n[3] = {1, 1, 1}, m[3] = {0, 0, 0}, vs[3] = {0, 0, 0};
  u32 V = 0;
  u32 slab = 0, P = 0;         // top cell of lower corner v: v + slab; P slots, the last is B
  FastDiv div_row, div_plane;  // by n[D-1] and (3D) by n[1] * n[2]

  explicit Geom(const int64_t* sizes) {
    for (int i = 0; i < D; ++i) {
      n[i] = sizes[i];
      m[i] = sizes[i] - 1;
    }
    int64_t s = 1;
    for (int i = D - 1; i >= 0; --i) {
      vs[i] = s;
      s *= n[i];
    }
    V = static_cast<u32>(s);
    slab = static_cast<u32>(vs[0]);
    P = V + slab + 1;
    div_row = FastDiv(static_cast<u32>(n[D - 1]));
    if (D == 3) div_plane = FastDiv(static_cast<u32>(n[1] * n[2]));
  }
  u32 boundary() const { return P - 1; }
  // the two vertices of edge id (v, axis): v and v plus a step along the axis
  void edge_ends(u32 id, u32& v, u32& w) const {
    v = id / D;
    w = static_cast<u32>(v + vs[id % D]);
  }
  // 32-bit divisions (much cheaper than 64-bit ones on the hot paths)
  void coords(u32 v, int64_t* c) const {
    if (D == 2) {
      const u32 x = div_row.div(v);
      c[0] = x;
      c[1] = v - x * static_cast<u32>(n[1]);
    } else {
      const u32 x = div_plane.div(v);
      const u32 r = v - x * static_cast<u32>(n[1] * n[2]);
      const u32 y = div_row.div(r);
      c[0] = x;
      c[1] = y;
      c[2] = r - y * static_cast<u32>(n[2]);
    }
  }
  // Calls f(edge id, lower vertex, axis) for every edge in increasing id order.
  template <typename F>
  void for_each_edge(F&& f) const {
    if (D == 2) {
      u32 v = 0;
      for (int64_t x = 0; x < n[0]; ++x)
        for (int64_t y = 0; y < n[1]; ++y, ++v) {
          if (x + 1 < n[0]) f(v * 2 + 0, v, 0);
          if (y + 1 < n[1]) f(v * 2 + 1, v, 1);
        }
    } else {
      u32 v = 0;
      for (int64_t x = 0; x < n[0]; ++x)
        for (int64_t y = 0; y < n[1]; ++y)
          for (int64_t z = 0; z < n[2]; ++z, ++v) {
            if (x + 1 < n[0]) f(v * 3 + 0, v, 0);
            if (y + 1 < n[1]) f(v * 3 + 1, v, 1);
            if (z + 1 < n[2]) f(v * 3 + 2, v, 2);
          }
    }
  }
  // 3D only: f(face id, lower vertex, normal axis) for every 2-cell in increasing id order.
  template <typename F>
  void for_each_face(F&& f) const {
    u32 v = 0;
    for (int64_t x = 0; x < n[0]; ++x)
      for (int64_t y = 0; y < n[1]; ++y)
        for (int64_t z = 0; z < n[2]; ++z, ++v) {
          const bool bx = x + 1 < n[0], by = y + 1 < n[1], bz = z + 1 < n[2];
          if (by && bz) f(v * 3 + 0, v, 0);
          if (bx && bz) f(v * 3 + 1, v, 1);
          if (bx && by) f(v * 3 + 2, v, 2);
        }
  }
  // The two axes spanned by a 3D face with normal axis a, in increasing order.
  static void spanned(int a, int& b, int& c) {
    b = a == 0 ? 1 : 0;
    c = a == 2 ? 1 : 2;
  }
};

// Rank of a cell (max over its vertices) and its critical vertex.
template <int D>
struct CellRanks {
  const Geom<D>& g;
  const u32* R;
  u32 edge_rank(u32 v, int a) const { return std::max(R[v], R[v + g.vs[a]]); }
  // Critical vertex of an edge: the upper vertex on a tie.
  u32 edge_voxel(u32 v, int a) const {
    const u32 w = static_cast<u32>(v + g.vs[a]);
    return R[w] >= R[v] ? w : v;
  }
  u32 face_rank(u32 v, int a) const {
    int b, c;
    Geom<D>::spanned(a, b, c);
    const u32 sb = static_cast<u32>(g.vs[b]), sc = static_cast<u32>(g.vs[c]);
    return std::max(std::max(R[v], R[v + sb]), std::max(R[v + sc], R[v + sb + sc]));
  }
  // Critical vertex of a 3D face: the largest linear index among the vertices attaining the max.
  u32 face_voxel(u32 v, int a) const {
    int b, c;
    Geom<D>::spanned(a, b, c);
    const u32 sb = static_cast<u32>(g.vs[b]), sc = static_cast<u32>(g.vs[c]);
    const u32 cand[4] = {v + sb + sc, v + sb, v + sc, v};
    const u32 r = face_rank(v, a);
    for (u32 w : cand)
      if (R[w] == r) return w;
    return v;
  }
};

// Rank of every top cell (max over its 2^D vertices) in the padded numbering; the other slots and
// B get ~0 (above every rank: B is the elder of every dual component).
template <int D>
void top_ranks(const Geom<D>& g, const u32* R, std::vector<u32>& out) {
  out.assign(g.P, ~0u);
  u32* o = out.data() + g.slab;
  if (D == 2) {
    const u32 s0 = static_cast<u32>(g.vs[0]);
    for (int64_t x = 0; x < g.m[0]; ++x) {
      const u32 row = static_cast<u32>(x * g.vs[0]);
      for (u32 v = row; v < row + static_cast<u32>(g.m[1]); ++v)
        o[v] = std::max(std::max(R[v], R[v + 1]), std::max(R[v + s0], R[v + s0 + 1]));
    }
  } else {
    const u32 s0 = static_cast<u32>(g.vs[0]), s1 = static_cast<u32>(g.vs[1]);
    for (int64_t x = 0; x < g.m[0]; ++x)
      for (int64_t y = 0; y < g.m[1]; ++y) {
        const u32 row = static_cast<u32>(x * g.vs[0] + y * g.vs[1]);
        for (u32 v = row; v < row + static_cast<u32>(g.m[2]); ++v) {
          const u32 r = std::max(std::max(R[v], R[v + 1]), std::max(R[v + s1], R[v + s1 + 1]));
          o[v] = std::max(r, std::max(std::max(R[v + s0], R[v + s0 + 1]), std::max(R[v + s0 + s1], R[v + s0 + s1 + 1])));
        }
      }
  }
}

// Critical vertex of top cell t (padded number): 2D squares take the largest linear index on a
// tie, 3D cubes the smallest (the reference's convention).
template <int D>
u32 top_voxel(const Geom<D>& g, const u32* R, u32 rank, u32 t) {
  const u32 v = t - g.slab;
  const u32 s0 = static_cast<u32>(g.vs[0]);
  if (D == 2) {
    const u32 cand[4] = {v + s0 + 1, v + s0, v + 1, v};
    for (u32 w : cand)
      if (R[w] == rank) return w;
    return v;
  } else {
    const u32 s1 = static_cast<u32>(g.vs[1]);
    const u32 cand[8] = {v, v + 1, v + s1, v + s1 + 1, v + s0, v + s0 + 1, v + s0 + s1, v + s0 + s1 + 1};
    for (u32 w : cand)
      if (R[w] == rank) return w;
    return v;
  }
}

// Stable counting sort of cells by rank: gen(emit) must call emit(id, rank) for every cell in
// increasing id order (it is called twice). out: the cells' keys (rank << 32 | id), increasing:
// the sweeps read each cell's rank with its id instead of recomputing it from vertex ranks.
template <typename Gen>
void counting_sort(u32 nranks, Gen&& gen, std::vector<u64>& out) {
  std::vector<u32> count(static_cast<size_t>(nranks) + 1, 0);
  gen([&](u32, u32 r) { count[r + 1]++; });
  for (u32 r = 0; r < nranks; ++r) count[r + 1] += count[r];
  out.resize(count[nranks]);
  gen([&](u32 id, u32 r) { out[count[r]++] = (u64(r) << 32) | id; });
}
inline u32 key_id(u64 key) { return static_cast<u32>(key); }
inline u32 key_rank(u64 key) { return static_cast<u32>(key >> 32); }
inline u64 make_key(u32 rank, u32 id) { return (u64(rank) << 32) | id; }

// Union-find nodes carry, next to the parent, what the sweeps compare at a root (the rank of the
// root's cell, elders of the other images): a root's data comes in the cache line of its parent
// link, and the sweeps are bound by such random accesses.
struct Node {
  u32 parent, rank;
};
// The sweeps' node arrays are filled right away: no zeroing pass first.
template <typename N>
std::unique_ptr<N[]> node_array(size_t n) {
  return std::unique_ptr<N[]>(new N[n]);
}

// Root of x's tree. The trees stay shallow (a find takes 0-2 steps almost always), so the first
// two steps are taken without a branch (a root is its own parent): a loop's exit would be
// mispredicted on every other call. Deeper paths are halved; x is then linked to its root.
template <typename N>
inline u32 uf_find(N* nd, u32 x) {
  u32 r = nd[nd[x].parent].parent;
  while (nd[r].parent != r) {
    nd[r].parent = nd[nd[r].parent].parent;
    r = nd[r].parent;
  }
  nd[x].parent = r;
  return r;
}

// The sweeps visit cells in filtration order, so the union-find nodes they start from are
// scattered: those of the cell kAhead steps on are prefetched.
constexpr size_t kAhead = 8;

// The sweeps find the roots of the next cell before they write the current cell's union. The
// union's store has the address that is known last (the younger root), and a find placed after it
// waits for it (the cells often share roots, so the CPU does not let such loads run ahead): 10-20%
// of a sweep's time at 256² on our machine. The union turns one root (young) into a child of old;
// the roots found early are mapped through that one link (a link made before the find maps no
// root: harmless).
struct LastUnion {
  u32 young = kNone, old = kNone;
  u32 root(u32 r) const { return r == young ? old : r; }
};

// The root-finding of a sweep over edge keys in increasing order: prefetches the nodes of the edge
// kAhead on, and finds the roots of edge k + 1 before the caller writes edge k's union.
template <int D, typename N>
struct EdgeSweep {
  const Geom<D>& g;
  N* nd;
  const u64* edges;
  size_t ne;
  LastUnion last;  // the caller's union of the current edge
  u32 next_v = 0, next_w = 0;

  EdgeSweep(const Geom<D>& geom, N* nodes, const u64* keys, size_t n) : g(geom), nd(nodes), edges(keys), ne(n) {
    if (ne) find(0);
  }
  void find(size_t k) {
    u32 v, w;
    g.edge_ends(key_id(edges[k]), v, w);
    next_v = uf_find(nd, v);
    next_w = uf_find(nd, w);
  }
  // The roots of edge k's vertices.
  void roots(size_t k, u32& rv, u32& rw) {
    if (k + kAhead < ne) {
      u32 av, aw;
      g.edge_ends(key_id(edges[k + kAhead]), av, aw);
      __builtin_prefetch(nd + av);
      __builtin_prefetch(nd + aw);
    }
    rv = last.root(next_v);
    rw = last.root(next_w);
    if (k + 1 < ne) find(k + 1);
  }
};

// The sweeps mark each cell (a byte per cell) and compact their lists after the loop: storing a
// cell at a count that its own outcome advances gives the store an address that comes last, and
// the loads of the next cells would wait for it.
// Moves the keys whose flag is `which` to out (in order); returns their number.
inline size_t compact(const u64* keys, const uint8_t* flags, size_t n, uint8_t which, u64* out) {
  size_t m = 0;
  for (size_t k = 0; k < n; ++k) {
    out[m] = keys[k];
    m += flags[k] == which;
  }
  return m;
}

// A bar of one image in one dimension: critical vertices of its birth and death cells.
struct Bar {
  u32 birth, death;
};

// ---------------------------------------------------------------------------------------------
// Sorted cells of one image.

template <int D>
void sort_edges(const Geom<D>& g, const Ranks& rk, std::vector<u64>& out) {
  CellRanks<D> cr{g, rk.rank.data()};
  counting_sort(rk.nranks, [&](auto&& emit) { g.for_each_edge([&](u32 id, u32 v, int a) { emit(id, cr.edge_rank(v, a)); }); },
                out);
}

// 3D faces in increasing (rank, id) order.
inline void sort_faces(const Geom<3>& g, const Ranks& rk, std::vector<u64>& out) {
  CellRanks<3> cr{g, rk.rank.data()};
  counting_sort(rk.nranks, [&](auto&& emit) { g.for_each_face([&](u32 id, u32 v, int a) { emit(id, cr.face_rank(v, a)); }); },
                out);
}
template <int D>
void sort_faces(const Geom<D>&, const Ranks&, std::vector<u64>&) {}

// ---------------------------------------------------------------------------------------------
// Dimension 0 of one image: bars (birth vertex, death voxel) and, optionally, the bar index of
// each birth vertex (for the matching).

// Dimension 0 of one image by union-find over its edges (keys, increasing). Optionally: the bar
// of each birth vertex, the edges that do not merge (ids in decreasing order: the columns of the
// dim-1 cohomology reduction), the edges that do (keys, increasing) and a bitset of the latter.
inline void set_bit(std::vector<u64>& bits, u32 i) { bits[i >> 6] |= u64(1) << (i & 63); }
inline bool get_bit(const u64* bits, u32 i) { return (bits[i >> 6] >> (i & 63)) & 1; }

template <int D>
void dim0_pairs(const Geom<D>& g, const Ranks& rk, const std::vector<u64>& edges, std::vector<Bar>& bars,
                std::vector<u32>* bar_of_vertex, std::vector<u32>* positive, std::vector<u64>* merging,
                std::vector<u64>* merged_bits = nullptr) {
  const u32* R = rk.rank.data();
  // a root is its component's elder vertex; a node's rank is its vertex's (it never changes)
  const std::unique_ptr<Node[]> nodes = node_array<Node>(g.V);
  Node* nd = nodes.get();
  for (u32 v = 0; v < g.V; ++v) nd[v] = {v, R[v]};
  if (bar_of_vertex) bar_of_vertex->assign(g.V, kNone);
  const size_t ne = edges.size();
  // per edge: whether it merged (for the lists, made after the sweep)
  std::unique_ptr<uint8_t[]> merged(positive || merging ? new uint8_t[ne] : nullptr);
  if (merged_bits) merged_bits->assign((static_cast<size_t>(g.V) * D + 63) / 64, 0);
  uint8_t* mf = merged.get();
  u64* bits = merged_bits ? merged_bits->data() : nullptr;
  EdgeSweep<D, Node> sweep(g, nd, edges.data(), ne);
  for (size_t k = 0; k < ne; ++k) {
    const u64 key = edges[k];
    const u32 id = key_id(key);
    u32 v, w, rv, rw;
    g.edge_ends(id, v, w);
    sweep.roots(k, rv, rw);
    // Whether the edge merges is data-dependent (a third of the edges in 3D do not): no branch on
    // it; with rv == rw the union below links a root to itself.
    const bool merge = rv != rw;
    if (mf) mf[k] = merge;
    if (bits) bits[id >> 6] |= u64(merge) << (id & 63);
    const bool v_elder = make_key(nd[rv].rank, rv) < make_key(nd[rw].rank, rw);
    const u32 young = v_elder ? rw : rv, old = v_elder ? rv : rw;
    nd[young].parent = old;
    sweep.last = {young, old};
    if (merge & (nd[young].rank != key_rank(key))) {
      if (bar_of_vertex) (*bar_of_vertex)[young] = static_cast<u32>(bars.size());
      // the edge's critical vertex (the upper one on a tie): a node's rank is its vertex's, and
      // both nodes are in cache
      bars.push_back({young, nd[w].rank >= nd[v].rank ? w : v});
    }
  }
  if (merging) {
    merging->resize(ne);
    merging->resize(compact(edges.data(), mf, ne, 1, merging->data()));
  }
  if (positive) {  // ids, decreasing
    positive->resize(ne);
    u32* out = positive->data();
    size_t m = 0;
    for (size_t k = ne; k-- > 0;) {
      out[m] = key_id(edges[k]);
      m += !mf[k];
    }
    positive->resize(m);
  }
}

// 2D: every edge merges either two components in dimension 0 or two dual components (V - 1 of the
// first kind, F of the second, E = V - 1 + F). The first edge of a vertex (in filtration order)
// finds the vertex alone in its component, so it merges in dimension 0 and never in the dual
// union-find, which can skip it: about V of the E edges. Moves these first edges of the sorted
// edges to `firsts` (room for all edges, not zeroed); both lists stay sorted. Returns their number.
inline size_t split_first_edges(const Geom<2>& g, std::vector<u64>& edges, std::unique_ptr<u64[]>& firsts) {
  // vertices met so far, one byte each: plain stores, no read-modify-write chains
  const std::unique_ptr<uint8_t[]> seen(new uint8_t[g.V]());
  uint8_t* met = seen.get();
  const size_t ne = edges.size();
  const std::unique_ptr<uint8_t[]> first(new uint8_t[ne]);
  u64* e = edges.data();
  for (size_t k = 0; k < ne; ++k) {
    u32 v, w;
    g.edge_ends(key_id(e[k]), v, w);
    first[k] = !(met[v] & met[w]);
    met[v] = 1;
    met[w] = 1;
  }
  firsts.reset(new u64[ne]);
  const size_t nf = compact(e, first.get(), ne, 1, firsts.get());
  edges.resize(compact(e, first.get(), ne, 0, e));  // in place: out never passes the reads
  return nf;
}

// Dimension D-1 of one image by dual union-find over its codimension-1 cells (keys, increasing):
// on return `cells` holds only those that did not merge dual components (increasing); those that
// merged are set in cleared_bits if given (they never enter the dim-1 reduction). With c_top (the
// comparison image's top-cell ranks) it also tracks each dual component's c-elder and records,
// for every bar, the c-younger top cell at its birth: bar_of_ctop[that top cell] = bar (each top
// cell is the c-younger of one merge at most: it is no c-elder afterwards).
struct TopNode {
  u32 parent, rank;  // rank: of the root's top cell (the root is the component's elder)
  u32 crep, crank;   // with c_top: the component's c-elder and its c-rank
};

template <int D, typename N>
void top_pairs_impl(const Geom<D>& g, const Ranks& rk, std::vector<u64>& cells, const std::vector<u32>& top,
                    std::vector<Bar>& bars, const std::vector<u32>* c_top, std::vector<u32>* bar_of_ctop,
                    std::vector<std::pair<u32, u32>>* death_tops, std::vector<u64>* cleared_bits) {
  constexpr bool kTrack = std::is_same<N, TopNode>::value;
  const u32* R = rk.rank.data();
  CellRanks<D> cr{g, R};
  const u32 B = g.boundary();
  const u32* rt = top.data();
  const u32* rc = c_top ? c_top->data() : nullptr;
  const std::unique_ptr<N[]> nodes = node_array<N>(g.P);
  N* nd = nodes.get();
  for (u32 t = 0; t < g.P; ++t) {
    nd[t].parent = rt[t] == ~0u ? B : t;  // empty slots belong to B
    nd[t].rank = rt[t];
    if constexpr (kTrack) {
      nd[t].crep = t;
      nd[t].crank = rc[t];
    }
  }
  nd[B].parent = B;
  if (bar_of_ctop) bar_of_ctop->assign(g.P, kNone);
  if (cleared_bits) cleared_bits->assign((static_cast<size_t>(g.V) * D + 63) / 64, 0);
  u64* bits = cleared_bits ? cleared_bits->data() : nullptr;
  // The elder of two dual roots is the one with the larger (rank, id): B (rank ~0, the largest
  // slot) is everyone's elder.
  u64* cl = cells.data();
  const std::unique_ptr<uint8_t[]> merged(new uint8_t[cells.size()]);
  // the two cofaces of cell id: they differ in axis a (2D: the edge's other axis, 3D: the normal)
  auto cofaces = [&](u32 id, u32& t1, u32& t2) {
    const int a = D == 2 ? 1 - static_cast<int>(id % D) : static_cast<int>(id % D);
    t2 = id / D + g.slab;
    t1 = t2 - static_cast<u32>(g.vs[a]);
  };
  LastUnion last;
  u32 next1 = 0, next2 = 0;  // roots of cell k, found before the union of cell k + 1
  if (!cells.empty()) {
    u32 t1, t2;
    cofaces(key_id(cl[cells.size() - 1]), t1, t2);
    next1 = uf_find(nd, t1);
    next2 = uf_find(nd, t2);
  }
  for (size_t k = cells.size(); k-- > 0;) {
    if (k >= kAhead) {
      u32 a1, a2;
      cofaces(key_id(cl[k - kAhead]), a1, a2);
      __builtin_prefetch(nd + a1);
      __builtin_prefetch(nd + a2);
    }
    const u64 key = cl[k];
    const u32 id = key_id(key);
    const u32 v = id / D;
    const int ax = static_cast<int>(id % D);
    const u32 r1 = last.root(next1), r2 = last.root(next2);
    if (k > 0) {
      u32 t1, t2;
      cofaces(key_id(cl[k - 1]), t1, t2);
      next1 = uf_find(nd, t1);
      next2 = uf_find(nd, t2);
    }
    // no branch on whether the cell merges (half of them do, unpredictably): with r1 == r2 every
    // write below is a no-op
    const bool merge = r1 != r2;
    merged[k] = merge;
    if (bits) bits[id >> 6] |= u64(merge) << (id & 63);
    const bool first_elder = make_key(nd[r1].rank, r1) > make_key(nd[r2].rank, r2);
    const u32 young = first_elder ? r2 : r1, old = first_elder ? r1 : r2;
    nd[young].parent = old;
    last = {young, old};
    u32 c_young = kNone;
    if constexpr (kTrack) {
      const u32 a = nd[r1].crep, b = nd[r2].crep, ca = nd[r1].crank, cb = nd[r2].crank;
      const bool a_elder = make_key(ca, a) > make_key(cb, b);
      c_young = a_elder ? b : a;
      nd[old].crep = a_elder ? a : b;
      nd[old].crank = a_elder ? ca : cb;
    }
    const u32 ry = nd[young].rank;
    if (merge & (ry != key_rank(key))) {
      const u32 bvox = D == 2 ? cr.edge_voxel(v, ax) : cr.face_voxel(v, ax);
      if (kTrack) (*bar_of_ctop)[c_young] = static_cast<u32>(bars.size());
      if (death_tops) death_tops->push_back({young, static_cast<u32>(bars.size())});
      bars.push_back({bvox, top_voxel<D>(g, R, ry, young)});
    }
  }
  cells.resize(compact(cl, merged.get(), cells.size(), 0, cl));  // the cells that did not merge
}

template <int D>
void top_pairs(const Geom<D>& g, const Ranks& rk, std::vector<u64>& cells, const std::vector<u32>& top,
               std::vector<Bar>& bars, const std::vector<u32>* c_top, std::vector<u32>* bar_of_ctop,
               std::vector<std::pair<u32, u32>>* death_tops, std::vector<u64>* cleared_bits = nullptr) {
  if (c_top) top_pairs_impl<D, TopNode>(g, rk, cells, top, bars, c_top, bar_of_ctop, death_tops, cleared_bits);
  else top_pairs_impl<D, Node>(g, rk, cells, top, bars, c_top, bar_of_ctop, death_tops, cleared_bits);
}

// ---------------------------------------------------------------------------------------------
// Dimension 1 in 3D: the pivot pairs (edge, face) of a boundary matrix whose columns (faces) and
// rows (edges) follow two given orders. Two formulations give the same pairs:
//   homology:   columns = faces in increasing order (without those that merged dual components:
//               they reduce to zero), entries = their 4 edges, pivot = the largest edge;
//   cohomology: columns = edges in decreasing order (without those that merged in dimension 0),
//               entries = their cofaces, pivot = the smallest face (a matrix and its anti-transpose
//               have the same pivot pairs).
// Which one needs less work depends on the data (ties in one order make long reduction chains in
// the other), so the two race (see race()); the pairs do not depend on the winner.
//
// Keys are (rank << 32 | cell id), inverted for cohomology, so that the pivot is always the largest
// key. A column whose largest entry is still free is paired at once (apparent / emergent pair);
// the others are reduced by sorted merges and kept for later additions.

struct DimOneSide {
  const Geom<3>* g = nullptr;
  const u32* R = nullptr;     // vertex ranks that order the rows
  const u32* cols = nullptr;  // column cells (faces or edges) in column order
  u32 ncols = 0;
  bool cohomology = false;
  // Rows that are never pivots (bitset over row cells), left out of every column: a row that is
  // never a pivot is, in every lower-left submatrix, a combination of the rows below it, so no rank
  // and no pivot pair changes without it. Homology: the edges that merged in dimension 0 (of the
  // image that orders the rows); cohomology: the faces that merged dual components (of c for the
  // image pairs). About a third of every column. Required (all-zero when nothing is skipped).
  const u64* skip = nullptr;

  u32 row(u64 key) const { return static_cast<u32>((cohomology ? ~key : key) & 0xFFFFFFFFu); }
  // The entries of column cell `cell` that are not skipped; returns their number. Each vertex rank
  // is loaded once.
  __attribute__((always_inline)) inline int entries(u32 cell, u64* k) const {
    const u32 v = cell / 3;
    const int a = static_cast<int>(cell % 3);
    int n = 0;
    if (!cohomology) {  // boundary of face (v, normal a), spanning b < c
      int b, c;
      Geom<3>::spanned(a, b, c);
      const u32 sb = static_cast<u32>(g->vs[b]), sc = static_cast<u32>(g->vs[c]);
      const u32 r00 = R[v], r10 = R[v + sb], r01 = R[v + sc], r11 = R[v + sb + sc];
      const u32 e0 = v * 3 + static_cast<u32>(b), e1 = (v + sc) * 3 + static_cast<u32>(b);
      const u32 e2 = v * 3 + static_cast<u32>(c), e3 = (v + sb) * 3 + static_cast<u32>(c);
      // branch-free: write every key, keep it by advancing n (the skip bits are unpredictable)
      k[n] = (u64(std::max(r00, r10)) << 32) | e0;
      n += !get_bit(skip, e0);
      k[n] = (u64(std::max(r01, r11)) << 32) | e1;
      n += !get_bit(skip, e1);
      k[n] = (u64(std::max(r00, r01)) << 32) | e2;
      n += !get_bit(skip, e2);
      k[n] = (u64(std::max(r10, r11)) << 32) | e3;
      n += !get_bit(skip, e3);
      return n;
    }
    // coboundary of edge (v, axis a): for each other axis c the faces spanning a and c at v, v - e_c
    int64_t x[3];
    g->coords(v, x);
    const u32 sa = static_cast<u32>(g->vs[a]);
    const u32 base = std::max(R[v], R[v + sa]);
    for (int c = 0; c < 3; ++c) {
      if (c == a) continue;
      const u32 normal = static_cast<u32>(3 - a - c);
      const u32 sc = static_cast<u32>(g->vs[c]);
      if (x[c] + 1 < g->n[c]) {  // (inside the grid: predictable)
        const u32 q = v * 3 + normal;
        k[n] = ~((u64(std::max(base, std::max(R[v + sc], R[v + sa + sc]))) << 32) | q);
        n += !get_bit(skip, q);
      }
      if (x[c] >= 1) {
        const u32 u = v - sc;
        const u32 q = u * 3 + normal;
        k[n] = ~((u64(std::max(base, std::max(R[u], R[u + sa]))) << 32) | q);
        n += !get_bit(skip, q);
      }
    }
    return n;
  }
};

struct DimOneReducer {
  // Work of starting a column (entries, pivot test: mostly cache misses) in units of merged entries.
  static constexpr u64 kColumnWork = 16;
  DimOneSide side;
  // Per row cell: 0 if it is no pivot; else the pivot's column as (cell + 1) when the column is its
  // own boundary / coboundary, or (kStored | offset of its kept reduced column in pool).
  static constexpr u32 kStored = 0x80000000u;
  std::vector<u32> pivot;
  std::vector<u64> taken;      // bitset over rows: is a pivot (small enough to stay in cache)
  std::vector<u64> pool;       // kept reduced columns: length n, column cell, then n keys (decreasing)
  // The working column: col[head, tail), sorted decreasing, pairs cancelled, with room in front.
  std::vector<u64> col;
  size_t head = 0, tail = 0;
  u32 i = 0;                   // next column
  bool busy = false;           // column i is the working column, partly reduced
  bool started = false;

  // Prepares a fresh reduction of the given columns and rows.
  void reset(const DimOneSide& sd) {
    release();
    side = sd;
    i = 0;
    busy = false;
    started = false;
  }
  void start() {
    const size_t nrows = static_cast<size_t>(side.g->V) * 3;
    pivot.assign(nrows, 0);
    taken.assign((nrows + 63) / 64, 0);
    started = true;
  }
  bool is_taken(u32 r) const { return (taken[r >> 6] >> (r & 63)) & 1; }
  void take(u32 r, u32 entry) {
    taken[r >> 6] |= u64(1) << (r & 63);
    pivot[r] = entry;
  }
  static constexpr size_t kRoom = 64;
  void set_column(const u64* k, int n) {
    if (col.size() < 2 * kRoom) col.resize(2 * kRoom);
    head = kRoom;
    tail = head + static_cast<size_t>(n);
    std::copy(k, k + n, col.begin() + static_cast<std::ptrdiff_t>(head));
  }
  // Working column <- working column + x (over Z/2), x sorted decreasing with the same pivot. The
  // pivots cancel; x's other keys (mostly 2-3) are merged into the front of the column, down to
  // where they end: the rest of it (often most: it can grow to thousands of keys) stays in place.
  // The merged part is written from m = n - 1 places in front of it, so it ends right before the
  // rest (moved up only by further cancellations). Returns the work done (keys merged, plus one).
  size_t add(const u64* x, size_t n) {
    ++head;
    const size_t m = n - 1;
    if (head < m) {  // room in front: recentre in a buffer twice the column's length
      const size_t len = tail - head, room = std::max(kRoom, len) + m;
      std::vector<u64> bigger(2 * room + len);
      std::copy(col.begin() + static_cast<std::ptrdiff_t>(head), col.begin() + static_cast<std::ptrdiff_t>(tail),
                bigger.begin() + static_cast<std::ptrdiff_t>(room));
      col.swap(bigger);
      head = room;
      tail = room + len;
    }
    u64* const from = col.data() + head - m;
    u64* o = from;
    const u64 *a = col.data() + head, *ae = col.data() + tail, *b = x + 1, *be = x + n;
    // branch-free merge (o never passes a): equal keys cancel (both advance, nothing is kept)
    while (a != ae && b != be) {
      const u64 va = *a, vb = *b;
      *o = va > vb ? va : vb;
      o += va != vb;
      a += va >= vb;
      b += vb >= va;
    }
    while (b != be) *o++ = *b++;
    const size_t merged = static_cast<size_t>(o - from), gap = static_cast<size_t>(a - o);
    if (gap) std::memmove(from + gap, from, merged * sizeof(u64));
    head = head - m + gap;
    return merged + 1;
  }
  // Sorts n <= 4 keys decreasing (a sorting network; missing entries are padded with 0, below
  // every key: homology columns always have 4 entries and cohomology keys are never 0).
  static void sort_desc(u64* k, int n) {
    for (int q = n; q < 4; ++q) k[q] = 0;
    auto cx = [](u64& a, u64& b) {
      const u64 hi = a > b ? a : b, lo = a > b ? b : a;
      a = hi;
      b = lo;
    };
    cx(k[0], k[1]);
    cx(k[2], k[3]);
    cx(k[0], k[2]);
    cx(k[1], k[3]);
    cx(k[1], k[2]);
  }
  u32 keep(u32 cell) {
    const size_t off = pool.size();
    if (off >= kStored) throw std::length_error("dimension-1 reduction: more than 2^31 kept entries");
    pool.push_back(tail - head);
    pool.push_back(cell);
    pool.insert(pool.end(), col.begin() + static_cast<std::ptrdiff_t>(head), col.begin() + static_cast<std::ptrdiff_t>(tail));
    return kStored | static_cast<u32>(off);
  }
  // Reduces columns until about `budget` units of work are spent or column `stop` is reached;
  // true when all are reduced.
  bool advance(u64 budget, u32 stop = 0xFFFFFFFFu) {
    if (!started) start();
    u64 work = 0;
    u64 k[4];
    bool suspended = false;
    while (i < side.ncols && !suspended) {
      if (work >= budget || i >= stop) {
        suspended = true;
        break;
      }
      const u32 cell = side.cols[i];
      if (!busy) {
        const int n = side.entries(cell, k);
        work += kColumnWork;
        if (n == 0) {
          ++i;
          continue;
        }
        u64 top = k[0];
        for (int q = 1; q < n; ++q) top = std::max(top, k[q]);
        const u32 r = side.row(top);
        if (!is_taken(r)) {  // the pivot is free: the column is already reduced
          take(r, cell + 1);
          ++i;
          continue;
        }
        sort_desc(k, n);
        set_column(k, n);
        busy = true;
      }
      while (true) {
        if (head == tail) {  // zero column
          busy = false;
          ++i;
          break;
        }
        const u32 r = side.row(col[head]);
        if (!is_taken(r)) {
          take(r, keep(cell));
          busy = false;
          ++i;
          break;
        }
        // add the reduced column whose pivot is the working column's; the next pivot is often the
        // second key: its slot is fetched while the column to add is
        if (tail - head > 1) __builtin_prefetch(pivot.data() + side.row(col[head + 1]));
        const u32 e = pivot[r];
        if (e & kStored) {
          const u64 at = e & ~kStored;
          const u64 len = pool[at];
          work += add(pool.data() + at + 2, len);
        } else {
          u64 kj[4];
          const int nj = side.entries(e - 1, kj);
          sort_desc(kj, nj);
          work += add(kj, static_cast<size_t>(nj));
        }
        if (work >= budget) {  // suspend mid-column: the working column keeps the state
          suspended = true;
          break;
        }
      }
    }
    return i >= side.ncols;
  }
  u32 column_cell(u32 entry) const { return (entry & kStored) ? static_cast<u32>(pool[(entry & ~kStored) + 1]) : entry - 1; }
  void release() {
    std::vector<u32>().swap(pivot);
    std::vector<u64>().swap(taken);
    std::vector<u64>().swap(pool);
    std::vector<u64>().swap(col);
  }
};

// Races the two formulations; returns the finished one (the other is released). Both give the
// same pairs (the pivot pairs of one matrix), so the race only decides the speed, and it is timed
// in this thread's CPU time: a count of operations misjudges it (a column start costs a few cache
// misses on continuous data and next to nothing on binary data, where the cells come in memory
// order). Both forms first reduce the same first 1/64 of their columns; the faster goes on, in
// chunks, until it has spent twice what the other would need at its probe's pace; then the other
// gets its turn on the same terms (so a misleading probe costs at most a small factor).
inline double thread_seconds() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
#else
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
#endif
}

struct RaceSide {
  DimOneReducer* r;
  double seconds = 0;
  bool advance(u64 budget, u32 stop = 0xFFFFFFFFu) {
    const double t0 = thread_seconds();
    const bool done = r->advance(budget, stop);
    seconds += thread_seconds() - t0;
    return done;
  }
  // this side's total time at its pace so far
  double projected() const {
    return seconds / std::max<u32>(r->i, 1) * std::max<u32>(r->side.ncols, 1);
  }
};

inline DimOneReducer* race(DimOneReducer& a, DimOneReducer& b) {
  const u32 n = std::max(a.side.ncols, b.side.ncols);
  const u32 probe = std::max<u32>(n / 64, 64);
  const u64 chunk = DimOneReducer::kColumnWork * (n / 64) + 1024;
  RaceSide sa{&a}, sb{&b};
  DimOneReducer* done = nullptr;
  if (sa.advance(~u64(0), probe)) done = &a;
  else if (sb.advance(~u64(0), probe)) done = &b;
  RaceSide* x = sa.seconds <= sb.seconds ? &sa : &sb;
  RaceSide* y = x == &sa ? &sb : &sa;
  while (!done) {
    const double limit = 2 * y->projected();
    do {
      if (x->advance(chunk)) done = x->r;
    } while (!done && x->seconds <= limit);
    std::swap(x, y);
  }
  (done == &a ? b : a).release();
  return done;
}

// The pivot pairs (edge, face) of a finished reduction, calling f(edge, face).
template <typename F>
void for_each_pair(const DimOneReducer& r, F&& f) {
  const u32 nrows = static_cast<u32>(r.pivot.size());
  for (u32 row = 0; row < nrows; ++row) {
    const u32 e = r.pivot[row];
    if (e == 0) continue;
    const u32 cell = r.column_cell(e);
    if (r.side.cohomology) f(cell, row);
    else f(row, cell);
  }
}

// ---------------------------------------------------------------------------------------------
// One image's state through the phases: ranks, its own bars, and (for f and g) the maps from the
// comparison image's cells to its bars that the matching reads.

template <int D>
struct ImageState {
  Ranks rk;
  std::vector<u32> top;             // top-cell ranks
  std::vector<Bar> bars[D];         // own bars per dimension
  std::vector<uint8_t> matched[D];  // per bar (f and g)
  std::vector<u32> bar_of_vertex;   // dim 0: birth vertex -> bar (f, g)
  std::vector<u32> img_top;         // dim D-1: c's top cell killed at a bar's birth -> bar, else kNone (f, g)
  std::vector<u64> edges;           // c: keys of the edges the dim-0 matching sweep visits
  std::vector<std::pair<u32, u32>> death_tops;  // c: (dying top cell, bar) of each top-dim bar
  // 3D dimension 1
  std::vector<u32> pos_edges;       // edges that did not merge in dim 0, decreasing (cohomology columns)
  std::vector<u32> hom_cols;        // faces that did not merge dual components, increasing (homology columns)
  std::vector<u64> neg_edges;       // bitset: edges that merged in dim 0 (never dim-1 pivot rows)
  std::vector<u64> pos_faces;       // bitset: faces that merged dual components (never pivot rows)
  std::vector<u32> birth_edges;     // f, g: birth edge of each dim-1 bar (bars sorted by it)
  std::vector<u64> death_keys;      // f, g: (rank, face) of each dim-1 bar's death: the output order
  std::vector<std::pair<u32, u32>> face_bars;  // c: (death face, bar) of each dim-1 bar, by face
  std::vector<u32> img_edge;        // f, g: per entry of c's face_bars, the edge of its image pair
  // the two sides of a dimension-1 race (own bars, then the image pairs)
  DimOneReducer side[2];
};

// f and g (and c = min(f, g)) of one instance, and the matching between f's and g's bars.
template <int D, typename T>
struct Instance {
  Geom<D> geom;
  const T* f;
  const T* g;  // nullptr for a barcode of f alone
  ImageState<D> img[3];  // f, g, c
  std::vector<std::pair<u32, u32>> matches[D];
  bool strict = false;

  Instance(const int64_t* sizes, const T* f_, const T* g_, bool strict_) : geom(sizes), f(f_), g(g_), strict(strict_) {}

  double value(int which, u32 v) const {
    if (which == 0) return static_cast<double>(f[v]);
    if (which == 1) return static_cast<double>(g[v]);
    return std::min(static_cast<double>(f[v]), static_cast<double>(g[v]));
  }

  // Phase 1: ranks (and top-cell ranks) of image `which` (0 = f, 1 = g, 2 = c).
  void rank(int which) {
    ImageState<D>& s = img[which];
    if (which == 2) {
      std::vector<T> c(geom.V);
      for (u32 v = 0; v < geom.V; ++v) c[v] = std::min(f[v], g[v]);
      compute_ranks(c.data(), geom.V, s.rk);
    } else {
      compute_ranks(which == 0 ? f : g, geom.V, s.rk);
    }
    top_ranks<D>(geom, s.rk.rank.data(), s.top);
  }

  // Phase 2: own bars of image `which`; in a matching, also the maps the matching reads. Split in
  // three: own_pre (sorts, union-finds), the dimension-1 race (3D), own_finish.
  void own_pre(int which, bool matching) {
    ImageState<D>& s = img[which];
    const bool is_c = which == 2;
    const bool image = matching && !is_c;
    std::vector<u64> edges;
    if constexpr (D == 2) {
      // dim 1 by dual union-find over the edges that can merge there; dim 0 over the rest
      std::unique_ptr<u64[]> firsts;
      sort_edges<D>(geom, s.rk, edges);
      const size_t nf = split_first_edges(geom, edges, firsts);
      top_pairs<D>(geom, s.rk, edges, s.top, s.bars[1], image ? &img[2].top : nullptr, image ? &s.img_top : nullptr,
                   is_c ? &s.death_tops : nullptr);
      // (few edges are left: the merge's branch is well predicted)
      std::vector<u64> dim0_edges(nf + edges.size());
      std::merge(firsts.get(), firsts.get() + nf, edges.begin(), edges.end(), dim0_edges.begin());
      if (is_c) {
        s.edges.swap(dim0_edges);  // c's dim-0 bars come out of the matching sweep
      } else {
        dim0_pairs<D>(geom, s.rk, dim0_edges, s.bars[0], matching ? &s.bar_of_vertex : nullptr, nullptr, nullptr);
      }
    } else {
      sort_edges<D>(geom, s.rk, edges);
      std::vector<Bar> c_bars0;
      dim0_pairs<D>(geom, s.rk, edges, is_c ? c_bars0 : s.bars[0], image ? &s.bar_of_vertex : nullptr, &s.pos_edges,
                    is_c ? &s.edges : nullptr, &s.neg_edges);
      std::vector<u64>().swap(edges);
      s.pos_edges.shrink_to_fit();  // kept through the dimension-1 reductions
      std::vector<u64> faces;
      sort_faces(geom, s.rk, faces);
      top_pairs<D>(geom, s.rk, faces, s.top, s.bars[2], image ? &img[2].top : nullptr, image ? &s.img_top : nullptr,
                   is_c ? &s.death_tops : nullptr, &s.pos_faces);
      s.hom_cols.resize(faces.size());
      for (size_t q = 0; q < faces.size(); ++q) s.hom_cols[q] = key_id(faces[q]);
    }
    if (!is_c) std::vector<u32>().swap(s.top);
  }

  // Phase 2 in one task: everything, with the dimension-1 race run sequentially.
  void own(int which, bool matching) {
    own_pre(which, matching);
    if (D == 3) {
      own_race_setup(which);
      DimOneReducer* win = race(img[which].side[0], img[which].side[1]);
      own_finish(which, matching, *win);
    } else {
      own_finish(which, matching, img[which].side[0]);
    }
  }

  // After phase 2 of all three images: c's top-cell ranks are no longer needed.
  void own_done() { std::vector<u32>().swap(img[2].top); }

  void own_race_setup(int which) {
    if constexpr (D == 3) {
      ImageState<D>& s = img[which];
      const u32* R = s.rk.rank.data();
      s.side[0].reset({&geom, R, s.hom_cols.data(), static_cast<u32>(s.hom_cols.size()), false, s.neg_edges.data()});
      s.side[1].reset({&geom, R, s.pos_edges.data(), static_cast<u32>(s.pos_edges.size()), true, s.pos_faces.data()});
    }
  }

  // After the dimension-1 race (3D): the own bars, then the lists the later phases need.
  void own_finish(int which, bool matching, DimOneReducer& win) {
    ImageState<D>& s = img[which];
    const bool is_c = which == 2;
    if (D == 3) {
      dim1_bars(s, which, win);
      // for the image reductions c keeps its columns and positive faces, f and g their positive
      // (column) and negative (never pivot) edges
      if (!is_c || !matching) {
        std::vector<u32>().swap(s.hom_cols);
        std::vector<u64>().swap(s.pos_faces);
      }
      if (is_c || !matching) {
        std::vector<u32>().swap(s.pos_edges);
        std::vector<u64>().swap(s.neg_edges);
      }
    }
    if (!is_c)
      for (int k = 0; k < D; ++k) s.matched[k].assign(s.bars[k].size(), 0);
  }

  void dim1_bars(ImageState<D>& s, int which, DimOneReducer& win) {
    if constexpr (D == 3) {
      const u32* R = s.rk.rank.data();
      CellRanks<D> cr{geom, R};
      std::vector<std::pair<u32, u32>> pairs;  // (birth edge, death face), nonzero persistence
      for_each_pair(win, [&](u32 e, u32 q) {
        if (cr.edge_rank(e / 3, static_cast<int>(e % 3)) != cr.face_rank(q / 3, static_cast<int>(q % 3)))
          pairs.push_back({e, q});
      });
      win.release();
      std::sort(pairs.begin(), pairs.end());
      std::vector<Bar>& bars = s.bars[1];
      bars.reserve(pairs.size());
      const bool is_c = which == 2;
      if (is_c) s.face_bars.reserve(pairs.size());
      else s.birth_edges.reserve(pairs.size());
      for (auto& eq : pairs) {
        const u32 b = static_cast<u32>(bars.size());
        bars.push_back({cr.edge_voxel(eq.first / 3, static_cast<int>(eq.first % 3)),
                        cr.face_voxel(eq.second / 3, static_cast<int>(eq.second % 3))});
        if (is_c) {
          s.face_bars.push_back({eq.second, b});
        } else {
          s.birth_edges.push_back(eq.first);
          s.death_keys.push_back(make_key(cr.face_rank(eq.second / 3, static_cast<int>(eq.second % 3)), eq.second));
        }
      }
      if (is_c) std::sort(s.face_bars.begin(), s.face_bars.end());
    } else {
      (void)s;
      (void)which;
      (void)win;
    }
  }

  // Phase 3 (3D): the image pairs (this image's edge, c's face) of dimension 1, kept for c's death
  // faces: a race between the homology form (c's columns, rows in this image's order) and the
  // cohomology form (this image's columns, rows in c's order).
  void image_race_setup(int which) {
    if constexpr (D == 3) {
      ImageState<D>& s = img[which];
      const ImageState<D>& C = img[2];
      s.side[0].reset({&geom, s.rk.rank.data(), C.hom_cols.data(), static_cast<u32>(C.hom_cols.size()), false,
                       s.neg_edges.data()});
      s.side[1].reset({&geom, C.rk.rank.data(), s.pos_edges.data(), static_cast<u32>(s.pos_edges.size()), true,
                       C.pos_faces.data()});
    }
  }

  void image_finish(int which, DimOneReducer& win) {
    ImageState<D>& s = img[which];
    const ImageState<D>& C = img[2];
    s.img_edge.assign(C.face_bars.size(), kNone);
    if (win.side.cohomology) {  // the rows are faces: c's death faces are looked up directly
      for (size_t k = 0; k < C.face_bars.size(); ++k) {
        const u32 q = C.face_bars[k].first;
        if (win.pivot[q]) s.img_edge[k] = win.column_cell(win.pivot[q]);
      }
    } else {
      // c's death faces as a bitset: most pairs are no such face and skip the search
      std::vector<u64> death((static_cast<size_t>(geom.V) * 3 + 63) / 64, 0);
      for (auto& qb : C.face_bars) set_bit(death, qb.first);
      for_each_pair(win, [&](u32 e, u32 q) {
        if (!get_bit(death.data(), q)) return;
        auto it = std::lower_bound(C.face_bars.begin(), C.face_bars.end(), std::make_pair(q, u32(0)));
        if (it != C.face_bars.end() && it->first == q) s.img_edge[it - C.face_bars.begin()] = e;
      });
    }
    win.release();
    std::vector<u32>().swap(s.pos_edges);
    std::vector<u64>().swap(s.neg_edges);
  }

  void image(int which) {
    if (D != 3) return;
    image_race_setup(which);
    image_finish(which, *race(img[which].side[0], img[which].side[1]));
  }

  bool keep(u32 fb, u32 gb, u32 cdeath) const {
    if (!strict) return true;
    const double dc = value(2, cdeath);
    return value(0, fb) < dc && value(1, gb) < dc;
  }

  void add_match(int k, u32 pf, u32 pg, u32 cdeath) {
    ImageState<D>& F = img[0];
    ImageState<D>& G = img[1];
    if (!keep(F.bars[k][pf].birth, G.bars[k][pg].birth, cdeath)) return;
    matches[k].push_back({pf, pg});
    F.matched[k][pf] = 1;
    G.matched[k][pg] = 1;
  }

  // Phase 4: the matching.
  void match() {
    ImageState<D>& F = img[0];
    ImageState<D>& G = img[1];
    ImageState<D>& C = img[2];
    // dim D-1: c's bars and the top cells they kill
    for (auto& tb : C.death_tops) {
      const u32 pf = F.img_top[tb.first], pg = G.img_top[tb.first];
      if (pf != kNone && pg != kNone) add_match(D - 1, pf, pg, C.bars[D - 1][tb.second].death);
    }
    std::vector<std::pair<u32, u32>>().swap(C.death_tops);
    std::vector<u32>().swap(F.img_top);
    std::vector<u32>().swap(G.img_top);
    if (D == 3) {
      // dim 1: c's bar dying at face q matches the f and g bars born at the edges of q's image pairs;
      // c's bars in the order of their death faces in c's filtration (the reference's match order)
      auto bar_born_at = [](const std::vector<u32>& births, u32 e) {
        auto it = std::lower_bound(births.begin(), births.end(), e);
        return it != births.end() && *it == e ? static_cast<u32>(it - births.begin()) : kNone;
      };
      CellRanks<D> crc{geom, C.rk.rank.data()};
      std::vector<std::pair<u64, u32>> order(C.face_bars.size());
      for (size_t k = 0; k < C.face_bars.size(); ++k) {
        const u32 q = C.face_bars[k].first;
        order[k] = {make_key(crc.face_rank(q / 3, static_cast<int>(q % 3)), q), static_cast<u32>(k)};
      }
      std::sort(order.begin(), order.end());
      for (auto& ok : order) {
        const size_t k = ok.second;
        const u32 e0 = F.img_edge[k], e1 = G.img_edge[k];
        if (e0 == kNone || e1 == kNone) continue;
        const u32 pf = bar_born_at(F.birth_edges, e0), pg = bar_born_at(G.birth_edges, e1);
        if (pf != kNone && pg != kNone) add_match(1, pf, pg, C.bars[1][C.face_bars[k].second].death);
      }
      std::vector<u32>().swap(F.img_edge);
      std::vector<u32>().swap(G.img_edge);
      std::vector<u32>().swap(F.birth_edges);
      std::vector<u32>().swap(G.birth_edges);
      std::vector<std::pair<u32, u32>>().swap(C.face_bars);
      std::vector<u32>().swap(C.hom_cols);
      std::vector<u64>().swap(C.pos_faces);
    }
    // dim 0: union-find over c's edges that also tracks each component's f-elder and g-elder
    // (all kept at the root, with their ranks)
    struct MatchNode {
      u32 parent, rank, f, frank, g, grank;
    };
    const u32 V = geom.V;
    const u32 *Rc = C.rk.rank.data(), *Rf = F.rk.rank.data(), *Rg = G.rk.rank.data();
    const std::unique_ptr<MatchNode[]> nodes = node_array<MatchNode>(V);
    MatchNode* nd = nodes.get();
    for (u32 v = 0; v < V; ++v) nd[v] = {v, Rc[v], v, Rf[v], v, Rg[v]};
    const size_t ne = C.edges.size();
    const u64* edges = C.edges.data();
    EdgeSweep<D, MatchNode> sweep(geom, nd, edges, ne);
    for (size_t k = 0; k < ne; ++k) {
      const u64 key = edges[k];
      u32 v, w, rv, rw;
      geom.edge_ends(key_id(key), v, w);
      sweep.roots(k, rv, rw);
      if (rv == rw) continue;  // (never: these edges all merge)
      const MatchNode x = nd[rv], y = nd[rw];
      const bool v_elder = make_key(x.rank, rv) < make_key(y.rank, rw);
      const u32 young = v_elder ? rw : rv, old = v_elder ? rv : rw;
      nd[young].parent = old;
      sweep.last = {young, old};
      const bool fa_elder = make_key(x.frank, x.f) < make_key(y.frank, y.f);
      const bool ga_elder = make_key(x.grank, x.g) < make_key(y.grank, y.g);
      nd[old].f = fa_elder ? x.f : y.f;
      nd[old].frank = fa_elder ? x.frank : y.frank;
      nd[old].g = ga_elder ? x.g : y.g;
      nd[old].grank = ga_elder ? x.grank : y.grank;
      if ((v_elder ? y.rank : x.rank) == key_rank(key)) continue;  // zero persistence in c
      const u32 pf = F.bar_of_vertex[fa_elder ? y.f : x.f], pg = G.bar_of_vertex[ga_elder ? y.g : x.g];
      if (pf != kNone && pg != kNone) add_match(0, pf, pg, nd[w].rank >= nd[v].rank ? w : v);
    }
    std::vector<u64>().swap(C.edges);
  }
};

// The instance's rows, in the order of the op's output: per dimension the matched pairs
// (f birth, f death, g birth, g death), then the unmatched f bars, then the unmatched g bars.
template <int D, typename T>
int64_t count_rows(const Instance<D, T>& in, bool include_g_unmatched, int64_t* counts /* [D][3] */) {
  int64_t total = 0;
  for (int k = 0; k < D; ++k) {
    const int64_t nm = static_cast<int64_t>(in.matches[k].size());
    const int64_t nf = static_cast<int64_t>(in.img[0].bars[k].size()) - nm;
    const int64_t ng = include_g_unmatched ? static_cast<int64_t>(in.img[1].bars[k].size()) - nm : 0;
    counts[3 * k] = nm;
    counts[3 * k + 1] = nf;
    counts[3 * k + 2] = ng;
    total += nm + nf + ng;
  }
  return total;
}

// The order in which image s's bars of dimension k are reported: as stored, except 3D dimension 1
// (stored by birth edge), reported by death face in the image's filtration, as the reference does.
template <int D>
std::vector<u32> bar_order(const ImageState<D>& s, int k) {
  std::vector<u32> order(s.bars[k].size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<u32>(i);
  if (D == 3 && k == 1 && s.death_keys.size() == order.size())
    std::sort(order.begin(), order.end(), [&](u32 a, u32 b) { return s.death_keys[a] < s.death_keys[b]; });
  return order;
}

// rows: [*, 5] = (segment, f birth, f death, g birth, g death), segment = (n*D + k)*3 + kind.
template <int D, typename T>
void write_rows(const Instance<D, T>& in, bool include_g_unmatched, int64_t n, int64_t* rows) {
  const ImageState<D>& F = in.img[0];
  const ImageState<D>& G = in.img[1];
  for (int k = 0; k < D; ++k) {
    const int64_t seg = (n * D + k) * 3;
    for (auto& m : in.matches[k]) {
      const Bar& a = F.bars[k][m.first];
      const Bar& b = G.bars[k][m.second];
      rows[0] = seg;
      rows[1] = a.birth;
      rows[2] = a.death;
      rows[3] = b.birth;
      rows[4] = b.death;
      rows += 5;
    }
    for (const u32 i : bar_order(F, k)) {
      if (F.matched[k][i]) continue;
      rows[0] = seg + 1;
      rows[1] = F.bars[k][i].birth;
      rows[2] = F.bars[k][i].death;
      rows[3] = rows[4] = -1;
      rows += 5;
    }
    if (!include_g_unmatched) continue;
    for (const u32 i : bar_order(G, k)) {
      if (G.matched[k][i]) continue;
      rows[0] = seg + 2;
      rows[1] = rows[2] = -1;
      rows[3] = G.bars[k][i].birth;
      rows[4] = G.bars[k][i].death;
      rows += 5;
    }
  }
}

}  // namespace betti_matching
}  // namespace lossforge
