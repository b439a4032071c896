// PamC CPU kernels (spec: shared/specs/pamc.md; math in pamc.h).
//
// - pamc_build_csr: stable counting sort of an edge list into CSR (by source row) and its transpose
//   (CSC: by target column, entries pointing back at CSR positions). O(E + n), validates every index.
// - pamc_positive(_backward): the positive term, a CSR row walk with an online log-sum-exp per row; the
//   backward stores one scalar per edge (c_e) on a first walk over the rows, then walks the transposed
//   edge list so that every output row is written by one task (no atomics, deterministic).
// - pamc_segment_sum: meta-nodes m_a = sum_{i: y_i = a} z_i (rows grouped by a counting sort, each
//   cluster summed in row order by one task: the same bits for any thread count).
// - pairwise_contrastive(_backward): Graph-MLP's exact all-pairs loss, tiled flash-attention style:
//   blocks of rows x blocks of columns through torch's GEMM into one reused tile buffer, an online
//   log-sum-exp per row in the forward, and in the backward the gradient of each row block gathered from
//   both sides of the symmetric similarity, so no n x n buffer exists and no two tasks write one row.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <string>
#include <type_traits>
#include <vector>

#include "common/common.h"
#include "pamc/pamc.h"
#include "pamc/pamc_mm.h"

namespace lossforge {
namespace pamc {
namespace {

// The first offending position seen inside a parallel loop; raised after the loop (throwing inside
// torch's pool would cross the stable C ABI).
struct FirstBad {
  std::atomic<int64_t> at{-1};
  void record(int64_t i) {
    int64_t expected = -1;
    at.compare_exchange_strong(expected, i);
  }
  int64_t get() const { return at.load(); }
};

// Dot product with 8 independent partial sums: the compiler vectorises it without -ffast-math.
template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= d; k += 8)
    for (int q = 0; q < 8; ++q) acc[q] += a[k + q] * b[k + q];
  T s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; k < d; ++k) s += a[k] * b[k];
  return s;
}

template <typename T>
inline void axpy(T c, const T* x, T* y, int64_t d) {
  for (int64_t k = 0; k < d; ++k) y[k] += c * x[k];
}

// Rows per task so that one task does a few thousand multiply-adds at least.
int64_t row_grain(int64_t work_per_row) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(work_per_row, 1)); }

// ---- argument checks (Python validates first with friendlier errors) --------------------------------

void check_z(const Tensor& z, const char* op) {
  check_device(z, false, op, "z");
  STD_TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D [num_nodes, dim], got ", z.dim(), "-D");
  STD_TORCH_CHECK(z.scalar_type() == ScalarType::Float || z.scalar_type() == ScalarType::Double, op,
                  ": z must be float32 or float64, got ", dtype_name(z.scalar_type()));
  check_contiguous(z, op, "z");
}

void check_index(const Tensor& t, int64_t size, const char* op, const char* arg) {
  check_device(t, false, op, arg);
  check_dtype(t, ScalarType::Long, op, arg);
  check_contiguous(t, op, arg);
  STD_TORCH_CHECK(t.dim() == 1, op, ": ", arg, " must be 1-D");
  if (size >= 0) STD_TORCH_CHECK(t.size(0) == size, op, ": ", arg, " must have ", size, " entries, got ", t.size(0));
}

// Offsets [n + 1] of a compressed layout over `nnz` entries: starts at 0, ends at nnz, never decreases.
void check_offsets(const Tensor& ptr, int64_t n, int64_t nnz, const char* op, const char* arg) {
  check_index(ptr, n + 1, op, arg);
  const int64_t* p = ptr.const_data_ptr<int64_t>();
  STD_TORCH_CHECK(p[0] == 0 && p[n] == nnz, op, ": ", arg, " must start at 0 and end at the number of edges (",
                  nnz, "), got ", p[0], " and ", p[n]);
  for (int64_t i = 0; i < n; ++i)
    STD_TORCH_CHECK(p[i] <= p[i + 1], op, ": ", arg, " must be non-decreasing (entry ", i, ")");
}

struct Csr {
  const int64_t* rowptr;
  const int64_t* col;
  int64_t nnz;
};

