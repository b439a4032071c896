"""Pure-torch PamC references, written from the paper's formulas: dense, O(n²)
memory, float64-capable, slow on purpose and easy to read.

- `gamma_dense`, `influence_matrix_dense`: Γ as a dense n×n matrix.
- `pamc_loss_reference`, `pairwise_contrastive_loss_reference`: the two losses from dense Γ.
- `pairwise_contrastive_loss_authors`: the dense all-pairs loss the way the authors' code computes it
  (Graph-MLP's Ncontrast on SCGC's cosine matrix: several n×n buffers), the benchmark's baseline.
- `pamc_loss_authors`: the authors' sparse PamC recipe (gathers an E×d tensor for the positive term and
  builds meta-nodes through an n×k×d one-hot product), the other baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PAMC_EPS = 1e-10
PAIRWISE_EPS = 1e-8
NORM_EPS = 1e-12


def gamma_dense(edge_index: torch.Tensor, num_nodes: int, edge_weight: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense Γ [n, n] with duplicate edges summed."""
    w = torch.ones(edge_index.shape[1], dtype=dtype, device=edge_index.device) if edge_weight is None \
        else edge_weight.to(dtype)
    g = torch.zeros(num_nodes, num_nodes, dtype=dtype, device=edge_index.device)
    return g.index_put_((edge_index[0], edge_index[1]), w, accumulate=True)


def influence_matrix_dense(edge_index: torch.Tensor, num_nodes: int, order: int = 2,
                           influence: bool = True) -> torch.Tensor:
    """Â = D̃⁻¹(A_sym + I), A binary; Γ = Σ_{p=1..r} Â^p or Â^r, dense float64."""
    a = torch.zeros(num_nodes, num_nodes, dtype=torch.float64, device=edge_index.device)
    a[edge_index[0], edge_index[1]] = 1.0
    a = torch.maximum(a, a.t())
    a.fill_diagonal_(1.0)
    a_hat = a / a.sum(1, keepdim=True)
    power, gamma = a_hat, a_hat.clone()
    for _ in range(order - 1):
        power = power @ a_hat
        gamma = gamma + power if influence else power
    return gamma


def cosine_masked(z: torch.Tensor) -> torch.Tensor:
    """s_ij = cos(z_i, z_j) with z / max(|z|, 1e-12), and s_ii = 0."""
    u = F.normalize(z, dim=1, eps=NORM_EPS)
    s = u @ u.t()
    return s * (1 - torch.eye(z.shape[0], dtype=z.dtype, device=z.device))


def _reduce(per_node, reduction):
    return {"mean": per_node.mean, "sum": per_node.sum}.get(reduction, lambda: per_node)()


def pamc_loss_reference(z: torch.Tensor, gamma: torch.Tensor, assignment: torch.Tensor, tau: float = 1.0,
                        soft: bool = False, num_clusters: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """L_PamC from dense Γ, literally: −log(Σ_j Γ_ij e^{τ s_ij} + 1e−10) per node plus the meta-node term
    (1/k′) Σ_a log(Σ_b e^{τ S_ab} + 1e−10) over non-empty clusters a, b."""
    pos = torch.log((gamma.to(z.dtype) * torch.exp(tau * cosine_masked(z))).sum(1) + PAMC_EPS)
    if assignment.is_floating_point():
        k = assignment.shape[1]
        if soft:
            q = assignment.to(z.dtype)
        else:
            q = F.one_hot(assignment.detach().argmax(1), k).to(z.dtype)
    else:
        k = num_clusters if num_clusters is not None else int(assignment.max()) + 1
        q = F.one_hot(assignment, k).to(z.dtype)
    meta = q.t() @ z
    if assignment.is_floating_point() and not soft and bool(torch.isnan(assignment).any()):
        meta = meta + float("nan")  # NaN in Q propagates, as through the soft QᵀZ (argmax would hide it)
    keep = (~(q.detach().sum(0) <= 0)).nonzero().flatten()  # non-empty clusters (NaN ones kept: NaN propagates)
    meta = meta[keep]
    big_s = cosine_masked(meta)
    neg = torch.log(torch.exp(tau * big_s).sum(1) + PAMC_EPS).mean()
    return _reduce(neg - pos, reduction)


def pairwise_contrastive_loss_reference(z: torch.Tensor, gamma: torch.Tensor, tau: float = 1.0,
                                        reduction: str = "mean") -> torch.Tensor:
    """L_N from dense Γ: −log(P_i / N_i + 1e−8), P_i = Σ_j Γ_ij e^{τ s_ij}, N_i = Σ_j e^{τ s_ij}."""
    e = torch.exp(tau * cosine_masked(z))
    per_node = -torch.log((gamma.to(z.dtype) * e).sum(1) / e.sum(1) + PAIRWISE_EPS)
    return _reduce(per_node, reduction)


def pairwise_contrastive_loss_authors(z: torch.Tensor, gamma: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """The dense all-pairs loss as the authors' code computes it (SCGC's cosine matrix, then Graph-MLP's
    Ncontrast): the Gram matrix, an identity mask, the outer product of the norms and the exponentials
    are all n×n tensors, and Γ is a dense n×n matrix. Exact for z without zero rows."""
    n = z.shape[0]
    gram = z @ z.t()
    mask = torch.eye(n, dtype=z.dtype, device=z.device)
    norms = torch.sqrt(torch.sum(z ** 2, 1)).reshape(-1, 1)
    cos = gram * (norms @ norms.t()) ** (-1)
    cos = (1 - mask) * cos
    e = torch.exp(tau * cos)
    pos = torch.sum(e * gamma, 1)
    total = torch.sum(e, 1)
    return -torch.log(pos * total ** (-1) + PAIRWISE_EPS).mean()


def pamc_loss_authors(z: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor, q: torch.Tensor,
                      tau: float = 1.0) -> torch.Tensor:
    """PamC as the authors' sparse code computes it: the positive term gathers both endpoint embeddings
    of every edge (two E×d tensors) and scatter-adds, and the meta-nodes come from an n×k×d one-hot
    product. Hard assignments from argmax(q); every cluster must be non-empty (else NaN, as theirs)."""
    src, dst = edge_index
    x1, x2 = z[src], z[dst]
    cos = (x1 * x2).sum(1) / (x1.pow(2).sum(1).sqrt() * x2.pow(2).sum(1).sqrt())
    cos = torch.where(src == dst, torch.zeros_like(cos), cos)
    contrib = torch.exp(tau * cos) * edge_weight.to(z.dtype)
    pos = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device).scatter_add(0, src, contrib)
    onehot = F.one_hot(q.detach().argmax(1), q.shape[1]).to(z.dtype)
    meta = torch.sum(z.unsqueeze(1) * onehot.unsqueeze(2), dim=0)
    k = meta.shape[0]
    mnorm = torch.sqrt(torch.sum(meta ** 2, 1)).reshape(-1, 1)
    big_s = (meta @ meta.t()) * (mnorm @ mnorm.t()) ** (-1)
    big_s = (1 - torch.eye(k, dtype=z.dtype, device=z.device)) * big_s
    neg = torch.sum(torch.exp(tau * big_s), 1)
    return -torch.log(pos + PAMC_EPS).mean() + torch.log(neg + PAMC_EPS).mean()
