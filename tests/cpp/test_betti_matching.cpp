// The Betti matching core (csrc/betti_matching/betti_matching_core.h) without torch: barcodes of
// small known images, and the dimension-1 reductions of 3D volumes computed by the homology form
// alone, the cohomology form alone, their race, and a race suspended every few entries (every
// column is then reduced across many resumptions) all give the same pairs; in 2D, the first edge
// of each vertex never merges in the dual union-find (which skips these edges).
#include <algorithm>
#include <cstdint>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "betti_matching/betti_matching_core.h"
#include "check.h"

using namespace lossforge::betti_matching;
using Pairs = std::vector<std::pair<u32, u32>>;

static Pairs pairs_of(const DimOneReducer& r) {
  Pairs out;
  for_each_pair(r, [&](u32 e, u32 q) { out.push_back({e, q}); });
  std::sort(out.begin(), out.end());
  return out;
}

// Runs the sides of a prepared race in the given mode and returns the pivot pairs.
// mode 0: homology alone; 1: cohomology alone; 2: race; 3: race with tiny alternating budgets.
static Pairs run_mode(DimOneReducer* side, int mode) {
  DimOneReducer* win = nullptr;
  if (mode == 0 || mode == 1) {
    while (!side[mode].advance(1u << 30)) {
    }
    win = &side[mode];
  } else if (mode == 2) {
    win = race(side[0], side[1]);
  } else {
    u64 budget = 3;
    while (!win) {
      if (side[0].advance(budget)) win = &side[0];
      else if (side[1].advance(budget)) win = &side[1];
      budget = budget * 5 / 4 + 1;
    }
  }
  return pairs_of(*win);
}

// Additions into the working column (the front merge, the room in front running out, cancellations
// below the pivot) agree with a symmetric difference of sets.
static void check_column_additions(std::mt19937& rng) {
  DimOneReducer r;
  std::set<u64> ref;
  for (int step = 0; step < 20000; ++step) {
    if (ref.empty()) {
      const u64 k[1] = {u64(1) << 40};
      r.set_column(k, 1);
      ref.insert(k[0]);
    }
    // phases of 2000 additions that mostly grow the column (to thousands of keys), then shrink it
    const bool grow = (step / 2000) % 2 == 0;
    const u64 pivot = *ref.rbegin();
    std::vector<u64> x{pivot};
    const int extra = 1 + static_cast<int>(rng() % 6);
    for (int q = 0; q < extra; ++q) {
      u64 key;
      if (ref.size() > 1 && rng() % 5 < (grow ? 1u : 4u)) {  // a key of the column: it cancels
        auto it = ref.begin();
        std::advance(it, static_cast<long>(rng() % (ref.size() - 1)));
        key = *it;
      } else {  // a key below the pivot, mostly near it
        key = pivot - 1 - rng() % std::min<u64>(pivot - 1, step % 7 == 0 ? u64(1) << 30 : 1000);
      }
      if (key < pivot && std::find(x.begin(), x.end(), key) == x.end()) x.push_back(key);
    }
    std::sort(x.begin(), x.end(), [](u64 a, u64 b) { return a > b; });
    r.add(x.data(), x.size());
    for (u64 key : x)
      if (!ref.erase(key)) ref.insert(key);
    const std::vector<u64> got(r.col.begin() + static_cast<long>(r.head), r.col.begin() + static_cast<long>(r.tail));
    const std::vector<u64> want(ref.rbegin(), ref.rend());
    CHECK(got == want);
    if (got != want) return;
  }
}

static void check_formulations_agree(int64_t nx, int64_t ny, int64_t nz, int kind, std::mt19937& rng) {
  const int64_t sizes[3] = {nx, ny, nz};
  const size_t V = static_cast<size_t>(nx * ny * nz);
  std::vector<float> f(V), g(V);
  std::uniform_real_distribution<float> U(0, 1);
  for (size_t i = 0; i < V; ++i) {
    f[i] = kind == 1 ? static_cast<float>(rng() % 3) : U(rng);
    g[i] = kind == 0 ? U(rng) : static_cast<float>(rng() % 2);
  }
  Instance<3, float> in(sizes, f.data(), g.data(), false);
  for (int w = 0; w < 3; ++w) in.rank(w);
  for (int w : {2, 0, 1}) {
    in.own_pre(w, true);
    Pairs ref;
    for (int mode = 0; mode < 4; ++mode) {
      in.own_race_setup(w);
      const Pairs got = run_mode(in.img[w].side, mode);
      if (mode == 0) ref = got;
      else CHECK(got == ref);
    }
    in.own_race_setup(w);
    in.own_finish(w, true, *race(in.img[w].side[0], in.img[w].side[1]));
  }
  for (int w : {0, 1}) {
    Pairs ref;
    for (int mode = 0; mode < 4; ++mode) {
      in.image_race_setup(w);
      const Pairs got = run_mode(in.img[w].side, mode);
      if (mode == 0) ref = got;
      else CHECK(got == ref);
    }
    in.image_race_setup(w);
    in.image_finish(w, *race(in.img[w].side[0], in.img[w].side[1]));
  }
  in.match();
  // every matched pair's bars exist in both images
  for (int k = 0; k < 3; ++k)
    for (auto& m : in.matches[k]) CHECK(m.first < in.img[0].bars[k].size() && m.second < in.img[1].bars[k].size());
}