template <typename T>
Csr check_csr(const Tensor& z, const Tensor& rowptr, const Tensor& col, const Tensor& weight, const char* op) {
  const int64_t n = z.size(0);
  check_index(col, -1, op, "col");
  const int64_t nnz = col.size(0);
  check_offsets(rowptr, n, nnz, op, "rowptr");
  check_device(weight, false, op, "weight");
  check_dtype(weight, z.scalar_type(), op, "weight");
  check_contiguous(weight, op, "weight");
  STD_TORCH_CHECK(weight.dim() == 1 && weight.size(0) == nnz, op, ": weight must have one entry per edge (",
                  nnz, ")");
  return Csr{rowptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), nnz};
}

struct Csc {
  const int64_t* colptr;
  const int64_t* row;
  const int64_t* edge;
};

Csc check_csc(const Tensor& colptr, const Tensor& trow, const Tensor& tedge, int64_t n, int64_t nnz,
              const char* op) {
  check_offsets(colptr, n, nnz, op, "colptr");
  check_index(trow, nnz, op, "trow");
  check_index(tedge, nnz, op, "tedge");
  return Csc{colptr.const_data_ptr<int64_t>(), trow.const_data_ptr<int64_t>(), tedge.const_data_ptr<int64_t>()};
}

void raise_bad_col(const FirstBad& bad, const int64_t* col, int64_t n, const char* op) {
  const int64_t p = bad.get();
  if (p < 0) return;
  STD_TORCH_CHECK(false, op, ": edge ", p, " points at node ", col[p], ", out of range for ", n, " nodes");
}

template <typename T>
void raise_bad_weight(const FirstBad& bad, const T* w, const char* op) {
  const int64_t p = bad.get();
  if (p < 0) return;
  STD_TORCH_CHECK(false, op, ": edge weights must be non-negative, got ", static_cast<double>(w[p]), " at edge ", p);
}

// ---- shared pieces ------------------------------------------------------------------------------------

// u = z / max(|z|, eps) row by row; inv = 1 / max(|z|, eps). A row was clamped iff inv == 1 / eps.
template <typename T>
void normalize_rows(const T* z, T* u, T* inv, int64_t n, int64_t d) {
  torch::stable::parallel_for(0, n, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* zi = z + i * d;
      T* ui = u + i * d;
      const T nrm = std::sqrt(dot(zi, zi, d));
      const T iv = T(1) / std::max(nrm, T(kNormEps));
      inv[i] = iv;
      for (int64_t k = 0; k < d; ++k) ui[k] = zi[k] * iv;
    }
  });
}

// lse_i = log(sum_{p in row i} w_p exp(x_p) + eps): the CSR row walk with an online log-sum-exp.
template <typename T>
void positive_forward(const T* u, int64_t n, int64_t d, Csr g, const T* w, double tau, double eps, T* lse,
                      FirstBad& bad_col, FirstBad& bad_w) {
  const int64_t avg = g.nnz / std::max<int64_t>(n, 1) + 1;
  torch::stable::parallel_for(0, n, row_grain(avg * d), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* ui = u + i * d;
      OnlineLSE s;
      s.init();
      for (int64_t p = g.rowptr[i]; p < g.rowptr[i + 1]; ++p) {
        const int64_t j = g.col[p];
        const T wp = w[p];
        if (j < 0 || j >= n) {
          bad_col.record(p);
          continue;
        }
        if (!(wp >= T(0))) {  // negative or NaN
          bad_w.record(p);
          continue;
        }
        if (wp == T(0)) continue;
        const double x = j == i ? 0.0 : tau * static_cast<double>(dot(ui, u + j * d, d));
        s.add(x, static_cast<double>(wp));
      }
      lse[i] = static_cast<T>(log_plus_eps(s.value(), eps));
    }
  });
}

