"""Pure-torch M-FAC references, written from the paper's math (float64-capable, any device).

Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information"
(NeurIPS 2021). G in R^{m x d} holds the gradients as rows; damp is lambda:

    F = lambda I + G^T G / s          (s = m for a full window; see `scale`)
    F^-1 x = x / lambda - G^T (s lambda I + G G^T)^-1 G x / lambda          (Woodbury)

Contents
- `dense_fisher`, `dense_ihvp`, `dense_inverse_diagonal`: the d x d matrix itself (oracles, small d).
- `static_factors`, `static_ihvp`, `static_inverse_diagonal`: the paper's static algorithm, literally:
  v_i = F_{i-1}^-1 g_i, q_i = m + g_i^T v_i, F^-1 x = x / lambda - sum_i (v_i^T x / q_i) v_i.
- `woodbury_ihvp`: the same operator through one m x m Cholesky factor.
- `block_ihvp`, `block_inverse_diagonal`: F block-diagonal over contiguous coordinate blocks.
- `OfficialDynamic`, `official_mfac_step`: a faithful torch re-implementation of the official dynamic
  algorithm and optimizer (the benchmark's baseline): a zero-filled ring buffer of m gradients, the
  m x m Gram matrix G G^T kept by replacing one row and column per step, and the coefficient
  matrices refactored from scratch (O(m^3)) at every step, in the buffer's dtype.
"""
from __future__ import annotations

import torch


def _scale(G: torch.Tensor, scale) -> float:
    return float(G.shape[0] if scale is None else scale)


def dense_fisher(G: torch.Tensor, damp: float, scale=None) -> torch.Tensor:
    """F = damp I + G^T G / scale as a dense d x d matrix."""
    d = G.shape[1]
    F = G.T @ G / _scale(G, scale)
    F.diagonal().add_(damp)
    return F if d else F.reshape(0, 0)


def dense_ihvp(G: torch.Tensor, x: torch.Tensor, damp: float, scale=None) -> torch.Tensor:
    """F^-1 x by a dense solve; x is [d] or [k, d]."""
    F = dense_fisher(G, damp, scale)
    if x.dim() == 1:
        return torch.linalg.solve(F, x)
    return torch.linalg.solve(F, x.T).T


def dense_inverse_diagonal(G: torch.Tensor, damp: float, scale=None) -> torch.Tensor:
    return torch.linalg.inv(dense_fisher(G, damp, scale)).diagonal()


def static_factors(G: torch.Tensor, damp: float):
    """The static algorithm's (V, q): v_i = F_{i-1}^-1 g_i, q_i = m + g_i^T v_i, with F_0 = damp I and
    F_i = F_{i-1} + g_i g_i^T / m. One Sherman-Morrison step per gradient: O(m^2 d)."""
    m, d = G.shape
    V = torch.empty_like(G)
    q = torch.empty(m, dtype=G.dtype, device=G.device)
    for i in range(m):
        g = G[i]
        v = g / damp
        for j in range(i):
            v = v - (V[j] @ g) / q[j] * V[j]
        V[i] = v
        q[i] = m + g @ v
    return V, q


def static_ihvp(V: torch.Tensor, q: torch.Tensor, damp: float, x: torch.Tensor) -> torch.Tensor:
    """F^-1 x = x / damp - sum_i (v_i^T x / q_i) v_i (x [d] or [k, d])."""
    return x / damp - ((x @ V.T) / q) @ V


def static_inverse_diagonal(V: torch.Tensor, q: torch.Tensor, damp: float) -> torch.Tensor:
    """[F^-1]_jj = 1 / damp - sum_i v_ij^2 / q_i."""
    return 1.0 / damp - (V * V / q[:, None]).sum(0)


def woodbury_ihvp(G: torch.Tensor, x: torch.Tensor, damp: float, scale=None) -> torch.Tensor:
    """F^-1 x through K = s damp I + G G^T (m x m); x is [d] or [k, d]."""
    m = G.shape[0]
    if m == 0:
        return x / damp
    K = G @ G.T
    K.diagonal().add_(_scale(G, scale) * damp)
    L = torch.linalg.cholesky(K)
    t = G @ (x if x.dim() == 1 else x.T)
    b = torch.cholesky_solve(t.reshape(m, -1), L).reshape(t.shape)
    y = (x if x.dim() == 1 else x.T) - G.T @ b
    return (y if x.dim() == 1 else y.T) / damp


