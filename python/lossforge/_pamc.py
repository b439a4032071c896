"""PamC: the proxy-approximated meta-node contrastive loss for graph clustering (Kulatilleke, Portmann,
Chandra, "Efficient block contrastive learning via parameter-free meta-node approximation",
arXiv 2209.14067), and the exact all-pairs loss it replaces (Graph-MLP's Ncontrast).

With s_ij = cos(z_i, z_j) (s_ii masked to 0), Γ the sparse positive weights and meta-nodes
m_a = Σ_{i in cluster a} z_i (hard) or M = QᵀZ (soft), S_ab = cos(m_a, m_b) (S_aa = 0):

    L_PamC = −(1/n) Σ_i log(Σ_j Γ_ij e^{τ s_ij} + 1e−10) + (1/k′) Σ_a log(Σ_b e^{τ S_ab} + 1e−10)
    L_N    = −(1/n) Σ_i log(Σ_j Γ_ij e^{τ s_ij} / Σ_j e^{τ s_ij} + 1e−8)

k′ counts the non-empty clusters; empty clusters are left out of both sums over a and b (the authors'
code returns NaN there). Cosines use z / max(|z|, 1e−12), as F.normalize does.

Kernels: the positive term is a CSR row walk with an online log-sum-exp per row (nothing of size E×d is
gathered), its backward walks the transposed edge list; meta-nodes are a segment sum (hard) or one GEMM
(soft); the k×k block is a handful of torch ops. L_N is computed exactly but tiled, blocks of rows ×
blocks of columns with an online log-sum-exp: O(n·d) memory instead of n×n buffers.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Tuple, Union

import torch
import torch.nn.functional as F

from ._ops import ops, register_fake

__all__ = [
    "pamc_loss",
    "influence_matrix",
    "pairwise_contrastive_loss",
    "prepare_graph",
    "PamCGraph",
    "stochastic_block_model",
    "SBMGraph",
]

PAMC_EPS = 1e-10  # inside the logs of L_PamC (the authors' code)
PAIRWISE_EPS = 1e-8  # inside the log of L_N (Graph-MLP's Ncontrast); the kernels hard-code it too
NORM_EPS = 1e-12  # cosine similarity: z / max(|z|, eps)
# Tile of the exact pairwise loss: block_rows × block_cols similarities at a time (4 MiB in float32 on
# the CPU, one per thread; 64 MiB on a GPU, where bigger GEMMs keep it busy).
BLOCK_ROWS, BLOCK_COLS = 512, 2048
CUDA_BLOCK_ROWS, CUDA_BLOCK_COLS = 2048, 8192

_FLOAT = (torch.float32, torch.float64)
# What the graph arguments accept: a [2, E] int64 edge index, a CSR pair (rowptr, col) or a prepared PamCGraph.
EdgeIndex = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], "PamCGraph"]
_REDUCTIONS = ("none", "mean", "sum")


# ---- the prepared graph ---------------------------------------------------------------------------


class PamCGraph(NamedTuple):
    """Γ in the layout the kernels read: CSR by source row plus its transpose (for the backward).

    Build it once with `prepare_graph` and pass it as `edge_index` to reuse it across steps
    (`nn.PamCLoss` does that for you). Edge indices and weights are validated when it is built.
    """

    num_nodes: int
    rowptr: torch.Tensor  # [n + 1]
    col: torch.Tensor  # [E] targets, grouped by source row
    weight: torch.Tensor  # [E] Γ values, in CSR order
    colptr: torch.Tensor  # [n + 1]
    trow: torch.Tensor  # [E] source row of each transposed entry
    tedge: torch.Tensor  # [E] CSR position of each transposed entry

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    @property
    def device(self) -> torch.device:
        return self.col.device


def _check_num_nodes(num_nodes, fn):
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int):
        raise TypeError(f"{fn}: num_nodes must be an int, got {type(num_nodes).__name__}")
    if num_nodes < 0:
        raise ValueError(f"{fn}: num_nodes must be non-negative, got {num_nodes}")


def _check_edge_index(edge_index, num_nodes: int, fn: str, name: str = "edge_index") -> torch.Tensor:
    if not isinstance(edge_index, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a [2, E] int64 tensor, a (rowptr, col) tuple or a PamCGraph, "
                        f"got {type(edge_index).__name__}")
    if edge_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: {name} must hold int64 node indices, got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"{fn}: {name} must have shape [2, E], got {list(edge_index.shape)}")
    edge_index = edge_index.long()
    if edge_index.numel():
        # One host sync on CUDA (validation happens once per graph when it is prepared).
        lo, hi = int(edge_index.min()), int(edge_index.max())
        if lo < 0 or hi >= num_nodes:
            bad = (edge_index < 0) | (edge_index >= num_nodes)
            e = int(bad.any(0).nonzero()[0, 0])
            raise ValueError(f"{fn}: {name} has node index {int(edge_index[:, e][bad[:, e]][0])} at edge {e}, "
                             f"out of range for {num_nodes} nodes (expected 0 <= index < {num_nodes})")
    return edge_index


def _check_edge_weight(edge_weight, num_edges: int, device, fn: str) -> torch.Tensor:
    if not isinstance(edge_weight, torch.Tensor):
        raise TypeError(f"{fn}: edge_weight must be a tensor or None, got {type(edge_weight).__name__}")
    if not edge_weight.is_floating_point():
        raise TypeError(f"{fn}: edge_weight must be a floating-point tensor, got {edge_weight.dtype}")
    if edge_weight.shape != (num_edges,):
        raise ValueError(f"{fn}: edge_weight must have shape [{num_edges}] (one weight per edge), "
                         f"got {list(edge_weight.shape)}")
    if edge_weight.device != device:
        raise ValueError(f"{fn}: edge_weight is on {edge_weight.device} but the edges are on {device}")
    if edge_weight.requires_grad:
        raise ValueError(f"{fn}: edge_weight must not require grad (Γ is a constant of the loss)")
    if num_edges:
        bad = ~(edge_weight >= 0) | ~torch.isfinite(edge_weight)
        if bool(bad.any()):  # one host sync on CUDA, once per prepared graph
            e = int(bad.nonzero()[0, 0])
            raise ValueError(f"{fn}: edge_weight must be finite and non-negative, got {float(edge_weight[e])} "
                             f"at edge {e}")
    return edge_weight


def _csr_from_edges(row: torch.Tensor, col: torch.Tensor, num_nodes: int):
    """(rowptr, col sorted by row, perm, colptr, trow, tedge): a counting sort in C++ on the CPU, stable
    sorts in torch elsewhere."""
    if row.device.type == "cpu":
        return ops.pamc_build_csr(row.contiguous(), col.contiguous(), num_nodes)
    return _csr_from_edges_torch(row, col, num_nodes)


def _csr_from_edges_torch(row: torch.Tensor, col: torch.Tensor, num_nodes: int):
    """The same layout from torch's stable sorts (any device; no host sync)."""
    perm = torch.argsort(row, stable=True)
    col_s, row_s = col[perm], row[perm]
    zero = row.new_zeros(1)
    rowptr = torch.cat([zero, torch.bincount(row_s, minlength=num_nodes).cumsum(0)])
    tedge = torch.argsort(col_s, stable=True)
    colptr = torch.cat([zero, torch.bincount(col_s, minlength=num_nodes).cumsum(0)])
    return rowptr, col_s, perm, colptr, row_s[tedge], tedge