// Backward, pass 1 (rows): c_p = g_i tau w_p exp(x_p - lse_i) for every edge of row i (0 for self-loops,
// whose similarity is a constant), and gu_i = sum_p c_p u_j (+= when `accumulate`).
template <typename T>
void positive_backward_rows(const T* u, int64_t n, int64_t d, Csr g, const T* w, const T* grad, const T* lse,
                            double tau, T* c, T* gu, bool accumulate) {
  const int64_t avg = g.nnz / std::max<int64_t>(n, 1) + 1;
  torch::stable::parallel_for(0, n, row_grain(2 * avg * d), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* ui = u + i * d;
      T* gi = gu + i * d;
      if (!accumulate) std::fill(gi, gi + d, T(0));
      const double gscale = static_cast<double>(grad[i]) * tau;
      const double li = static_cast<double>(lse[i]);
      const bool live = gscale != 0.0 && li != -INFINITY;
      for (int64_t p = g.rowptr[i]; p < g.rowptr[i + 1]; ++p) {
        const int64_t j = g.col[p];
        const T wp = w[p];
        if (!live || j == i || !(wp > T(0)) || j < 0 || j >= n) {
          c[p] = T(0);
          continue;
        }
        const T* uj = u + j * d;
        const double x = tau * static_cast<double>(dot(ui, uj, d));
        const T cp = static_cast<T>(gscale * static_cast<double>(wp) * std::exp(x - li));
        c[p] = cp;
        axpy(cp, uj, gi, d);
      }
    }
  });
}

// Backward, pass 2 (columns, over the transposed edge list): gu_j += sum_{edges (i, j)} c_p u_i, then the
// normalisation's Jacobian: gz_j = inv_j (gu_j - (gu_j . u_j) u_j), or inv_j gu_j for a clamped row.
// gz may be gu itself (row j is finished before it is overwritten, and only u is read across rows).
template <typename T>
void positive_backward_cols(const T* u, const T* inv, int64_t n, int64_t d, Csc t, int64_t nnz, const T* c, T* gu,
                            T* gz, FirstBad& bad) {
  const int64_t avg = nnz / std::max<int64_t>(n, 1) + 1;
  const T clamped = T(1) / T(kNormEps);
  torch::stable::parallel_for(0, n, row_grain((avg + 2) * d), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      T* gj = gu + j * d;
      for (int64_t q = t.colptr[j]; q < t.colptr[j + 1]; ++q) {
        const int64_t p = t.edge[q], i = t.row[q];
        if (p < 0 || p >= nnz || i < 0 || i >= n) {
          bad.record(q);
          continue;
        }
        const T cp = c[p];
        if (cp != T(0)) axpy(cp, u + i * d, gj, d);
      }
      const T* uj = u + j * d;
      const T iv = inv[j];
      const T proj = iv < clamped ? dot(gj, uj, d) : T(0);
      T* o = gz + j * d;
      for (int64_t k = 0; k < d; ++k) o[k] = iv * (gj[k] - proj * uj[k]);
    }
  });
}

// ---- ops ------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> pamc_build_csr_cpu(Tensor row, Tensor col,
                                                                             int64_t num_nodes) {
  const char* op = "pamc_build_csr";
  check_index(row, -1, op, "row");
  check_index(col, row.size(0), op, "col");
  STD_TORCH_CHECK(num_nodes >= 0, op, ": num_nodes must be non-negative, got ", num_nodes);
  const int64_t n = num_nodes, E = row.size(0);
  const int64_t* r = row.const_data_ptr<int64_t>();
  const int64_t* c = col.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    STD_TORCH_CHECK(r[e] >= 0 && r[e] < n, op, ": edge ", e, " has source node ", r[e], ", out of range for ", n,
                    " nodes");
    STD_TORCH_CHECK(c[e] >= 0 && c[e] < n, op, ": edge ", e, " has target node ", c[e], ", out of range for ", n,
                    " nodes");
  }
  Tensor rowptr = torch::stable::new_empty(row, {n + 1});
  Tensor col_sorted = torch::stable::new_empty(row, {E});
  Tensor perm = torch::stable::new_empty(row, {E});
  Tensor colptr = torch::stable::new_empty(row, {n + 1});
  Tensor trow = torch::stable::new_empty(row, {E});
  Tensor tedge = torch::stable::new_empty(row, {E});
  int64_t* rp = rowptr.mutable_data_ptr<int64_t>();
  int64_t* cs = col_sorted.mutable_data_ptr<int64_t>();
  int64_t* pm = perm.mutable_data_ptr<int64_t>();
  int64_t* cp = colptr.mutable_data_ptr<int64_t>();
  int64_t* tr = trow.mutable_data_ptr<int64_t>();
  int64_t* te = tedge.mutable_data_ptr<int64_t>();
  std::vector<int64_t> cursor(n + 1);
  // CSR by source row (stable: edges of one row keep their input order).
  std::fill(rp, rp + n + 1, 0);
  for (int64_t e = 0; e < E; ++e) ++rp[r[e] + 1];
  for (int64_t i = 0; i < n; ++i) rp[i + 1] += rp[i];
  std::copy(rp, rp + n, cursor.begin());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t p = cursor[r[e]]++;
    pm[p] = e;
    cs[p] = c[e];
  }
  // Transpose (stable in CSR order): entry q of column j is CSR position te[q], from row tr[q].
  std::fill(cp, cp + n + 1, 0);
  for (int64_t p = 0; p < E; ++p) ++cp[cs[p] + 1];
  for (int64_t j = 0; j < n; ++j) cp[j + 1] += cp[j];
  std::copy(cp, cp + n, cursor.begin());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = rp[i]; p < rp[i + 1]; ++p) {
      const int64_t q = cursor[cs[p]]++;
      te[q] = p;
      tr[q] = i;
    }
  }
  return {rowptr, col_sorted, perm, colptr, trow, tedge};
}