def _blocks(d: int, block_size: int):
    return [(s, min(s + block_size, d)) for s in range(0, d, block_size)]


def block_ihvp(G: torch.Tensor, x: torch.Tensor, damp: float, block_size: int) -> torch.Tensor:
    """F block-diagonal: F_b = damp I + G_b^T G_b / m on each contiguous block b of block_size coordinates
    (the last block may be smaller). Dense per-block solves."""
    out = torch.empty_like(x)
    for s, e in _blocks(G.shape[1], block_size):
        out[..., s:e] = dense_ihvp(G[:, s:e], x[..., s:e], damp)
    return out


def block_inverse_diagonal(G: torch.Tensor, damp: float, block_size: int) -> torch.Tensor:
    return torch.cat([dense_inverse_diagonal(G[:, s:e], damp) for s, e in _blocks(G.shape[1], block_size)])


class OfficialDynamic:
    """The official dynamic algorithm, re-implemented in torch from the paper's description.

    State: a zero-filled ring buffer G [m, d] and the Gram matrix GG^T [m, m] (buffer dtype). `update`
    writes g into the oldest row and recomputes that row and column of GG^T with one G g pass; then the
    whole m x m setup is redone (O(m^3)): K = GG^T / damp + m I = L diag(q) L^T (unit lower L; the
    official code takes it from an unpivoted LU, which torch only has on CUDA: for a symmetric positive
    definite K it equals this LDL^T, obtained here from a Cholesky factor), and the coefficient matrix
    B = L^-1 / damp (rows: v_j = sum_k B_jk g_k). `mul(x)` = x / damp - G^T (B^T (z / q)) with
    z = L^-1 (G x / damp). The window always counts m gradients (the official fixed scaling).
    """

    def __init__(self, m: int, d: int, damp: float = 1e-5, dtype=torch.float32, device=None):
        self.m, self.d, self.damp = m, d, damp
        self.G = torch.zeros(m, d, dtype=dtype, device=device)
        self.dots = torch.zeros(m, m, dtype=dtype, device=device)
        self.last = 0
        self._setup()

    def _setup(self):
        m = self.m
        K = self.dots / self.damp
        K.diagonal().add_(m)
        Lc = torch.linalg.cholesky(K)
        diag = Lc.diagonal()
        self.L = Lc / diag  # unit lower triangular
        self.q = diag * diag  # q_i = m + D_ii
        eye = torch.eye(m, dtype=K.dtype, device=K.device)
        self.coef = torch.linalg.solve_triangular(self.L, eye / self.damp, upper=False, unitriangular=True)

    def mul(self, x: torch.Tensor, dots: torch.Tensor | None = None) -> torch.Tensor:
        if dots is None:
            dots = self.G @ x
        z = torch.linalg.solve_triangular(self.L, (dots / self.damp)[:, None], upper=False, unitriangular=True)
        c = (z[:, 0] / self.q) @ self.coef
        return x / self.damp - c @ self.G

    def update(self, g: torch.Tensor) -> torch.Tensor:
        self.G[self.last] = g
        tmp = self.G @ g
        self.dots[self.last, :] = tmp
        self.dots[:, self.last] = tmp
        self._setup()
        self.last = (self.last + 1) % self.m
        return tmp

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        return self.mul(g, self.update(g))


def official_mfac_step(hinv: OfficialDynamic, p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float,
                       momentum: float = 0.0, weight_decay: float = 0.0) -> None:
    """One step of the official M-FAC optimizer on a flat parameter p (in place): the weight decay is
    added to the gradient before the IHVP, momentum averages the preconditioned directions:
    v <- momentum v + (1 - momentum) F^-1 g, p <- p - lr v."""
    g = grad + weight_decay * p if weight_decay > 0 else grad
    u = hinv.update_mul(g)
    if momentum > 0:
        v = state.get("v")
        if v is None:
            v = torch.zeros_like(p)
        v = momentum * v + (1 - momentum) * u
        state["v"] = v
        u = v
    p.add_(u, alpha=-lr)