def prepare_graph(edge_index: EdgeIndex, num_nodes: int, edge_weight: torch.Tensor | None = None) -> PamCGraph:
    """Validates Γ and lays it out for the kernels (CSR + transpose). Reuse the result across steps.

    edge_index: [2, E] int64 (source row, target column; duplicates are summed), or a CSR pair
    (rowptr [n+1], col [E]); edge_weight: [E] non-negative Γ values (None: all ones).

    torch.compile: compiles with graph breaks, not fullgraph. Validation is a host decision by nature
    (a bad node index or weight raises ValueError before anything is built, naming the edge); prepare
    the graph once outside the compiled step and pass the PamCGraph, with which the losses compile
    with fullgraph=True.

    >>> import torch, lossforge
    >>> edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    >>> graph = lossforge.prepare_graph(edge_index, 3)
    >>> graph.rowptr.tolist(), graph.col.tolist(), graph.num_edges
    ([0, 1, 3, 4], [1, 0, 2, 1], 4)
    """
    fn = "prepare_graph"
    _check_num_nodes(num_nodes, fn)
    if isinstance(edge_index, PamCGraph):
        if edge_index.num_nodes != num_nodes:
            raise ValueError(f"{fn}: the PamCGraph has {edge_index.num_nodes} nodes, expected {num_nodes}")
        if edge_weight is not None:
            raise ValueError(f"{fn}: a PamCGraph carries its weights: pass edge_weight=None")
        return edge_index
    if isinstance(edge_index, (tuple, list)):
        if len(edge_index) != 2:
            raise ValueError(f"{fn}: a CSR graph is a pair (rowptr, col), got {len(edge_index)} items")
        rowptr, col = edge_index
        for name, t in (("rowptr", rowptr), ("col", col)):
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{fn}: a tuple or list is read as a CSR graph (rowptr, col) of int64 tensors, "
                                f"but {name} is {got} (pass edges as a [2, E] int64 tensor)")
            if t.dim() != 1:
                raise ValueError(f"{fn}: CSR {name} must be 1-D, got shape {list(t.shape)}")
        if rowptr.shape[0] != num_nodes + 1:
            raise ValueError(f"{fn}: CSR rowptr must have num_nodes + 1 = {num_nodes + 1} entries, "
                             f"got {rowptr.shape[0]}")
        if col.device != rowptr.device:
            raise ValueError(f"{fn}: CSR col is on {col.device} but rowptr is on {rowptr.device}")
        rowptr, col = rowptr.long(), col.long()
        counts = rowptr.diff()
        if int(rowptr[0]) != 0 or int(rowptr[-1]) != col.numel() or bool((counts < 0).any()):
            raise ValueError(f"{fn}: CSR rowptr must start at 0, never decrease and end at len(col) = {col.numel()}")
        row = torch.repeat_interleave(torch.arange(num_nodes, device=col.device), counts)
        edge_index = torch.stack([row, col])
    edge_index = _check_edge_index(edge_index, num_nodes, fn)
    num_edges = edge_index.shape[1]
    if edge_weight is None:
        edge_weight = torch.ones(num_edges, device=edge_index.device)
    edge_weight = _check_edge_weight(edge_weight, num_edges, edge_index.device, fn)
    rowptr, col, perm, colptr, trow, tedge = _csr_from_edges(edge_index[0], edge_index[1], num_nodes)
    return PamCGraph(num_nodes, rowptr, col, edge_weight[perm].contiguous(), colptr, trow, tedge)