std::tuple<Tensor, Tensor, Tensor> pamc_positive_cpu(Tensor z, Tensor rowptr, Tensor col, Tensor weight,
                                                     Tensor colptr, Tensor trow, Tensor tedge, double tau,
                                                     double eps) {
  const char* op = "pamc_positive";
  check_z(z, op);
  STD_TORCH_CHECK(std::isfinite(tau), op, ": tau must be finite, got ", tau);
  STD_TORCH_CHECK(eps >= 0.0, op, ": eps must be non-negative, got ", eps);
  const int64_t n = z.size(0), d = z.size(1);
  Tensor lse = torch::stable::new_empty(z, {n});
  Tensor u = torch::stable::empty_like(z);
  Tensor inv = torch::stable::new_empty(z, {n});
  if (n == 0) return {lse, u, inv};
  LF_DISPATCH_FLOAT_DOUBLE(z.scalar_type(), op, [&] {
    const Csr g = check_csr<scalar_t>(z, rowptr, col, weight, op);
    check_csc(colptr, trow, tedge, n, g.nnz, op);
    normalize_rows(z.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(), inv.mutable_data_ptr<scalar_t>(),
                   n, d);
    FirstBad bad_col, bad_w;
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    positive_forward(u.const_data_ptr<scalar_t>(), n, d, g, w, tau, eps, lse.mutable_data_ptr<scalar_t>(), bad_col,
                     bad_w);
    raise_bad_col(bad_col, g.col, n, op);
    raise_bad_weight(bad_w, w, op);
  });
  return {lse, u, inv};
}

Tensor pamc_positive_backward_cpu(Tensor grad, Tensor u, Tensor inv, Tensor rowptr, Tensor col, Tensor weight,
                                  Tensor colptr, Tensor trow, Tensor tedge, Tensor lse, double tau) {
  const char* op = "pamc_positive_backward";
  check_z(u, op);
  const int64_t n = u.size(0), d = u.size(1);
  for (const Tensor* t : {&grad, &inv, &lse}) {
    const char* name = t == &grad ? "grad" : t == &inv ? "inv" : "lse";
    check_device(*t, false, op, name);
    check_dtype(*t, u.scalar_type(), op, name);
    check_contiguous(*t, op, name);
    STD_TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", name, " must have shape [", n, "]");
  }
  Tensor gz = torch::stable::empty_like(u);
  if (n == 0) return gz;
  LF_DISPATCH_FLOAT_DOUBLE(u.scalar_type(), op, [&] {
    const Csr g = check_csr<scalar_t>(u, rowptr, col, weight, op);
    const Csc t = check_csc(colptr, trow, tedge, n, g.nnz, op);
    std::vector<scalar_t> c(std::max<int64_t>(g.nnz, 1));
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* gzp = gz.mutable_data_ptr<scalar_t>();
    positive_backward_rows(up, n, d, g, weight.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                           lse.const_data_ptr<scalar_t>(), tau, c.data(), gzp, false);
    FirstBad bad;
    positive_backward_cols(up, inv.const_data_ptr<scalar_t>(), n, d, t, g.nnz, c.data(), gzp, gzp, bad);
    STD_TORCH_CHECK(bad.get() < 0, op, ": transposed edge list entry ", bad.get(), " is out of range");
  });
  return gz;
}