// 2D: over all edges, the dual union-find merges exactly the edges that do not merge in dimension
// 0, never the first edge of a vertex; the split keeps both lists sorted and loses no edge.
static void check_first_edges_split(int64_t nx, int64_t ny, int levels, std::mt19937& rng) {
  const int64_t sizes[2] = {nx, ny};
  Geom<2> g(sizes);
  std::vector<float> f(g.V);
  for (auto& x : f) x = static_cast<float>(rng() % levels);
  Ranks rk;
  compute_ranks(f.data(), g.V, rk);
  std::vector<u32> top;
  top_ranks<2>(g, rk.rank.data(), top);
  std::vector<u64> all;
  sort_edges<2>(g, rk, all);
  std::vector<u64> left = all;  // the edges that do not merge dual components
  std::vector<Bar> bars;
  top_pairs<2>(g, rk, left, top, bars, nullptr, nullptr, nullptr);
  std::vector<u64> rest = all;
  std::unique_ptr<u64[]> firsts;
  const size_t nf = split_first_edges(g, rest, firsts);
  CHECK(nf + rest.size() == all.size());
  CHECK(std::is_sorted(firsts.get(), firsts.get() + nf) && std::is_sorted(rest.begin(), rest.end()));
  std::vector<u64> both(nf + rest.size());
  std::merge(firsts.get(), firsts.get() + nf, rest.begin(), rest.end(), both.begin());
  CHECK(both == all);
  CHECK(left.size() + 1 == g.V);  // V - 1 edges merge in dimension 0
  for (size_t i = 0; i < nf; ++i) CHECK(std::binary_search(left.begin(), left.end(), firsts[i]));
}

int main() {
  {  // 2D: a ring of 0s around a 1: one loop born at 0, filled at the centre (pixel 4) at 1
    const int64_t sizes[2] = {3, 3};
    const float f[9] = {0, 0, 0, 0, 1, 0, 0, 0, 0};
    Instance<2, float> in(sizes, f, nullptr, false);
    in.rank(0);
    in.own(0, false);
    CHECK(in.img[0].bars[0].empty());
    CHECK(in.img[0].bars[1].size() == 1);
    if (in.img[0].bars[1].size() == 1) {
      CHECK(in.img[0].bars[1][0].death == 4);
      CHECK(f[in.img[0].bars[1][0].birth] == 0);
    }
    CHECK(in.img[0].rk.elder == 0 && in.img[0].rk.nranks == 2);
  }
  {  // 2D: two components (values 0 and 0.5) joined at 1: the younger dies at the joining pixel
    const int64_t sizes[2] = {1, 3};
    const double f[3] = {0.5, 1.0, 0.0};
    Instance<2, double> in(sizes, f, nullptr, false);
    in.rank(0);
    in.own(0, false);
    CHECK(in.img[0].bars[0].size() == 1);
    if (in.img[0].bars[0].size() == 1) CHECK(in.img[0].bars[0][0].birth == 0 && in.img[0].bars[0][0].death == 1);
    CHECK(in.img[0].rk.elder == 2);
  }
  {  // 3D: a hollow 3x3x3 cube of 0s around a 1: one cavity, no loops, one component
    const int64_t sizes[3] = {3, 3, 3};
    std::vector<float> f(27, 0.0f);
    f[13] = 1.0f;
    Instance<3, float> in(sizes, f.data(), nullptr, false);
    in.rank(0);
    in.own(0, false);
    CHECK(in.img[0].bars[0].empty() && in.img[0].bars[1].empty());
    CHECK(in.img[0].bars[2].size() == 1);
    if (in.img[0].bars[2].size() == 1) CHECK(in.img[0].bars[2][0].death == 13);
  }
  {  // identical images: every bar matched
    const int64_t sizes[3] = {5, 4, 6};
    std::mt19937 rng(7);
    std::vector<float> f(120);
    for (auto& x : f) x = static_cast<float>(rng() % 1000) / 1000.0f;
    Instance<3, float> in(sizes, f.data(), f.data(), false);
    for (int w = 0; w < 3; ++w) in.rank(w);
    for (int w = 0; w < 3; ++w) in.own(w, true);
    in.image(0);
    in.image(1);
    in.match();
    for (int k = 0; k < 3; ++k) CHECK(in.matches[k].size() == in.img[0].bars[k].size());
  }
  std::mt19937 rng(1);
  check_column_additions(rng);
  for (int trial = 0; trial < 24; ++trial)
    check_formulations_agree(2 + rng() % 8, 2 + rng() % 8, 2 + rng() % 8, trial % 3, rng);
  check_formulations_agree(14, 13, 12, 0, rng);
  check_formulations_agree(12, 12, 12, 2, rng);
  for (int trial = 0; trial < 40; ++trial)
    check_first_edges_split(1 + rng() % 20, 1 + rng() % 20, trial % 2 ? 3 : 1000000, rng);
  // fast division by the grid constants is exact
  for (u32 d : {1u, 2u, 3u, 7u, 48u, 1000u, 65537u, 4000000000u}) {
    FastDiv fd(d);
    for (u32 n : {0u, 1u, d - 1, d, d + 1, 123456789u, 4294967295u}) CHECK(fd.div(n) == n / d);
  }
  if (failures() == 0) std::printf("test_betti_matching: all checks passed\n");
  return failures();
}
