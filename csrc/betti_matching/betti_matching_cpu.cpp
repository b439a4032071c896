// Betti matching CPU ops: the combinatorial core (betti_matching_core.h) over a batch of images on
// torch's thread pool, and the loss over the matched / unmatched bars with its backward.
#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "betti_matching/betti_matching.h"
#include "betti_matching/betti_matching_core.h"
#include "betti_matching/betti_matching_host.h"
#include "common/common.h"

namespace lossforge {
namespace betti_matching {
namespace {

// Runs task(t) for t in [0, ntasks) on torch's pool, each worker taking the next free task (the
// tasks have very different costs). Exceptions never cross the pool: the first one is kept and
// raised after the loop.
struct TaskError {
  std::mutex mu;
  std::string message;
  void record(const char* what) {
    std::lock_guard<std::mutex> lock(mu);
    if (message.empty()) message = what;
  }
};

template <typename F>
void run_tasks(int64_t ntasks, const char* op, F&& task) {
  if (ntasks <= 0) return;
  TaskError err;
  auto guarded = [&](int64_t t) {
    try {
      task(t);
    } catch (const std::bad_alloc&) {
      err.record("out of memory");
    } catch (const std::exception& e) {
      err.record(e.what());
    } catch (...) {
      err.record("unknown error");
    }
  };
  const int64_t nthreads = std::min<int64_t>(static_cast<int64_t>(torch::stable::get_num_threads()), ntasks);
  if (nthreads <= 1) {
    for (int64_t t = 0; t < ntasks; ++t) guarded(t);
  } else {
    std::atomic<int64_t> next{0};
    torch::stable::parallel_for(0, nthreads, 1, [&](int64_t b, int64_t e) {
      for (int64_t w = b; w < e; ++w) {
        int64_t t;
        while ((t = next.fetch_add(1)) < ntasks) guarded(t);
      }
    });
  }
  STD_TORCH_CHECK(err.message.empty(), op, ": ", err.message);
}

void check_images(const Tensor& x, const char* op, const char* arg) {
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::Double, op, ": ", arg,
                  " must be float32 or float64, got ", dtype_name(x.scalar_type()));
  check_device(x, false, op, arg);
  check_contiguous(x, op, arg);
  STD_TORCH_CHECK(x.dim() == 3 || x.dim() == 4, op, ": ", arg,
                  " must have shape [N, H, W] or [N, D, H, W], got a ", x.dim(), "-d tensor");
  for (int64_t i = 1; i < x.dim(); ++i)
    STD_TORCH_CHECK(x.size(i) >= 1, op, ": ", arg, " has an empty spatial dimension");
  const int64_t V = x.numel() / std::max<int64_t>(x.size(0), 1);
  // cell ids (3 per voxel) must stay below 2^31: the dim-1 reduction tags its entries with the top bit
  STD_TORCH_CHECK(V < (int64_t(1) << 31) / 3, op, ": ", arg, " has too many pixels per image (", V,
                  "; at most ", (int64_t(1) << 31) / 3 - 1, ")");
}

template <typename T>
void check_finite(const T* p, int64_t n, const char* op, const char* arg) {
  std::atomic<int64_t> bad{-1};
  torch::stable::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      if (std::isnan(p[i])) {
        int64_t expected = -1;
        bad.compare_exchange_strong(expected, i);
        return;
      }
  });
  STD_TORCH_CHECK(bad.load() < 0, op, ": ", arg, " contains NaN (at flat index ", bad.load(), ")");
}

// Phases over a batch: with many instances (or one thread) each task runs one whole instance
// (memory stays per thread). With few instances and threads to spare the phases run one after
// another with one task per (instance, image): ranks, own bars (3D: each with its dimension-1
// race), image pairs (3D), matching.
template <int D, typename T>
void run_matching(std::vector<std::unique_ptr<Instance<D, T>>>& inst, const char* op) {
  const int64_t N = static_cast<int64_t>(inst.size());
  const int64_t nthreads = static_cast<int64_t>(torch::stable::get_num_threads());
  if (nthreads <= 1 || N >= 4 * nthreads) {
    run_tasks(N, op, [&](int64_t n) {
      Instance<D, T>& in = *inst[n];
      for (int w = 0; w < 3; ++w) in.rank(w);
      for (int w = 0; w < 3; ++w) in.own(w, true);
      in.own_done();
      in.image(0);
      in.image(1);
      in.match();
    });
    return;
  }
  run_tasks(3 * N, op, [&](int64_t t) { inst[t / 3]->rank(static_cast<int>(t % 3)); });
  // f first: its race is usually the longest, c's next
  run_tasks(3 * N, op, [&](int64_t t) { inst[t / 3]->own(static_cast<int>(t % 3) == 0 ? 0 : 3 - static_cast<int>(t % 3), true); });
  for (auto& in : inst) in->own_done();
  if (D == 3) run_tasks(2 * N, op, [&](int64_t t) { inst[t / 2]->image(static_cast<int>(t % 2)); });
  run_tasks(N, op, [&](int64_t n) { inst[n]->match(); });
}