std::tuple<Tensor, Tensor> pamc_segment_sum_cpu(Tensor z, Tensor labels, int64_t num_segments) {
  const char* op = "pamc_segment_sum";
  check_z(z, op);
  const int64_t n = z.size(0), d = z.size(1), k = num_segments;
  check_index(labels, n, op, "labels");
  STD_TORCH_CHECK(k >= 0, op, ": num_segments must be non-negative, got ", k);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    STD_TORCH_CHECK(y[i] >= 0 && y[i] < k, op, ": label ", y[i], " of node ", i, " is out of range [0, ", k, ")");
  Tensor sums = torch::stable::new_zeros(z, {k, d});
  Tensor counts = torch::stable::new_zeros(labels, {k});
  if (n == 0 || k == 0) return {sums, counts};
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) ++cnt[y[i]];
  // Rows grouped by label (counting sort), then one task per cluster sums its rows in row order.
  std::vector<int64_t> start(k + 1, 0), order(n);
  for (int64_t a = 0; a < k; ++a) start[a + 1] = start[a] + cnt[a];
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i) order[cursor[y[i]]++] = i;
  LF_DISPATCH_FLOAT_DOUBLE(z.scalar_type(), op, [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* sp = sums.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, k, 1, [&](int64_t b, int64_t e) {
      for (int64_t a = b; a < e; ++a)
        for (int64_t q = start[a]; q < start[a + 1]; ++q) axpy(scalar_t(1), zp + order[q] * d, sp + a * d, d);
    });
  });
  return {sums, counts};
}

// ---- tiled exact pairwise (Graph-MLP Ncontrast) --------------------------------------------------------
//
// One parallel region over blocks of rows; each task runs its own (single-threaded, nested) GEMMs into a
// tile buffer of its own, so the whole loss costs one fork-join instead of several per tile. Errors
// inside the region (an allocation or GEMM failure) are recorded and raised after it.

struct Tiles {
  int64_t rows, cols;
};

Tiles check_tiles(int64_t block_rows, int64_t block_cols, int64_t n, const char* op) {
  STD_TORCH_CHECK(block_rows > 0 && block_cols > 0, op, ": block_rows and block_cols must be positive, got ",
                  block_rows, " and ", block_cols);
  return Tiles{std::min(block_rows, std::max<int64_t>(n, 1)), std::min(block_cols, std::max<int64_t>(n, 1))};
}

// Per-task scratch: a [rows * cols] similarity tile and a [rows, d] product, handed out to at most
// get_num_threads() concurrent tasks.
class TilePool {
 public:
  TilePool(const Tensor& like, Tiles tl, int64_t d) {
    const int64_t k = std::max<int64_t>(1, torch::stable::get_num_threads());
    for (int64_t i = 0; i < k; ++i) {
      tiles_.push_back(torch::stable::new_empty(like, {tl.rows * tl.cols}));
      outs_.push_back(torch::stable::new_empty(like, {tl.rows, std::max<int64_t>(d, 1)}));
    }
    busy_ = std::vector<std::atomic<bool>>(k);
    for (auto& b : busy_) b.store(false);
  }
  int64_t acquire() {
    for (;;)
      for (size_t i = 0; i < busy_.size(); ++i) {
        bool expected = false;
        if (busy_[i].compare_exchange_strong(expected, true)) return static_cast<int64_t>(i);
      }
  }
  void release(int64_t i) { busy_[i].store(false); }
  // The [rows, cols] contiguous view at the front of tile i.
  Tensor tile(int64_t i, int64_t rows, int64_t cols) {
    return torch::stable::view(torch::stable::narrow(tiles_[i], 0, 0, rows * cols), {rows, cols});
  }
  Tensor out(int64_t i, int64_t rows) { return torch::stable::narrow(outs_[i], 0, 0, rows); }

