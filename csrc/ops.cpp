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
  // x [B, N, d], y [B, M, d], weights [B, N] / [B, M] (non-negative, normalised inside), projections
  // [d, L] (shared) or [B, d, L]. Returns value [B] = mean_l W_p^p over the L slices and, in the same pass,
  // d value[b] / d (x, y, x_weights, y_weights, projections) for the inputs whose flag is set
  // ([B, N, d], [B, M, d], [B, N], [B, M], [B, d, L]; a [0] tensor where not requested).
  m.def(
      "sliced_wasserstein(Tensor x, Tensor y, Tensor? x_weights, Tensor? y_weights, Tensor projections, "
      "float p, bool grad_points, bool grad_weights, bool grad_projections) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- Betti matching (csrc/betti_matching) ----------------------------------------------------

  // ---- M-FAC (csrc/mfac) -----------------------------------------------------------------------

  // ---- PamC (csrc/pamc) ------------------------------------------------------------------------

}