template <int D, typename T>
std::tuple<Tensor, Tensor> matching_impl(const Tensor& f, const Tensor& g, bool strict, bool include_g_unmatched,
                                         const char* op) {
  const int64_t N = f.size(0);
  int64_t sizes[3];
  for (int i = 0; i < D; ++i) sizes[i] = f.size(i + 1);
  const int64_t V = f.numel() / std::max<int64_t>(N, 1);
  const T* fp = f.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  std::vector<std::unique_ptr<Instance<D, T>>> inst;
  inst.reserve(N);
  for (int64_t n = 0; n < N; ++n) inst.emplace_back(new Instance<D, T>(sizes, fp + n * V, gp + n * V, strict));
  run_matching<D, T>(inst, op);

  Tensor counts = torch::stable::new_empty(f, {N, D, 3}, ScalarType::Long);
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  std::vector<int64_t> offset(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) offset[n + 1] = offset[n] + count_rows(*inst[n], include_g_unmatched, cp + n * D * 3);
  Tensor rows = torch::stable::new_empty(f, {offset[N], 5}, ScalarType::Long);
  int64_t* rp = rows.mutable_data_ptr<int64_t>();
  run_tasks(N, op, [&](int64_t n) {
    write_rows(*inst[n], include_g_unmatched, n, rp + 5 * offset[n]);
    inst[n].reset();
  });
  return {rows, counts};
}

std::tuple<Tensor, Tensor> betti_matching_pairs_cpu(Tensor f, Tensor g, bool strict, bool include_target_unmatched) {
  const char* op = "betti_matching_pairs";
  check_images(f, op, "f");
  check_images(g, op, "g");
  STD_TORCH_CHECK(f.scalar_type() == g.scalar_type(), op, ": f and g must have the same dtype");
  STD_TORCH_CHECK(f.dim() == g.dim(), op, ": f and g must have the same shape");
  for (int64_t i = 0; i < f.dim(); ++i) STD_TORCH_CHECK(f.size(i) == g.size(i), op, ": f and g must have the same shape");
  const int D = static_cast<int>(f.dim()) - 1;
  if (f.scalar_type() == ScalarType::Float) {
    check_finite(f.const_data_ptr<float>(), f.numel(), op, "f");
    check_finite(g.const_data_ptr<float>(), g.numel(), op, "g");
    return D == 2 ? matching_impl<2, float>(f, g, strict, include_target_unmatched, op)
                  : matching_impl<3, float>(f, g, strict, include_target_unmatched, op);
  }
  check_finite(f.const_data_ptr<double>(), f.numel(), op, "f");
  check_finite(g.const_data_ptr<double>(), g.numel(), op, "g");
  return D == 2 ? matching_impl<2, double>(f, g, strict, include_target_unmatched, op)
                : matching_impl<3, double>(f, g, strict, include_target_unmatched, op);
}

// Barcodes: rows [*, 3] = (segment n*D + k, birth voxel, death voxel); death -1 for the essential
// bar.
template <int D, typename T>
std::tuple<Tensor, Tensor> barcode_impl(const Tensor& x, bool include_essential, const char* op) {
  const int64_t N = x.size(0);
  int64_t sizes[3];
  for (int i = 0; i < D; ++i) sizes[i] = x.size(i + 1);
  const int64_t V = x.numel() / std::max<int64_t>(N, 1);
  const T* xp = x.const_data_ptr<T>();
  std::vector<std::unique_ptr<Instance<D, T>>> inst;
  inst.reserve(N);
  for (int64_t n = 0; n < N; ++n) inst.emplace_back(new Instance<D, T>(sizes, xp + n * V, nullptr, false));
  run_tasks(N, op, [&](int64_t n) {
    inst[n]->rank(0);
    inst[n]->own(0, false);
  });
  Tensor counts = torch::stable::new_empty(x, {N, D}, ScalarType::Long);
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  std::vector<int64_t> offset(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    int64_t total = 0;
    for (int k = 0; k < D; ++k) {
      cp[n * D + k] = static_cast<int64_t>(inst[n]->img[0].bars[k].size()) + (k == 0 && include_essential ? 1 : 0);
      total += cp[n * D + k];
    }
    offset[n + 1] = offset[n] + total;
  }
  Tensor rows = torch::stable::new_empty(x, {offset[N], 3}, ScalarType::Long);
  int64_t* rp = rows.mutable_data_ptr<int64_t>();
  run_tasks(N, op, [&](int64_t n) {
    int64_t* r = rp + 3 * offset[n];
    const ImageState<D>& s = inst[n]->img[0];
    for (int k = 0; k < D; ++k) {
      for (const u32 i : bar_order(s, k)) {
        r[0] = n * D + k;
        r[1] = s.bars[k][i].birth;
        r[2] = s.bars[k][i].death;
        r += 3;
      }
      if (k == 0 && include_essential) {
        r[0] = n * D;
        r[1] = s.rk.elder;
        r[2] = -1;
        r += 3;
      }
    }
    inst[n].reset();
  });
  return {rows, counts};
}