def _graph_for(z: torch.Tensor, edge_index: EdgeIndex, edge_weight: torch.Tensor | None, fn: str) -> PamCGraph:
    n = z.shape[0]
    if isinstance(edge_index, PamCGraph):
        if edge_weight is not None:
            raise ValueError(f"{fn}: a PamCGraph carries its weights: pass edge_weight=None")
        graph = edge_index
        if graph.num_nodes != n:
            raise ValueError(f"{fn}: the graph has {graph.num_nodes} nodes but z has {n} rows")
    else:
        try:
            graph = prepare_graph(edge_index, n, edge_weight)
        except (TypeError, ValueError) as e:
            raise type(e)(str(e).replace("prepare_graph:", f"{fn}:", 1)) from None
    if graph.device != z.device:
        raise ValueError(f"{fn}: the graph is on {graph.device} but z is on {z.device}")
    return graph


# ---- op registrations: shapes (fake) and autograd ----------------------------------------------


# The fake kernels repeat the kernels' shape and dtype checks (csrc/pamc/pamc_cpu.cpp) with torch._check, so a
# direct torch.ops.lossforge.pamc_* call under torch.compile fails with the same message as in eager. The checks
# of values (offsets, node indices, weights, labels) need the data: the kernels make them when they run.

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fake_z(z: torch.Tensor, op: str, arg: str = "z") -> None:
    torch._check(z.dim() == 2, lambda: f"{op}: {arg} must be 2-D [num_nodes, dim], got {z.dim()}-D")
    torch._check(z.dtype in _FLOAT, lambda: f"{op}: {arg} must be float32 or float64, got {_dtype_name(z.dtype)}")
    torch._check(z.is_contiguous(), lambda: f"{op}: {arg} must be contiguous")


def _fake_like(t: torch.Tensor, dtype: torch.dtype, op: str, arg: str) -> None:
    torch._check(t.dtype == dtype, lambda: f"{op}: {arg} must be {_dtype_name(dtype)}, got {_dtype_name(t.dtype)}")
    torch._check(t.is_contiguous(), lambda: f"{op}: {arg} must be contiguous")


def _fake_index(t: torch.Tensor, size, op: str, arg: str) -> None:
    _fake_like(t, torch.int64, op, arg)
    torch._check(t.dim() == 1, lambda: f"{op}: {arg} must be 1-D")
    if size is not None:
        torch._check(t.shape[0] == size, lambda: f"{op}: {arg} must have {size} entries, got {t.shape[0]}")


def _fake_graph(z, rowptr, col, weight, colptr, trow, tedge, op: str) -> None:
    n = z.shape[0]
    _fake_index(col, None, op, "col")
    nnz = col.shape[0]
    _fake_index(rowptr, n + 1, op, "rowptr")
    _fake_like(weight, z.dtype, op, "weight")
    torch._check(weight.dim() == 1 and weight.shape[0] == nnz,
                 lambda: f"{op}: weight must have one entry per edge ({nnz})")
    _fake_index(colptr, n + 1, op, "colptr")
    _fake_index(trow, nnz, op, "trow")
    _fake_index(tedge, nnz, op, "tedge")


def _fake_tiles(block_rows: int, block_cols: int, op: str) -> None:
    torch._check(block_rows > 0 and block_cols > 0,
                 lambda: f"{op}: block_rows and block_cols must be positive, got {block_rows} and {block_cols}")


def _fake_rows(t: torch.Tensor, z: torch.Tensor, op: str, arg: str) -> None:
    n = z.shape[0]
    _fake_like(t, z.dtype, op, arg)
    torch._check(t.dim() == 1 and t.shape[0] == n, lambda: f"{op}: {arg} must have shape [{n}]")


@register_fake("lossforge::pamc_build_csr")
def _build_csr_fake(row, col, num_nodes):
    op = "pamc_build_csr"
    _fake_index(row, None, op, "row")
    _fake_index(col, row.shape[0], op, "col")
    torch._check(num_nodes >= 0, lambda: f"{op}: num_nodes must be non-negative, got {num_nodes}")
    E = row.shape[0]
    return (row.new_empty(num_nodes + 1), row.new_empty(E), row.new_empty(E), row.new_empty(num_nodes + 1),
            row.new_empty(E), row.new_empty(E))


@register_fake("lossforge::pamc_positive")
def _positive_fake(z, rowptr, col, weight, colptr, trow, tedge, tau, eps):
    op = "pamc_positive"
    _fake_z(z, op)
    torch._check(math.isfinite(tau), lambda: f"{op}: tau must be finite, got {tau}")
    torch._check(eps >= 0.0, lambda: f"{op}: eps must be non-negative, got {eps}")
    n = z.shape[0]
    if n:
        _fake_graph(z, rowptr, col, weight, colptr, trow, tedge, op)
    return z.new_empty(n), torch.empty_like(z), z.new_empty(n)


@register_fake("lossforge::pamc_positive_backward")
def _positive_backward_fake(grad, u, inv, rowptr, col, weight, colptr, trow, tedge, lse, tau):
    op = "pamc_positive_backward"
    _fake_z(u, op)
    for name, t in (("grad", grad), ("inv", inv), ("lse", lse)):
        _fake_rows(t, u, op, name)
    if u.shape[0]:
        _fake_graph(u, rowptr, col, weight, colptr, trow, tedge, op)
    return torch.empty_like(u)


