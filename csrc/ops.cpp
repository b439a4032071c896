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
  // Edge list (row -> col) to CSR and its transpose, by a stable counting sort (CPU; CUDA sorts in torch):
  // (rowptr [n+1], col sorted by row [E], perm [E]: CSR position -> input edge, colptr [n+1],
  //  trow [E]: row of each transposed entry, tedge [E]: CSR position of each transposed entry).
  m.def("pamc_build_csr(Tensor row, Tensor col, int num_nodes) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (lse_i = log(sum_j Gamma_ij exp(tau cos(z_i, z_j)) + eps) with the self-similarity masked to 0,
  //  u = z / max(|z|, 1e-12), inv = 1 / max(|z|, 1e-12)); Gamma in CSR. u and inv are saved for the
  // backward; the transposed list (colptr, trow, tedge) is not read by the forward, only by the backward.
  m.def(
      "pamc_positive(Tensor z, Tensor rowptr, Tensor col, Tensor weight, Tensor colptr, Tensor trow, "
      "Tensor tedge, float tau, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "pamc_positive_backward(Tensor grad, Tensor u, Tensor inv, Tensor rowptr, Tensor col, Tensor weight, "
      "Tensor colptr, Tensor trow, Tensor tedge, Tensor lse, float tau) -> Tensor");
  // Meta-nodes: (sums [k, d] = sum of z over the rows of each label, counts [k]).
  m.def("pamc_segment_sum(Tensor z, Tensor labels, int num_segments) -> (Tensor, Tensor)");
  // Graph-MLP's exact all-pairs loss per row, -log(P_i / N_i + 1e-8), tiled (never n x n), and
  // stats [n, 2] = (log P_i, log N_i).
  m.def(
      "pairwise_contrastive(Tensor z, Tensor rowptr, Tensor col, Tensor weight, Tensor colptr, Tensor trow, "
      "Tensor tedge, float tau, int block_rows, int block_cols) -> (Tensor, Tensor)");
  m.def(
      "pairwise_contrastive_backward(Tensor grad, Tensor z, Tensor rowptr, Tensor col, Tensor weight, "
      "Tensor colptr, Tensor trow, Tensor tedge, Tensor stats, float tau, int block_rows, int block_cols) -> Tensor");

}