std::tuple<Tensor, Tensor> persistence_pairs_cpu(Tensor x, bool include_essential) {
  const char* op = "persistence_pairs";
  check_images(x, op, "x");
  const int D = static_cast<int>(x.dim()) - 1;
  if (x.scalar_type() == ScalarType::Float) {
    check_finite(x.const_data_ptr<float>(), x.numel(), op, "x");
    return D == 2 ? barcode_impl<2, float>(x, include_essential, op) : barcode_impl<3, float>(x, include_essential, op);
  }
  check_finite(x.const_data_ptr<double>(), x.numel(), op, "x");
  return D == 2 ? barcode_impl<2, double>(x, include_essential, op) : barcode_impl<3, double>(x, include_essential, op);
}

// ---- loss over the rows -------------------------------------------------------------------------

// Rows of instance n are contiguous (the core writes them instance by instance): [start[n], start[n+1]).
std::vector<int64_t> instance_starts(const int64_t* rows, const LossArgs& a, const char* op) {
  std::vector<int64_t> start(a.N + 1, a.P);
  const int64_t per = 3 * a.D;
  int64_t prev = -1;
  for (int64_t p = 0; p < a.P; ++p) {
    const int64_t seg = rows[5 * p];
    STD_TORCH_CHECK(seg >= 0 && seg < a.N * per, op, ": row ", p, " has segment ", seg, ", outside [0, ", a.N * per, ")");
    const int64_t n = seg / per;
    STD_TORCH_CHECK(n >= prev, op, ": rows must be grouped by instance (as betti_matching_pairs writes them)");
    for (int64_t q = prev + 1; q <= n; ++q) start[q] = p;
    prev = n;
    const int64_t kind = seg % 3;
    for (int c = 1; c <= 4; ++c) {
      const int64_t i = rows[5 * p + c];
      const bool used = kind == 0 || (kind == 1 && c <= 2) || (kind == 2 && c >= 3);
      STD_TORCH_CHECK(!used || (i >= 0 && i < a.V), op, ": row ", p, " indexes pixel ", i, ", outside [0, ", a.V, ")");
    }
  }
  for (int64_t q = prev + 1; q <= a.N; ++q) start[q] = a.P;
  return start;
}

Tensor betti_matching_loss_rows_cpu(Tensor pred, Tensor target, Tensor rows, Tensor weights) {
  const char* op = "betti_matching_loss_rows";
  const LossArgs a = check_loss_args(pred, target, rows, weights, false, op);
  Tensor loss = torch::stable::new_empty(pred, {a.N}, pred.scalar_type());
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  const std::vector<int64_t> start = instance_starts(rp, a, op);
  const double* w = weights.const_data_ptr<double>();
  LF_DISPATCH_FLOAT_DOUBLE(pred.scalar_type(), op, [&] {
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, a.N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        double acc = 0;
        for (int64_t r = start[n]; r < start[n + 1]; ++r)
          acc += row_loss<double>(rp + 5 * r, p + n * a.V, t + n * a.V, w, a.D);
        out[n] = static_cast<scalar_t>(acc);
      }
    });
  });
  return loss;
}

Tensor betti_matching_loss_rows_backward_cpu(Tensor grad, Tensor pred, Tensor target, Tensor rows, Tensor weights) {
  const char* op = "betti_matching_loss_rows_backward";
  const LossArgs a = check_loss_args(pred, target, rows, weights, false, op);
  check_loss_grad(grad, pred, a, op);
  Tensor gp = torch::stable::new_zeros(pred, {a.N, a.V});
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  const std::vector<int64_t> start = instance_starts(rp, a, op);
  const double* w = weights.const_data_ptr<double>();
  LF_DISPATCH_FLOAT_DOUBLE(pred.scalar_type(), op, [&] {
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* out = gp.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, a.N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const double gn = static_cast<double>(g[n]);
        scalar_t* o = out + n * a.V;
        for (int64_t r = start[n]; r < start[n + 1]; ++r) {
          double d0, d1;
          const int64_t* row = rp + 5 * r;
          if (row_grad<double>(row, p + n * a.V, t + n * a.V, w, a.D, d0, d1)) {
            o[row[1]] += static_cast<scalar_t>(gn * d0);
            o[row[2]] += static_cast<scalar_t>(gn * d1);
          }
        }
      }
    });
  });
  return gp;
}

}  // namespace
}  // namespace betti_matching
}  // namespace lossforge

STABLE_TORCH_LIBRARY_IMPL(lossforge, CPU, m) {
  using namespace lossforge::betti_matching;
  m.impl("betti_matching_pairs", TORCH_BOX(&betti_matching_pairs_cpu));
  m.impl("persistence_pairs", TORCH_BOX(&persistence_pairs_cpu));
  m.impl("betti_matching_loss_rows", TORCH_BOX(&betti_matching_loss_rows_cpu));
  m.impl("betti_matching_loss_rows_backward", TORCH_BOX(&betti_matching_loss_rows_backward_cpu));
}