def _positive_setup(ctx, inputs, output):
    z, rowptr, col, weight, colptr, trow, tedge, tau, eps = inputs
    lse, u, inv = output
    ctx.mark_non_differentiable(u, inv)
    ctx.save_for_backward(u, inv, rowptr, col, weight, colptr, trow, tedge, lse)
    ctx.tau = tau


def _refuse_double_backward(fn: str):
    # The backward kernels are not differentiable: a graph through them would give a silently wrong
    # second derivative (torch only warns), so refuse it.
    if torch.is_grad_enabled():
        raise RuntimeError(f"lossforge.{fn} does not support double backward (create_graph=True)")


def _positive_backward(ctx, grad, grad_u, grad_inv):
    _refuse_double_backward("pamc_loss")
    u, inv, rowptr, col, weight, colptr, trow, tedge, lse = ctx.saved_tensors
    gz = None
    if ctx.needs_input_grad[0]:
        gz = ops.pamc_positive_backward(grad.contiguous(), u, inv, rowptr, col, weight, colptr, trow, tedge, lse,
                                        ctx.tau)
    return gz, None, None, None, None, None, None, None, None


torch.library.register_autograd("lossforge::pamc_positive", _positive_backward, setup_context=_positive_setup)


@register_fake("lossforge::pamc_segment_sum")
def _segment_sum_fake(z, labels, num_segments):
    op = "pamc_segment_sum"
    _fake_z(z, op)
    _fake_index(labels, z.shape[0], op, "labels")
    torch._check(num_segments >= 0, lambda: f"{op}: num_segments must be non-negative, got {num_segments}")
    return z.new_empty(num_segments, z.shape[1]), labels.new_empty(num_segments)


def _segment_sum_setup(ctx, inputs, output):
    z, labels, num_segments = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(labels)


def _segment_sum_backward(ctx, grad_sums, grad_counts):
    (labels,) = ctx.saved_tensors
    k, d = grad_sums.shape
    # Labels out of range (unchecked on CUDA when num_clusters is given: no host sync) were left out by the
    # forward: they get a zero row here, never an out-of-bounds index (a device-side assert on CUDA).
    safe = torch.where((labels >= 0) & (labels < k), labels, k)
    return torch.cat([grad_sums, grad_sums.new_zeros(1, d)]).index_select(0, safe), None, None


torch.library.register_autograd("lossforge::pamc_segment_sum", _segment_sum_backward, setup_context=_segment_sum_setup)


@register_fake("lossforge::pairwise_contrastive")
def _pairwise_fake(z, rowptr, col, weight, colptr, trow, tedge, tau, block_rows, block_cols):
    op = "pairwise_contrastive"
    _fake_z(z, op)
    torch._check(math.isfinite(tau), lambda: f"{op}: tau must be finite, got {tau}")
    _fake_tiles(block_rows, block_cols, op)
    if z.shape[0]:
        _fake_graph(z, rowptr, col, weight, colptr, trow, tedge, op)
    n = z.shape[0]
    return z.new_empty(n), z.new_empty(n, 2)


@register_fake("lossforge::pairwise_contrastive_backward")
def _pairwise_backward_fake(grad, z, rowptr, col, weight, colptr, trow, tedge, stats, tau, block_rows, block_cols):
    op = "pairwise_contrastive_backward"
    _fake_z(z, op)
    _fake_tiles(block_rows, block_cols, op)
    _fake_rows(grad, z, op, "grad")
    n = z.shape[0]
    _fake_like(stats, z.dtype, op, "stats")
    torch._check(stats.dim() == 2 and stats.shape[0] == n and stats.shape[1] == 2,
                 lambda: f"{op}: stats must have shape [{n}, 2]")
    if n:
        _fake_graph(z, rowptr, col, weight, colptr, trow, tedge, op)
    return torch.empty_like(z)


def _pairwise_setup(ctx, inputs, output):
    z, rowptr, col, weight, colptr, trow, tedge, tau, block_rows, block_cols = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(z, rowptr, col, weight, colptr, trow, tedge, stats)
    ctx.tau, ctx.block_rows, ctx.block_cols = tau, block_rows, block_cols


def _pairwise_backward(ctx, grad_loss, grad_stats):
    _refuse_double_backward("pairwise_contrastive_loss")
    z, rowptr, col, weight, colptr, trow, tedge, stats = ctx.saved_tensors
    gz = None
    if ctx.needs_input_grad[0]:
        gz = ops.pairwise_contrastive_backward(grad_loss.contiguous(), z, rowptr, col, weight, colptr, trow, tedge,
                                               stats, ctx.tau, ctx.block_rows, ctx.block_cols)
    return gz, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("lossforge::pairwise_contrastive", _pairwise_backward, setup_context=_pairwise_setup)


# ---- validation ---------------------------------------------------------------------------------


def _check_z(z, fn: str) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{fn}: z must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in _FLOAT:
        raise TypeError(f"{fn}: z must be float32 or float64, got {z.dtype} (cast it with z.float())")
    if z.dim() != 2:
        raise ValueError(f"{fn}: z must have shape [num_nodes, dim], got {list(z.shape)}")
    if z.shape[0] == 0:
        raise ValueError(f"{fn}: z has no rows (shape {list(z.shape)}): there is no node to average over")
    return z.contiguous()


