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

  // ---- M-FAC (csrc/mfac) -----------------------------------------------------------------------
  // G [m, d]: the gradient buffer (float32, float64 or bfloat16; rows contiguous). Vectors use the compute
  // dtype: float64 for a float64 buffer, float32 otherwise. Lists of tensors (the optimizer's parameters)
  // stand for their concatenation, of d elements in all.
  // Pass 1: t = G x for x [d] or [k, d] -> [m] or [k, m].
  m.def("mfac_gemv(Tensor G, Tensor x) -> Tensor");
  // Pass 2: y = beta x + alpha G^T b for b [m] or [k, m] -> [d] or [k, d] (x optional: beta x dropped).
  m.def("mfac_gemv_t(Tensor G, Tensor b, Tensor? x, float alpha, float beta) -> Tensor");
  // Pass 1 of a step: x = grads + weight_decay * params (params may be empty); G[row] = x rounded to the
  // storage dtype (x_s); returns G x_s [m] float64 (the new row of G G^T, and the step's t).
  m.def(
      "mfac_insert_gemv_(Tensor(a!) G, int row, Tensor[] grads, Tensor[] params, float weight_decay) -> Tensor");
  // Pass 2 of a step, fused with the optimizer: x = grads + weight_decay * params (rounded like G[row]),
  // y = beta x + alpha G^T b, v = momentum v + (1 - momentum) y (if momentum > 0), params -= lr (v or y).
  m.def(
      "mfac_step_(Tensor G, Tensor b, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)? momentum_buffer, "
      "float alpha, float beta, float lr, float weight_decay, float momentum) -> ()");
  // U [n, n] float64 upper, K = U^T U over the window in age order: drop the oldest gradient and append
  // the newest, whose row of the new K is k [n] (last entry: its diagonal, plus `shift`). O(n^2).
  // Returns the new pivot [1] float64 (> 0 when the update is sound).
  m.def("mfac_chol_replace_oldest_(Tensor(a!) U, Tensor k, float shift) -> Tensor");
  // b = (U^T U)^-1 t for U [n, n] float64 upper (rows contiguous), t [n] or [n, k] float64.
  m.def("mfac_chol_solve(Tensor U, Tensor t) -> Tensor");

  // ---- PamC (csrc/pamc) ------------------------------------------------------------------------

}