 private:
  std::vector<Tensor> tiles_, outs_;
  std::vector<std::atomic<bool>> busy_;
};

// Runs body(task_slot, row_block) for every block of rows, in one parallel region.
struct RegionError {
  std::atomic<bool> failed{false};
  std::string message;
  void record(const char* what) {
    bool expected = false;
    if (failed.compare_exchange_strong(expected, true)) message = what;
  }
};

template <typename F>
void for_row_blocks(int64_t n, Tiles tl, TilePool& pool, const char* op, F&& body) {
  const int64_t blocks = (n + tl.rows - 1) / tl.rows;
  RegionError err;
  torch::stable::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t slot = pool.acquire();
    try {
      for (int64_t b = b0; b < b1 && !err.failed.load(); ++b) body(slot, b * tl.rows, std::min(tl.rows, n - b * tl.rows));
    } catch (const std::exception& e) {
      err.record(e.what());
    } catch (...) {
      err.record("unknown error");
    }
    pool.release(slot);
  });
  STD_TORCH_CHECK(!err.failed.load(), op, ": ", err.message);
}

// Below this |tau| a fixed shift of |tau| keeps every e^{tau s - |tau|} >= e^{-2|tau|} a normal float, so
// the row sums need no running maximum; above it the tile's maximum is the shift.
constexpr double kFixedShiftTau = 40.0;

// log N_i = log sum_j exp(tau s_ij) with s_ii = 0.
template <typename T>
void pairwise_lse_forward(Tensor& u, int64_t n, double tau, Tiles tl, T* logn, const char* op) {
  TilePool pool(u, tl, 0);
  const T tt = static_cast<T>(tau);
  const bool fixed = std::fabs(tau) <= kFixedShiftTau;
  for_row_blocks(n, tl, pool, op, [&](int64_t slot, int64_t r0, int64_t rr) {
    Tensor ur = torch::stable::narrow(u, 0, r0, rr);
    std::vector<OnlineLSE> st(rr);
    for (auto& s : st) s.init();
    for (int64_t c0 = 0; c0 < n; c0 += tl.cols) {
      const int64_t cc = std::min(tl.cols, n - c0);
      Tensor s = pool.tile(slot, rr, cc);
      mm_out(ur, torch::stable::transpose(torch::stable::narrow(u, 0, c0, cc), 0, 1), s);
      T* sp = s.mutable_data_ptr<T>();
      for (int64_t r = 0; r < rr; ++r) {
        const int64_t i = r0 + r;
        T* srow = sp + r * cc;
        if (i >= c0 && i < c0 + cc) srow[i - c0] = T(0);  // the masked self-similarity
        T mx = std::fabs(tt);
        if (!fixed) {
          T lo = srow[0], hi = srow[0];
          for (int64_t c = 1; c < cc; ++c) {
            lo = std::min(lo, srow[c]);
            hi = std::max(hi, srow[c]);
          }
          mx = tt >= T(0) ? tt * hi : tt * lo;
        }
        T l = 0;
        for (int64_t c = 0; c < cc; ++c) l += std::exp(tt * srow[c] - mx);
        st[r].merge(static_cast<double>(mx), static_cast<double>(l));
      }
    }
    for (int64_t r = 0; r < rr; ++r) logn[r0 + r] = static_cast<T>(st[r].value());
  });
}

// Below this |tau| (with log n added) the backward's per-row factors e^{+-L/2} stay finite in T.
template <typename T>
bool one_exp_backward(double tau, int64_t n) {
  const double limit = std::is_same<T, float>::value ? 150.0 : 1300.0;
  return std::fabs(tau) + std::log(static_cast<double>(n) + 1.0) < limit;
}

