"""Pure-torch references for the sliced Wasserstein family, written from the math (float64-capable).

They materialise every projected value and sort with torch.sort(stable=True), so they are slow and
memory-hungry: they exist to check lossforge's kernels (values and, through autograd, gradients).

1D transport between mu = sum_i a_i delta_{u_i} and nu = sum_j b_j delta_{v_j}:
    W_p^p = int_0^1 |F^-1(q) - G^-1(q)|^p dq.
The quantile functions are step functions that change only at the cumulative weights A_i and B_j;
on each piece between two consecutive breakpoints of the union {A_i} U {B_j}, both are constant. Here
the union is sorted and each piece finds its atoms with searchsorted (the kernels walk both sides with
two pointers instead).
"""
from __future__ import annotations

import torch


def wasserstein_1d_pp(u: torch.Tensor, v: torch.Tensor, a: torch.Tensor | None = None,
                      b: torch.Tensor | None = None, p: float = 2.0) -> torch.Tensor:
    """W_p^p between the 1D measures on the last dimension of u [..., n] and v [..., m].

    a [..., n] and b [..., m] are non-negative weights (normalised here); None means uniform.
    """
    n, m = u.shape[-1], v.shape[-1]
    su, iu = torch.sort(u, dim=-1, stable=True)
    sv, iv = torch.sort(v, dim=-1, stable=True)
    if a is None and b is None and n == m:
        return (su - sv).abs().pow(p).mean(dim=-1)
    if a is None:
        a = torch.full_like(u, 1.0 / n)
    else:
        a = (a / a.sum(dim=-1, keepdim=True)).expand_as(u)
    if b is None:
        b = torch.full_like(v, 1.0 / m)
    else:
        b = (b / b.sum(dim=-1, keepdim=True)).expand_as(v)
    A = torch.cumsum(torch.gather(a, -1, iu), dim=-1)
    B = torch.cumsum(torch.gather(b, -1, iv), dim=-1)
    qs, _ = torch.sort(torch.cat([A, B], dim=-1), dim=-1)
    # The atom active on (q_prev, q] is the first one whose cumulative weight reaches q.
    ia = torch.searchsorted(A.detach().contiguous(), qs.detach().contiguous()).clamp_max(n - 1)
    ib = torch.searchsorted(B.detach().contiguous(), qs.detach().contiguous()).clamp_max(m - 1)
    lengths = torch.diff(qs, dim=-1, prepend=torch.zeros_like(qs[..., :1]))
    du = torch.gather(su, -1, ia) - torch.gather(sv, -1, ib)
    return (lengths * du.abs().pow(p)).sum(dim=-1)


def _batched(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 3 else x.unsqueeze(0)


def sliced_wasserstein(x, y, x_weights=None, y_weights=None, *, projections, p: float = 2.0,
                       root: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Reference for lossforge.sliced_wasserstein with given projections ([d, L] or [B, d, L]).

    Per pair: (mean_l W_p^p(theta_l # mu, theta_l # nu))^(1/p) (root=True) or the mean itself; then the
    reduction over pairs ("mean", "sum", "none"). A single pair ([N, d]) gives a 0-d tensor.
    """
    single = x.dim() == 2
    X, Y = _batched(x), _batched(y)
    P = projections if projections.dim() == 3 else projections.unsqueeze(0)
    u = torch.matmul(X, P).transpose(1, 2)  # [B, L, N]
    v = torch.matmul(Y, P).transpose(1, 2)  # [B, L, M]
    a = None if x_weights is None else _rows(x_weights).unsqueeze(1)
    b = None if y_weights is None else _rows(y_weights).unsqueeze(1)
    per_pair = wasserstein_1d_pp(u, v, a, b, p).mean(dim=-1)  # [B]
    out = per_pair.pow(1.0 / p) if root else per_pair
    if single:
        return out[0]
    if reduction == "mean":
        return out.mean()
    if reduction == "sum":
        return out.sum()
    return out


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w if w.dim() == 2 else w.unsqueeze(0)


def vmf_mean_resultant_length(kappa: float, d: int) -> float:
    """E[<theta, loc>] for theta ~ vMF(loc, kappa) on S^{d-1}: A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa)."""
    import math

    if kappa == 0:
        return 0.0
    if d == 3:
        return 1.0 / math.tanh(kappa) - 1.0 / kappa
    from scipy.special import ive  # exponentially scaled: the scales cancel in the ratio

    return float(ive(d / 2, kappa) / ive(d / 2 - 1, kappa))
