// Every lossforge op schema, in one place: this file is the whole C++ surface.
// Kernels register their CPU implementations in csrc/<family>/<family>_cpu.cpp and their CUDA
// implementations in csrc/<family>/<family>_cuda.cu; autograd and fake (meta) registrations live in
// python/lossforge/<family>.py. Backward kernels are ops of their own (<op>_backward).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(lossforge, m) {
  // ---- StableMax (csrc/stablemax) -------------------------------------------------------------
  // x contiguous; the class dimension `dim`; log=true gives log_stablemax.
  m.def("stablemax(Tensor x, int dim, bool log) -> Tensor");
  m.def("stablemax_backward(Tensor grad, Tensor x, Tensor out, int dim, bool log) -> Tensor");
  // Per-row loss (accumulation dtype, target's shape) and per-row stats [..., 3] =
  // (sum of s over non-target classes, sum of s, weight of the target class; 0 for ignored rows).
  m.def(
      "stablemax_cross_entropy(Tensor input, Tensor target, Tensor? weight, int dim, int ignore_index, "
      "float label_smoothing) -> (Tensor, Tensor)");
  // grad_rows: the gradient of each row's loss, with the target's shape or one element for all rows.
  m.def(
      "stablemax_cross_entropy_backward(Tensor grad_rows, Tensor input, Tensor target, Tensor? weight, "
      "Tensor stats, int dim, int ignore_index, float label_smoothing) -> Tensor");
  // ⊥Grad, in place on one gradient: g <- (g - (w.g / (w.w + 1e-30)) w) * |g| / (|g_perp| + 1e-30).
  m.def("orthograd_(Tensor(a!) grad, Tensor param) -> ()");

  // ---- Sliced Wasserstein (csrc/sliced_wasserstein) ---------------------------------------------

  // ---- Betti matching (csrc/betti_matching) ----------------------------------------------------
  // f, g: [N, H, W] or [N, D, H, W] float32/float64 sublevel-filtration values (f = 1 - p for the
  // superlevel filtration of probabilities). Returns (rows [P, 5] int64, counts [N, D, 3] int64):
  // row = (segment, f birth, f death, g birth, g death) with segment = (n*D + k)*3 + kind, kind 0 a
  // matched pair, 1 an unmatched f bar (g columns -1), 2 an unmatched g bar (f columns -1); pixel
  // indices are flat within one image; rows are grouped by instance, then dimension, then kind.
  // strict: match only through non-empty image bars. include_target_unmatched: emit kind-2 rows.
  m.def("betti_matching_pairs(Tensor f, Tensor g, bool strict, bool include_target_unmatched) -> (Tensor, Tensor)");
  // Persistence pairs of x ([N, H, W] or [N, D, H, W], sublevel): (rows [P, 3] = (n*D + k, birth
  // pixel, death pixel), counts [N, D]); include_essential adds the H0 bar with death pixel -1.
  m.def("persistence_pairs(Tensor x, bool include_essential) -> (Tensor, Tensor)");
  // Per-instance loss [N] over the rows of betti_matching_pairs (pred, target: [N, V] probabilities;
  // weights: float64 [D, 3] per dimension and kind), and its gradient w.r.t. pred ([N, V]).
  m.def("betti_matching_loss_rows(Tensor pred, Tensor target, Tensor rows, Tensor weights) -> Tensor");
  m.def(
      "betti_matching_loss_rows_backward(Tensor grad, Tensor pred, Tensor target, Tensor rows, Tensor weights) "
      "-> Tensor");

  // ---- M-FAC (csrc/mfac) -----------------------------------------------------------------------

  // ---- PamC (csrc/pamc) ------------------------------------------------------------------------

}