// gu_i += tau sum_{j != i} [alpha_i exp(tau s_ij - L_i) + alpha_j exp(tau s_ij - L_j)] u_j, L = log N: the
// gradient of sum_i alpha_i log N_i, both sides of the symmetric s gathered per block of rows. With
// h = e^{L/2} and beta = alpha / h, the bracket is e^{tau s_ij - L_i/2 - L_j/2} (beta_i h_j + beta_j h_i):
// one exp per pair (e^{tau s - L} <= 1 since N includes that term, and L >= 0 since N includes e^0).
template <typename T>
void pairwise_lse_backward(Tensor& u, int64_t n, int64_t d, double tau, Tiles tl, const T* alpha, const T* logn,
                           T* gu, const char* op) {
  TilePool pool(u, tl, d);
  const T tt = static_cast<T>(tau);
  const bool one_exp = one_exp_backward<T>(tau, n);
  std::vector<T> half(n), h(n), beta(n);
  for (int64_t i = 0; i < n; ++i) {
    half[i] = logn[i] / T(2);
    h[i] = std::exp(half[i]);
    beta[i] = alpha[i] / h[i];
  }
  for_row_blocks(n, tl, pool, op, [&](int64_t slot, int64_t r0, int64_t rr) {
    Tensor ur = torch::stable::narrow(u, 0, r0, rr);
    Tensor out = pool.out(slot, rr);
    for (int64_t c0 = 0; c0 < n; c0 += tl.cols) {
      const int64_t cc = std::min(tl.cols, n - c0);
      Tensor uc = torch::stable::narrow(u, 0, c0, cc);
      Tensor s = pool.tile(slot, rr, cc);
      mm_out(ur, torch::stable::transpose(uc, 0, 1), s);
      T* sp = s.mutable_data_ptr<T>();
      for (int64_t r = 0; r < rr; ++r) {
        const int64_t i = r0 + r;
        T* srow = sp + r * cc;
        if (one_exp) {
          const T hi = half[i], bi = beta[i], ei = h[i];
          const T *hj = half.data() + c0, *bj = beta.data() + c0, *ej = h.data() + c0;
          for (int64_t c = 0; c < cc; ++c)
            srow[c] = tt * std::exp(tt * srow[c] - hi - hj[c]) * (bi * ej[c] + bj[c] * ei);
        } else {
          const T ai = alpha[i], li = logn[i];
          const T *aj = alpha + c0, *lj = logn + c0;
          for (int64_t c = 0; c < cc; ++c) {
            const T x = tt * srow[c];
            srow[c] = tt * (ai * std::exp(x - li) + aj[c] * std::exp(x - lj[c]));
          }
        }
        if (i >= c0 && i < c0 + cc) srow[i - c0] = T(0);  // s_ii is a constant
      }
      mm_out(s, uc, out);
      const T* op_ = out.const_data_ptr<T>();
      for (int64_t r = 0; r < rr; ++r) axpy(T(1), op_ + r * d, gu + (r0 + r) * d, d);
    }
  });
}

std::tuple<Tensor, Tensor> pairwise_contrastive_cpu(Tensor z, Tensor rowptr, Tensor col, Tensor weight,
                                                    Tensor colptr, Tensor trow, Tensor tedge, double tau,
                                                    int64_t block_rows, int64_t block_cols) {
  const char* op = "pairwise_contrastive";
  check_z(z, op);
  STD_TORCH_CHECK(std::isfinite(tau), op, ": tau must be finite, got ", tau);
  const int64_t n = z.size(0), d = z.size(1);
  const Tiles tl = check_tiles(block_rows, block_cols, n, op);
  Tensor loss = torch::stable::new_empty(z, {n});
  Tensor stats = torch::stable::new_empty(z, {n, 2});
  if (n == 0) return {loss, stats};
  LF_DISPATCH_FLOAT_DOUBLE(z.scalar_type(), op, [&] {
    const Csr g = check_csr<scalar_t>(z, rowptr, col, weight, op);
    check_csc(colptr, trow, tedge, n, g.nnz, op);
    Tensor u = torch::stable::empty_like(z);
    std::vector<scalar_t> inv(n), logp(n), logn(n);
    normalize_rows(z.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(), inv.data(), n, d);
    FirstBad bad_col, bad_w;
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    positive_forward(u.const_data_ptr<scalar_t>(), n, d, g, w, tau, 0.0, logp.data(), bad_col, bad_w);
    raise_bad_col(bad_col, g.col, n, op);
    raise_bad_weight(bad_w, w, op);
    pairwise_lse_forward(u, n, tau, tl, logn.data(), op);
    scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
    scalar_t* sp = stats.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      lp[i] = static_cast<scalar_t>(pairwise_row_loss(logp[i], logn[i]));
      sp[2 * i] = logp[i];
      sp[2 * i + 1] = logn[i];
    }
  });
  return {loss, stats};
}