def _check_tau(tau, fn: str, dtype: torch.dtype = torch.float64) -> float:
    """tau is finite and |tau| <= 1 / eps(dtype) (2^23 in float32, 2^52 in float64): the kernels round tau * s
    to within 1 in the exponent; beyond that exp(tau * s) is noise (float32 gradients overflowed from 1e10)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"{fn}: tau must be a float, got {type(tau).__name__}")
    if not math.isfinite(tau):
        raise ValueError(f"{fn}: tau must be finite, got {tau}")
    limit = 1.0 / torch.finfo(dtype).eps
    if abs(tau) > limit:
        raise ValueError(f"{fn}: |tau| must be at most {limit:.4g} for {str(dtype).replace('torch.', '')} z, got {tau}")
    return float(tau)


def _check_reduction(reduction, fn: str):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(per_node: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_node.mean()
    if reduction == "sum":
        return per_node.sum()
    return per_node


def _positive_lse(z: torch.Tensor, graph: PamCGraph, tau: float, eps: float) -> torch.Tensor:
    w = graph.weight.to(z.dtype)
    lse, _, _ = ops.pamc_positive(z, graph.rowptr, graph.col, w, graph.colptr, graph.trow, graph.tedge, tau, eps)
    return lse


# ---- meta-nodes and the k×k block ------------------------------------------------------------------


def _meta_nodes(z: torch.Tensor, assignment, soft: bool, num_clusters, fn: str):
    """(M [k, d], non-empty mask [k]) for hard or soft assignments."""
    n = z.shape[0]
    if not isinstance(assignment, torch.Tensor):
        raise TypeError(f"{fn}: assignment must be a tensor: soft [n, k] cluster probabilities or hard [n] "
                        f"int64 labels, got {type(assignment).__name__}")
    if assignment.device != z.device:
        raise ValueError(f"{fn}: assignment is on {assignment.device} but z is on {z.device}")
    if assignment.is_floating_point():
        if assignment.dim() != 2 or assignment.shape[0] != n:
            raise ValueError(f"{fn}: soft assignment must have shape [{n}, k], got {list(assignment.shape)}")
        k = assignment.shape[1]
        if k == 0:
            raise ValueError(f"{fn}: assignment has no clusters (shape {list(assignment.shape)})")
        if num_clusters is not None and num_clusters != k:
            raise ValueError(f"{fn}: num_clusters={num_clusters} but assignment has {k} columns")
        if soft:
            q = assignment.to(z.dtype)
            # one GEMM, gradient into Q and z; a column of zeros is an empty cluster (a NaN column is not:
            # NaN in Q propagates to the loss)
            return q.t().matmul(z), ~(q.detach().sum(0) <= 0)
        labels = assignment.detach().argmax(1)  # no gradient through the argmax
        # argmax picks a NaN entry as the maximum, so the clusters alone would hide a NaN in Q: add NaN to
        # the meta-nodes instead (no host sync), as the soft path's QᵀZ does
        nan_in_q = z.new_zeros(()).masked_fill(torch.isnan(assignment.detach()).any(), math.nan)
    else:
        if assignment.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{fn}: hard assignment must be int64 labels, got {assignment.dtype}")
        if soft:
            raise ValueError(f"{fn}: soft=True needs soft assignments [n, k] (floating point), got int labels")
        if assignment.shape != (n,):
            raise ValueError(f"{fn}: hard assignment must have shape [{n}] (one label per node), "
                             f"got {list(assignment.shape)}")
        labels = assignment.long()
        nan_in_q = None
        if num_clusters is None:
            k = int(labels.max()) + 1  # host sync on CUDA: pass num_clusters to avoid it
        else:
            if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
                raise ValueError(f"{fn}: num_clusters must be a positive int, got {num_clusters!r}")
            k = num_clusters
        # Under torch.compile with num_clusters the CPU kernel range-checks the labels (a RuntimeError that
        # names the label and node) instead of this host check, so the loss traces as one graph.
        if (labels.device.type == "cpu" and not torch.compiler.is_compiling()) or num_clusters is None:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"{fn}: hard assignment labels must be in [0, {k}), got {lo if lo < 0 else hi}")

    def too_large():
        return ValueError(f"{fn}: the meta-nodes of {k} clusters ([{k}, {z.shape[1]}], {k * z.shape[1] * z.element_size()} "
                          f"bytes) do not fit in memory: is num_clusters={num_clusters!r} right?")

    # more than the machine's memory is refused before an allocation is tried (that could be granted lazily,
    # then fault at the zero fill); smaller ones that fail still say what they were for
    if z.device.type == "cpu" and k * (max(z.shape[1], 1) * z.element_size() + 8) > _PHYSICAL_MEMORY:
        raise too_large()
    try:
        sums, counts = ops.pamc_segment_sum(z, labels.contiguous(), k)
    except RuntimeError as e:  # torch.OutOfMemoryError included
        if "alloc" not in str(e) and not isinstance(e, torch.OutOfMemoryError):
            raise
        raise too_large() from None
    if nan_in_q is not None:
        sums = sums + nan_in_q
    return sums, counts > 0


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no limit from here
        return 1 << 62


_PHYSICAL_MEMORY = _physical_memory()  # read once: torch.compile does not trace os.sysconf


def _meta_term(meta: torch.Tensor, nonempty: torch.Tensor, tau: float) -> torch.Tensor:
    """(1/k′) Σ_{a non-empty} log(Σ_{b non-empty} e^{τ S_ab} + 1e−10), S_ab = cos(m_a, m_b), S_aa = 0."""
    k = meta.shape[0]
    mn = F.normalize(meta, dim=1, eps=NORM_EPS)
    eye = torch.eye(k, dtype=torch.bool, device=meta.device)
    logits = (tau * (mn @ mn.t())).masked_fill(eye, 0.0).masked_fill(~nonempty[None, :], float("-inf"))
    rows = torch.logaddexp(torch.logsumexp(logits, dim=1), logits.new_tensor(math.log(PAMC_EPS)))
    rows = torch.where(nonempty, rows, torch.zeros_like(rows))
    return rows.sum() / nonempty.sum().clamp_min(1).to(rows.dtype)


# ---- public API ---------------------------------------------------------------------------------


def pamc_loss(z: torch.Tensor, edge_index: EdgeIndex, edge_weight: torch.Tensor | None = None,
              assignment: torch.Tensor | None = None, *, tau: float = 1.0, soft: bool = False,
              reduction: str = "mean", num_clusters: int | None = None) -> torch.Tensor:
    """The PamC loss: positives from the sparse Γ, negatives from k×k meta-node pairs.

    z: [n, d] embeddings (float32/float64); edge_index: [2, E] int64, a CSR pair (rowptr, col) or a
    PamCGraph from `prepare_graph`; edge_weight: [E] Γ values (None: ones), e.g. from
    `influence_matrix`; assignment: soft [n, k] (DEC's Q) or hard [n] int64 labels. soft=False takes the
    argmax of a soft Q (no gradient through it, meta-nodes m_a = Σ z_i); soft=True uses M = QᵀZ with
    gradients into Q. reduction: "mean" (the paper's loss), "sum" or "none" (per node: the node's
    positive term plus the shared meta-node term, so that "mean" is the mean of "none").
    num_clusters: k for hard labels (default: max label + 1, a host sync on CUDA). On CUDA, labels are
    range-checked only without it (with it, a label out of range leaves its node out of the meta-nodes).
    Everything after `assignment` is keyword-only. NaN in z or in Q (soft or through the argmax) gives
    a NaN loss.

    torch.compile: with a PamCGraph (from `prepare_graph`) the loss compiles with fullgraph=True for soft
    Q, for the argmax of Q, and for hard labels with num_clusters (there, on the CPU, the kernel checks
    the labels' range: a RuntimeError instead of eager's ValueError). Host decisions remain, and compile
    with graph breaks: validating a raw edge index or CSR pair (prepare it once instead), and k = max
    label + 1 for hard labels without num_clusters (the shapes depend on the data).

    >>> import torch, lossforge
    >>> g = lossforge.stochastic_block_model(300, 3, seed=0)
    >>> ei, w = lossforge.influence_matrix(g.edge_index, 300, order=2)
    >>> z = torch.randn(300, 16, requires_grad=True)
    >>> loss = lossforge.pamc_loss(z, ei, w, assignment=g.labels)
    >>> loss.backward()
    >>> loss.shape, z.grad.shape
    (torch.Size([]), torch.Size([300, 16]))
    """
    fn = "pamc_loss"
    z = _check_z(z, fn)
    tau = _check_tau(tau, fn, z.dtype)
    _check_reduction(reduction, fn)
    if not isinstance(soft, bool):
        raise TypeError(f"{fn}: soft must be a bool, got {type(soft).__name__}")
    if assignment is None:
        raise TypeError(f"{fn}: assignment is required: soft [n, k] cluster probabilities or hard [n] labels")
    graph = _graph_for(z, edge_index, edge_weight, fn)
    lse = _positive_lse(z, graph, tau, PAMC_EPS)
    meta, nonempty = _meta_nodes(z, assignment, soft, num_clusters, fn)
    return _reduce(_meta_term(meta, nonempty, tau) - lse, reduction)


def pairwise_contrastive_loss(z: torch.Tensor, edge_index: EdgeIndex, edge_weight: torch.Tensor | None = None, *,
                              tau: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Graph-MLP's exact all-pairs contrastive loss, −(1/n) Σ_i log(P_i / N_i + 1e−8), with
    P_i = Σ_j Γ_ij e^{τ s_ij} and N_i = Σ_j e^{τ s_ij} over all n nodes (s_ii = 0).

    Computed tiled (blocks of 512 rows × 2048 columns on the CPU, 2048 × 8192 on a GPU, online
    log-sum-exp): O(n·d) memory, no n×n buffer, exact to rounding. Same graph arguments as `pamc_loss`;
    tau and reduction are keyword-only. torch.compile: fullgraph=True with a PamCGraph; a raw edge index is
    validated on the host (graph breaks), as in `pamc_loss`.

    >>> import torch, lossforge
    >>> edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    >>> z = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    >>> round(lossforge.pairwise_contrastive_loss(z, edge_index).item(), 4)
    0.5309
    """
    fn = "pairwise_contrastive_loss"
    z = _check_z(z, fn)
    tau = _check_tau(tau, fn, z.dtype)
    _check_reduction(reduction, fn)
    graph = _graph_for(z, edge_index, edge_weight, fn)
    blocks = (BLOCK_ROWS, BLOCK_COLS) if z.device.type == "cpu" else (CUDA_BLOCK_ROWS, CUDA_BLOCK_COLS)
    return _reduce(_pairwise_rows(z, graph, tau, *blocks), reduction)


def _pairwise_rows(z, graph: PamCGraph, tau: float, block_rows: int, block_cols: int) -> torch.Tensor:
    w = graph.weight.to(z.dtype)
    loss, _ = ops.pairwise_contrastive(z, graph.rowptr, graph.col, w, graph.colptr, graph.trow, graph.tedge, tau,
                                       block_rows, block_cols)
    return loss


def influence_matrix(edge_index: torch.Tensor, num_nodes: int, order: int = 2, *, influence: bool = True,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Γ from a graph, as the authors build it: Â = D̃⁻¹(A_sym + I) (A symmetrised and binary, one
    self-loop per node, rows normalised), then Γ = Σ_{p=1..order} Â^p (influence=True) or Â^order.

    Returns (edge_index [2, nnz] sorted by row, edge_weight [nnz]). Input self-loops and duplicate edges
    are absorbed (A is binary). Sparse products in torch (CPU or CUDA), computed in float64.
    influence and dtype are keyword-only.

    torch.compile: compiles with graph breaks, not fullgraph: the number of nonzeros of Γ depends on the
    graph (sparse products and coalescing), and the edge index is validated on the host. Γ is a constant
    of training: build it once, outside the compiled step.

    >>> import torch, lossforge
    >>> ei, w = lossforge.influence_matrix(torch.tensor([[0], [1]]), 3, order=1)
    >>> ei.tolist(), w.tolist()
    ([[0, 0, 1, 1, 2], [0, 1, 0, 1, 2]], [0.5, 0.5, 0.5, 0.5, 1.0])
    """
    fn = "influence_matrix"
    _check_num_nodes(num_nodes, fn)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"{fn}: order must be a positive int (the authors use 1 to 4), got {order!r}")
    if not isinstance(influence, bool):
        raise TypeError(f"{fn}: influence must be a bool, got {type(influence).__name__}")
    if dtype not in _FLOAT:
        raise TypeError(f"{fn}: dtype must be torch.float32 or torch.float64, got {dtype}")
    edge_index = _check_edge_index(edge_index, num_nodes, fn)
    n, dev = num_nodes, edge_index.device
    row, col = edge_index
    off = row != col
    loops = torch.arange(n, device=dev).expand(2, n)
    idx = torch.cat([edge_index[:, off], edge_index[:, off].flip(0), loops], dim=1)
    with warnings.catch_warnings():  # torch's notes on unchecked invariants and beta sparse formats
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1], dtype=torch.float64, device=dev), (n, n),
                                          check_invariants=False).coalesce()
        r = pattern.indices()[0]
        degree = torch.bincount(r, minlength=n).to(torch.float64)
        a_hat = torch.sparse_coo_tensor(pattern.indices(), degree.reciprocal()[r], (n, n),
                                        check_invariants=False).coalesce()
        power, gamma = a_hat, a_hat
        for _ in range(order - 1):
            power = torch.sparse.mm(power, a_hat).coalesce()
            gamma = (gamma + power).coalesce() if influence else power
    return gamma.indices().contiguous(), gamma.values().to(dtype)


# ---- seeded sparse stochastic block model -----------------------------------------------------------


class SBMGraph(NamedTuple):
    edge_index: torch.Tensor  # [2, 2m] int64, both directions, no self-loops or duplicates, sorted by row
    labels: torch.Tensor  # [n] int64 block of each node
    features: torch.Tensor | None  # [n, num_features] float32: block mean + Gaussian noise, or None


def _sample_pairs(count: int, draw, n: int, gen: torch.Generator) -> torch.Tensor:
    """`count` distinct unordered pairs (codes i * n + j, i < j) drawn uniformly from the pairs `draw`
    produces: distinct draws of iid uniform samples, then a uniform subset of the required size."""
    codes = torch.empty(0, dtype=torch.int64)
    while codes.numel() < count:
        need = count - codes.numel()
        i, j = draw(need + need // 8 + 16)
        ok = i != j
        i, j = i[ok], j[ok]
        codes = torch.unique(torch.cat([codes, torch.minimum(i, j) * n + torch.maximum(i, j)]))
    return codes[torch.randperm(codes.numel(), generator=gen)[:count]]


def stochastic_block_model(num_nodes: int, num_blocks: int, avg_degree: float = 10.0, homophily: float = 0.8,
                           num_features: int | None = None, feature_noise: float = 1.0, seed: int = 0,
                           device: str | torch.device = "cpu") -> SBMGraph:
    """A seeded sparse stochastic block model (planted partition), generated in O(n + E).

    Nodes fall into `num_blocks` blocks of equal size (±1, random membership). Every pair inside a block
    is an edge with probability p_in, every pair across blocks with probability p_out, chosen so that a
    node's expected degree is `avg_degree` and a fraction `homophily` of it stays inside its block. The
    edges are an exact draw of that model: the number of edges of each kind is Binomial, the edges
    themselves a uniform subset of the candidate pairs. With `num_features`, node features are the
    block's random mean (unit Gaussian) plus `feature_noise` times unit Gaussian noise.

    torch.compile: compiles with graph breaks, not fullgraph: it draws from its own seeded host
    torch.Generator (which a compiled graph cannot create) and samples distinct edges by rejection, a
    loop whose length depends on the draws. It is data generation, run once before training.

    >>> import lossforge
    >>> g = lossforge.stochastic_block_model(100, 4, avg_degree=6.0, num_features=8, seed=1)
    >>> g.edge_index.shape[0], g.labels.shape, g.features.shape, g.labels.bincount().tolist()
    (2, torch.Size([100]), torch.Size([100, 8]), [25, 25, 25, 25])
    """
    fn = "stochastic_block_model"
    _check_num_nodes(num_nodes, fn)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 1 <= num_blocks <= max(num_nodes, 1):
        raise ValueError(f"{fn}: num_blocks must be an int in [1, num_nodes={num_nodes}], got {num_blocks!r}")
    if not (isinstance(avg_degree, (int, float)) and avg_degree >= 0 and math.isfinite(avg_degree)):
        raise ValueError(f"{fn}: avg_degree must be a finite non-negative number, got {avg_degree!r}")
    if not (isinstance(homophily, (int, float)) and 0.0 <= homophily <= 1.0):
        raise ValueError(f"{fn}: homophily must be in [0, 1], got {homophily!r}")
    if num_features is not None and (isinstance(num_features, bool) or not isinstance(num_features, int)
                                     or num_features < 1):
        raise ValueError(f"{fn}: num_features must be a positive int or None, got {num_features!r}")
    n, k = num_nodes, num_blocks
    gen = torch.Generator().manual_seed(int(seed))
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    sizes = torch.bincount(labels, minlength=k)
    members = torch.argsort(labels, stable=True)  # nodes grouped by block
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    intra_pairs = int((sizes * (sizes - 1) // 2).sum())
    inter_pairs = n * (n - 1) // 2 - intra_pairs
    mean_block = n / k
    p_in = min(1.0, avg_degree * homophily / (mean_block - 1)) if mean_block > 1 else 0.0
    p_out = min(1.0, avg_degree * (1 - homophily) / (n - mean_block)) if n > mean_block else 0.0
    if (mean_block > 1 and avg_degree * homophily > mean_block - 1 + 1e-9) or \
            (n > mean_block and avg_degree * (1 - homophily) > n - mean_block + 1e-9):
        raise ValueError(f"{fn}: avg_degree={avg_degree} is too large for {n} nodes in {k} blocks")

    def binomial(total: int, p: float) -> int:
        if total == 0 or p == 0.0:
            return 0
        return int(torch.binomial(torch.tensor([float(total)], dtype=torch.float64),
                                  torch.tensor([p], dtype=torch.float64), generator=gen))

    block_weight = (sizes * (sizes - 1)).to(torch.float64)

    def draw_intra(m):
        b = torch.multinomial(block_weight, m, replacement=True, generator=gen)
        s, o = sizes[b], starts[b]
        i = o + (torch.rand(m, generator=gen, dtype=torch.float64) * s).long().clamp_max(s - 1)
        j = o + (torch.rand(m, generator=gen, dtype=torch.float64) * s).long().clamp_max(s - 1)
        return members[i], members[j]

    def draw_inter(m):
        i = torch.randint(0, n, (m,), generator=gen)
        j = torch.randint(0, n, (m,), generator=gen)
        same = labels[i] == labels[j]
        return i, torch.where(same, i, j)  # same-block draws become self-pairs, dropped by the sampler

    codes = [torch.empty(0, dtype=torch.int64)]
    if intra_pairs and block_weight.sum() > 0:
        codes.append(_sample_pairs(binomial(intra_pairs, p_in), draw_intra, n, gen))
    if inter_pairs:
        codes.append(_sample_pairs(binomial(inter_pairs, p_out), draw_inter, n, gen))
    code = torch.cat(codes)
    i, j = code // max(n, 1), code % max(n, 1)
    both = torch.cat([torch.stack([i, j]), torch.stack([j, i])], dim=1)
    both = both[:, torch.argsort(both[0] * n + both[1])]
    features = None
    if num_features is not None:
        means = torch.randn(k, num_features, generator=gen)
        features = means[labels] + feature_noise * torch.randn(n, num_features, generator=gen)
        features = features.to(device)
    return SBMGraph(both.to(device), labels.to(device), features)


class GraphCache:
    """Remembers the last prepared graph, keyed on the identity and version of the edge tensors, so a
    training loop that passes the same edge_index every step validates and sorts it only once."""

    def __init__(self):
        self._key = None
        self._graph: PamCGraph | None = None

    @staticmethod
    def _tensors(edge_index, edge_weight):
        parts = list(edge_index) if isinstance(edge_index, (tuple, list)) else [edge_index]
        return parts + ([edge_weight] if edge_weight is not None else [])

    def get(self, z: torch.Tensor, edge_index, edge_weight, fn: str) -> PamCGraph:
        if isinstance(edge_index, PamCGraph):
            return _graph_for(z, edge_index, edge_weight, fn)
        tensors = self._tensors(edge_index, edge_weight)
        if all(isinstance(t, torch.Tensor) for t in tensors):
            key = (tuple(tensors), tuple(t._version for t in tensors), edge_weight is None, z.shape[0], z.device)
            if self._key is not None and len(self._key[0]) == len(key[0]) \
                    and all(a is b for a, b in zip(self._key[0], key[0])) and self._key[1:] == key[1:]:
                return self._graph
        graph = _graph_for(z, edge_index, edge_weight, fn)
        if all(isinstance(t, torch.Tensor) for t in tensors):
            self._key, self._graph = key, graph
        return graph