Tensor pairwise_contrastive_backward_cpu(Tensor grad, Tensor z, Tensor rowptr, Tensor col, Tensor weight,
                                         Tensor colptr, Tensor trow, Tensor tedge, Tensor stats, double tau,
                                         int64_t block_rows, int64_t block_cols) {
  const char* op = "pairwise_contrastive_backward";
  check_z(z, op);
  const int64_t n = z.size(0), d = z.size(1);
  const Tiles tl = check_tiles(block_rows, block_cols, n, op);
  check_device(grad, false, op, "grad");
  check_dtype(grad, z.scalar_type(), op, "grad");
  check_contiguous(grad, op, "grad");
  STD_TORCH_CHECK(grad.dim() == 1 && grad.size(0) == n, op, ": grad must have shape [", n, "]");
  check_device(stats, false, op, "stats");
  check_dtype(stats, z.scalar_type(), op, "stats");
  check_contiguous(stats, op, "stats");
  STD_TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == 2, op, ": stats must have shape [", n,
                  ", 2]");
  Tensor gz = torch::stable::new_zeros(z, {n, d});  // accumulates gu, then becomes gz in place
  if (n == 0) return gz;
  LF_DISPATCH_FLOAT_DOUBLE(z.scalar_type(), op, [&] {
    const Csr g = check_csr<scalar_t>(z, rowptr, col, weight, op);
    const Csc t = check_csc(colptr, trow, tedge, n, g.nnz, op);
    Tensor u = torch::stable::empty_like(z);
    std::vector<scalar_t> inv(n), alpha(n), gamma(n), logp(n), logn(n);
    normalize_rows(z.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(), inv.data(), n, d);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* sp = stats.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      logp[i] = sp[2 * i];
      logn[i] = sp[2 * i + 1];
      const double a = pairwise_row_weight(logp[i], logn[i]);
      alpha[i] = static_cast<scalar_t>(static_cast<double>(gp[i]) * a);  // d loss_i / d log N_i
      gamma[i] = -alpha[i];                                              // d loss_i / d log P_i
    }
    scalar_t* gup = gz.mutable_data_ptr<scalar_t>();
    if (d > 0) pairwise_lse_backward(u, n, d, tau, tl, alpha.data(), logn.data(), gup, op);
    std::vector<scalar_t> c(std::max<int64_t>(g.nnz, 1));
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    positive_backward_rows(up, n, d, g, weight.const_data_ptr<scalar_t>(), gamma.data(), logp.data(), tau, c.data(),
                           gup, true);
    FirstBad bad;
    positive_backward_cols(up, inv.data(), n, d, t, g.nnz, c.data(), gup, gup, bad);
    STD_TORCH_CHECK(bad.get() < 0, op, ": transposed edge list entry ", bad.get(), " is out of range");
  });
  return gz;
}

}  // namespace
}  // namespace pamc
}  // namespace lossforge

STABLE_TORCH_LIBRARY_IMPL(lossforge, CPU, m) {
  using namespace lossforge::pamc;
  m.impl("pamc_build_csr", TORCH_BOX(&pamc_build_csr_cpu));
  m.impl("pamc_positive", TORCH_BOX(&pamc_positive_cpu));
  m.impl("pamc_positive_backward", TORCH_BOX(&pamc_positive_backward_cpu));
  m.impl("pamc_segment_sum", TORCH_BOX(&pamc_segment_sum_cpu));
  m.impl("pairwise_contrastive", TORCH_BOX(&pairwise_contrastive_cpu));
  m.impl("pairwise_contrastive_backward", TORCH_BOX(&pairwise_contrastive_backward_cpu));
}
