"""M-FAC: matrix-free inverse-Hessian-vector products (IHVPs) with the empirical Fisher.

Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information"
(NeurIPS 2021). With the gradients as the rows of G [m, d] and the
damping lambda:

    F = lambda I + G^T G / m,     F^-1 x = (x - G^T K^-1 G x) / lambda,   K = m lambda I + G G^T  (m x m)

(K here is lambda times the other common form m I + G G^T / lambda: the same factorisation, no 1/lambda scaling.)

- `StaticIHVP(grads, damp)`: a fixed set of gradients (pruning): O(m^2 d) precompute as blocked matrix
  products, then `mul(x)` in two passes over an m x d matrix and `inverse_diagonal()` in one.
- `BlockIHVP(grads, block_size, damp)`: F block-diagonal over contiguous blocks of coordinates.
- `SlidingWindowIHVP(dim, m, damp, ...)`: the dynamic algorithm (optimization): a ring buffer of the
  last m gradients; one `update_mul(g)` = pass 1 over G (t = G g, fused with writing g into its row),
  an O(m^2) update of a float64 Cholesky factor of K and a solve, pass 2 over G (y = (g - G^T b) /
  lambda). `lossforge.optim.MFAC` fuses pass 2 with the parameter update.

The passes are C++/CUDA kernels (torch.ops.lossforge.mfac_*); the m x m algebra is torch (float64).
"""
from __future__ import annotations

import contextlib
import math

import torch

from ._ops import cuda_kernels_loaded, ops, register_fake

__all__ = ["StaticIHVP", "BlockIHVP", "SlidingWindowIHVP"]

_STORAGE = (torch.float32, torch.float64, torch.bfloat16)


# ---- op registrations --------------------------------------------------------------------------

def _compute_dtype(storage: torch.dtype) -> torch.dtype:
    return torch.float64 if storage == torch.float64 else torch.float32


# The fake kernels repeat the kernels' own checks (csrc/mfac/mfac_host.h, mfac_cpu.cpp) with torch._check, so a
# direct torch.ops.lossforge.mfac_* call under torch.compile fails with the same message as in eager.

def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fake_buffer(G: torch.Tensor, op: str) -> torch.dtype:
    torch._check(G.dim() == 2, lambda: f"{op}: G must be 2-D [m, d], got {G.dim()}-D")
    torch._check(G.dtype in _STORAGE, lambda: f"{op}: G must be float32, float64 or bfloat16, got {_name(G.dtype)}")
    torch._check(G.shape[1] <= 1 or G.stride(1) == 1, lambda: f"{op}: G's rows must be contiguous (stride(1) == 1)")
    torch._check(G.shape[0] <= 1 or G.stride(0) >= G.shape[1], lambda: f"{op}: G's row stride must be at least d")
    return _compute_dtype(G.dtype)


def _fake_vector(t: torch.Tensor, want: torch.dtype, op: str, arg: str) -> None:
    torch._check(t.dtype == want, lambda: f"{op}: {arg} must be {_name(want)}, got {_name(t.dtype)}")
    torch._check(t.is_contiguous(), lambda: f"{op}: {arg} must be contiguous")


def _fake_count(x: torch.Tensor, d: int, op: str, arg: str) -> int:
    torch._check(x.dim() in (1, 2), lambda: f"{op}: {arg} must be [d] or [k, d], got {x.dim()}-D")
    torch._check(x.shape[-1] == d, lambda: f"{op}: {arg} must have d = {d} columns, got {x.shape[-1]}")
    return x.shape[0] if x.dim() == 2 else 1


def _fake_list(xs, want: torch.dtype, d: int, op: str, arg: str) -> list:
    for t in xs:
        _fake_vector(t, want, op, arg)
    total = sum(t.numel() for t in xs)
    torch._check(total == d, lambda: f"{op}: the tensors of {arg} have {total} elements in all, expected d = {d}")
    return [t.numel() for t in xs]


def _fake_params_like(ps, sizes, want: torch.dtype, op: str, arg: str) -> None:
    torch._check(len(ps) == len(sizes),
                 lambda: f"{op}: {arg} must have one tensor per gradient ({len(sizes)}), got {len(ps)}")
    for i, (p, n) in enumerate(zip(ps, sizes)):
        _fake_vector(p, want, op, arg)
        torch._check(p.numel() == n, lambda p=p, i=i, n=n: f"{op}: {arg}[{i}] has {p.numel()} elements, expected {n}")


def _fake_square(U: torch.Tensor, op: str, what: str) -> int:
    torch._check(U.dtype == torch.float64, lambda: f"{op}: U must be float64, got {_name(U.dtype)}")
    torch._check(U.dim() == 2 and U.shape[0] == U.shape[1], lambda: f"{op}: {what}")
    return U.shape[0]


@register_fake("lossforge::mfac_gemv")
def _gemv_fake(G, x):
    op = "mfac_gemv"
    acc = _fake_buffer(G, op)
    _fake_vector(x, acc, op, "x")
    _fake_count(x, G.shape[1], op, "x")
    return x.new_empty((*x.shape[:-1], G.shape[0]))


@register_fake("lossforge::mfac_gemv_t")
def _gemv_t_fake(G, b, x, alpha, beta):
    op = "mfac_gemv_t"
    acc = _fake_buffer(G, op)
    _fake_vector(b, acc, op, "b")
    V = _fake_count(b, G.shape[0], op, "b")
    if x is not None:
        _fake_vector(x, acc, op, "x")
        torch._check(x.dim() == b.dim() and _fake_count(x, G.shape[1], op, "x") == V,
                     lambda: f"{op}: x must be [d] or [k, d] matching b's [m] or [k, m]")
    return b.new_empty((*b.shape[:-1], G.shape[1]))


@register_fake("lossforge::mfac_insert_gemv_")
def _insert_fake(G, row, grads, params, weight_decay):
    op = "mfac_insert_gemv_"
    acc = _fake_buffer(G, op)
    m, d = G.shape
    torch._check(0 <= row < m, lambda: f"{op}: row {row} is out of range for a buffer of m = {m} rows")
    sizes = _fake_list(grads, acc, d, op, "grads")
    if params:
        _fake_params_like(params, sizes, acc, op, "params")
    return G.new_empty((m,), dtype=torch.float64)


@register_fake("lossforge::mfac_step_")
def _step_fake(G, b, params, grads, momentum_buffer, alpha, beta, lr, weight_decay, momentum):
    op = "mfac_step_"
    acc = _fake_buffer(G, op)
    m, d = G.shape
    _fake_vector(b, acc, op, "b")
    torch._check(b.dim() == 1 and b.shape[0] == m, lambda: f"{op}: b must have shape [m] = [{m}]")
    sizes = _fake_list(grads, acc, d, op, "grads")
    _fake_params_like(params, sizes, acc, op, "params")
    torch._check(0.0 <= momentum < 1.0, lambda: f"{op}: momentum must be in [0, 1), got {momentum}")
    if momentum > 0.0:
        torch._check(momentum_buffer is not None, lambda: f"{op}: momentum > 0 needs a momentum_buffer")
    if momentum_buffer is not None:
        _fake_vector(momentum_buffer, acc, op, "momentum_buffer")
        torch._check(momentum_buffer.numel() == d, lambda: f"{op}: momentum_buffer must have d = {d} elements")
    return None


@register_fake("lossforge::mfac_chol_solve")
def _chol_solve_fake(U, t):
    op = "mfac_chol_solve"
    n = _fake_square(U, op, "U must be square [n, n]")
    torch._check(U.shape[1] <= 1 or U.stride(1) == 1, lambda: f"{op}: U's rows must be contiguous")
    _fake_vector(t, torch.float64, op, "t")
    torch._check(t.dim() in (1, 2) and t.shape[0] == n, lambda: f"{op}: t must be [n] or [n, k] with n = {n}")
    return torch.empty_like(t)


@register_fake("lossforge::mfac_chol_replace_oldest_")
def _replace_fake(U, k, shift):
    op = "mfac_chol_replace_oldest_"
    torch._check(U.dtype == torch.float64, lambda: f"{op}: U must be float64, got {_name(U.dtype)}")
    torch._check(U.is_contiguous(), lambda: f"{op}: U must be contiguous")
    n = _fake_square(U, op, "U must be square [n, n], n >= 1")
    torch._check(n >= 1, lambda: f"{op}: U must be square [n, n], n >= 1")
    _fake_vector(k, torch.float64, op, "k")
    torch._check(k.dim() == 1 and k.shape[0] == n, lambda: f"{op}: k must have shape [n] = [{n}]")
    return U.new_empty((1,))


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v b_v^T for a [m] or [k, m] and b [d] or [k, d]."""
    return torch.outer(a, b) if a.dim() == 1 else a.T @ b


def _gemv_setup(ctx, inputs, output):
    G, x = inputs
    ctx.save_for_backward(G if ctx.needs_input_grad[1] else None, x if ctx.needs_input_grad[0] else None)


def _gemv_backward(ctx, gt):
    G, x = ctx.saved_tensors
    gG = gx = None
    if ctx.needs_input_grad[0]:
        gG = _outer(gt, x).to(x.dtype)
    if ctx.needs_input_grad[1]:
        gx = ops.mfac_gemv_t(G, gt.contiguous(), None, 1.0, 0.0)
    return gG, gx


def _gemv_t_setup(ctx, inputs, output):
    G, b, x, alpha, beta = inputs
    ctx.alpha, ctx.beta = alpha, beta
    ctx.save_for_backward(G if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)


def _gemv_t_backward(ctx, gy):
    G, b = ctx.saved_tensors
    gG = gb = gx = None
    gy = gy.contiguous()
    if ctx.needs_input_grad[0]:
        gG = ctx.alpha * _outer(b, gy)
    if ctx.needs_input_grad[1]:
        gb = ctx.alpha * ops.mfac_gemv(G, gy)
    if ctx.needs_input_grad[2]:
        gx = ctx.beta * gy
    return gG, gb, gx, None, None


def _chol_solve_setup(ctx, inputs, output):
    U, t = inputs
    ctx.save_for_backward(U)


def _chol_solve_backward(ctx, gb):  # b = K^-1 t with K symmetric: dt = K^-1 db (no gradient for U)
    (U,) = ctx.saved_tensors
    return None, ops.mfac_chol_solve(U, gb.contiguous())


torch.library.register_autograd("lossforge::mfac_gemv", _gemv_backward, setup_context=_gemv_setup)
torch.library.register_autograd("lossforge::mfac_chol_solve", _chol_solve_backward, setup_context=_chol_solve_setup)
torch.library.register_autograd("lossforge::mfac_gemv_t", _gemv_t_backward, setup_context=_gemv_t_setup)


# ---- validation ---------------------------------------------------------------------------------

def _check_damp(damp) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)):
        raise TypeError(f"damp must be a float, got {type(damp).__name__}")
    damp = float(damp)
    if not (damp > 0 and math.isfinite(damp)):
        raise ValueError(f"damp must be positive and finite, got {damp}")
    return damp


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_grads(grads, name: str = "grads") -> torch.Tensor:
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"{name} must be 2-D [m, d] (one gradient per row), got shape {tuple(grads.shape)}")
    if grads.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {grads.dtype}")
    if grads.shape[0] < 1 or grads.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(grads.shape)}")
    _check_device(grads.device, name)
    if not bool(torch.isfinite(grads).all()):
        raise ValueError(f"{name} contains inf or NaN")
    return grads


def _check_device(device: torch.device, what: str) -> torch.device:
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} must be on the CPU or a CUDA device, got {device}")
    if device.type == "cuda" and not cuda_kernels_loaded():
        raise RuntimeError(f"{what} is on {device} but lossforge was built without its CUDA kernels "
                           "(rebuild with FORCE_CUDA=1, or use the CPU)")
    return device


def _check_vector(x, d: int, dtype: torch.dtype, device: torch.device, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (1, 2) or x.shape[-1] != d:
        raise ValueError(f"{name} must have shape [{d}] or [k, {d}], got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (lossforge never moves tensors silently)")
    return x.contiguous()


# The largest |entry| a vector inserted into a window may have: pass 1 adds up to 4096 products of two
# such entries per column chunk in the compute dtype, which must not overflow (float32: 2^56 ~ 7.2e16,
# so a chunk sums to at most 2^124; float64: 2^500).
_MAX_INSERTED = {torch.float32: 2.0 ** 56, torch.float64: 2.0 ** 500}


def _check_insertable(segments, dtype: torch.dtype) -> None:
    """Raises ValueError, before anything changes, when a vector a window would insert (grads + weight_decay
    * params, per segment) has a NaN or inf, or an entry too large for the compute dtype's accumulation.
    segments: [(grads, params, weight_decay)], grads and params lists of (name, tensor). One reduction and
    one host sync."""
    def amax(named, device):
        vals = [t.abs().amax() for _, t in named if t.numel()]
        return torch.stack(vals).amax() if vals else torch.zeros((), dtype=dtype, device=device)

    bounds = []
    for grads, params, wd in segments:
        if grads:
            device = grads[0][1].device
            bounds.append(amax(grads, device) + wd * amax(params, device) if wd else amax(grads, device))
    if not bounds:
        return
    bound = float(torch.stack(bounds).amax())
    if bound <= _MAX_INSERTED[dtype]:  # False for NaN
        return
    for grads, params, wd in segments:
        for name, t in grads + (params if wd else []):
            bad = ~torch.isfinite(t.reshape(-1))
            if bool(bad.any()):
                j = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name} has a non-finite entry ({float(t.reshape(-1)[j])} at flat index {j}): "
                                 "nothing was changed (skip this step, as AMP's GradScaler does)")
    raise ValueError(f"an entry of magnitude {bound:.3g} (gradient plus weight decay) is too large for the "
                     f"{str(dtype).replace('torch.', '')} accumulation of the window's dot products (at most "
                     f"{_MAX_INSERTED[dtype]:.3g}); nothing was changed: scale the loss down, or use float64")


def _blocked_columns(d: int, m: int, budget: int = 1 << 24):
    """Column ranges of G [m, d] with at most ~budget elements each (bounded float64 temporaries)."""
    step = max(1, budget // max(m, 1))
    return [(s, min(d, s + step)) for s in range(0, d, step)]


def _cholesky_upper(K: torch.Tensor, what: str) -> torch.Tensor:
    U, info = torch.linalg.cholesky_ex(K, upper=True)
    if bool((info != 0).any()):
        raise RuntimeError(
            f"{what}: the m x m matrix m*damp*I + G G^T is not numerically positive definite in float64 "
            "(gradients with inf/NaN, or damp far too small for their scale): increase damp")
    return U


def _chol_solve(U: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(U^T U)^-1 t for an upper U (float64): single-threaded C++ on the CPU, cuBLAS/cuSOLVER on CUDA."""
    if U.is_cuda:
        return torch.linalg.solve_triangular(U, torch.linalg.solve_triangular(U.mT, t, upper=False), upper=True)
    return ops.mfac_chol_solve(U, t)


# ---- static ---------------------------------------------------------------------------------------

class StaticIHVP:
    """F^-1 x and diag(F^-1) for F = damp I + G^T G / m with a fixed set of m gradients (pruning).

    Precompute (O(m^2 d), blocked matrix products in float64): K = m damp I + G G^T = U^T U and
    W = U^-T G [m, d] (rows: the paper's v_i / sqrt(q_i), up to sqrt(damp)), kept in grads' dtype.
    Then F^-1 x = (x - W^T W x) / damp (two passes over W) and [F^-1]_jj = (1 - sum_i W_ij^2) / damp.
    For small damp the results cancel heavily: pass float64 gradients for float64 accuracy.
    torch.compile: `mul` and `inverse_diagonal` compile with fullgraph=True.

    >>> import torch, lossforge
    >>> G = torch.randn(8, 100, dtype=torch.float64)
    >>> H = lossforge.mfac.StaticIHVP(G, damp=1e-2)
    >>> F = 1e-2 * torch.eye(100, dtype=torch.float64) + G.T @ G / 8
    >>> x = torch.randn(100, dtype=torch.float64)
    >>> torch.allclose(H.mul(x), torch.linalg.solve(F, x))
    True
    >>> torch.allclose(H.inverse_diagonal(), torch.linalg.inv(F).diagonal())
    True
    """

    def __init__(self, grads: torch.Tensor, damp: float = 1e-5) -> None:
        grads = _check_grads(grads).contiguous()
        self.damp = _check_damp(damp)
        self.m, self.d = grads.shape
        self.dtype, self.device = grads.dtype, grads.device
        m, d = self.m, self.d
        K = torch.zeros(m, m, dtype=torch.float64, device=self.device)
        cols = _blocked_columns(d, m)
        for s, e in cols:
            Gb = grads[:, s:e].double()
            K.addmm_(Gb, Gb.T)
        K.diagonal().add_(m * self.damp)
        U = _cholesky_upper(K, "StaticIHVP")
        W = torch.empty_like(grads)
        for s, e in cols:
            W[:, s:e] = torch.linalg.solve_triangular(U.T, grads[:, s:e].double(), upper=False)
        self.W = W

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x [d] or [k, d] (grads' dtype and device); differentiable in x."""
        x = _check_vector(x, self.d, self.dtype, self.device)
        t = ops.mfac_gemv(self.W, x)
        return ops.mfac_gemv_t(self.W, t, x, -1.0 / self.damp, 1.0 / self.damp)

    def inverse_diagonal(self) -> torch.Tensor:
        """diag(F^-1) [d]: (1 - sum_i W_ij^2) / damp (O(m) per entry)."""
        acc = torch.zeros(self.d, dtype=self.dtype, device=self.device)
        for s, e in _blocked_columns(self.d, self.m):
            acc[s:e] = torch.linalg.vector_norm(self.W[:, s:e], dim=0).square()
        return (1.0 - acc) / self.damp


class BlockIHVP:
    """F block-diagonal: F_b = damp I + G_b^T G_b / m on contiguous blocks of `block_size` coordinates
    (the last block may be smaller; it is zero-padded internally, which leaves F unchanged).

    Blocks no larger than m keep the dense block inverses (d * block_size numbers); larger blocks keep
    the Woodbury form per block (W_b = U_b^-T G_b, m * d numbers). Batched float64 factorisations.
    torch.compile: `mul` and `inverse_diagonal` compile with fullgraph=True.

    >>> import torch, lossforge
    >>> G = torch.randn(8, 100, dtype=torch.float64)
    >>> H = lossforge.mfac.BlockIHVP(G, block_size=25, damp=1e-2)
    >>> x = torch.randn(100, dtype=torch.float64)
    >>> first = lossforge.mfac.StaticIHVP(G[:, :25].contiguous(), damp=1e-2)  # F's first block alone
    >>> torch.allclose(H.mul(x)[:25], first.mul(x[:25].contiguous()))
    True
    >>> H.inverse_diagonal().shape
    torch.Size([100])
    """

    def __init__(self, grads: torch.Tensor, block_size: int, damp: float = 1e-5) -> None:
        grads = _check_grads(grads).contiguous()
        self.block_size = _check_int("block_size", block_size, 1)
        self.damp = _check_damp(damp)
        self.m, self.d = grads.shape
        self.dtype, self.device = grads.dtype, grads.device
        m, d, B = self.m, self.d, self.block_size
        self.nblocks = -(-d // B)
        pad = self.nblocks * B - d
        Gp = torch.nn.functional.pad(grads, (0, pad)).reshape(m, self.nblocks, B).permute(1, 0, 2).double()
        self.dense = B <= m
        if self.dense:
            F = Gp.transpose(1, 2) @ Gp / m
            F.diagonal(dim1=1, dim2=2).add_(self.damp)
            L, info = torch.linalg.cholesky_ex(F)
            if bool((info != 0).any()):
                raise RuntimeError("BlockIHVP: a block of F is not numerically positive definite: increase damp")
            self.Finv = torch.cholesky_inverse(L).to(self.dtype)  # [nb, B, B]
        else:
            K = Gp @ Gp.transpose(1, 2)
            K.diagonal(dim1=1, dim2=2).add_(m * self.damp)
            U = _cholesky_upper(K, "BlockIHVP")
            self.W = torch.linalg.solve_triangular(U.transpose(1, 2), Gp, upper=False).to(self.dtype)  # [nb, m, B]
        del Gp

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:  # [k, d] -> [nb, B, k]
        pad = self.nblocks * self.block_size - self.d
        xp = torch.nn.functional.pad(x, (0, pad))
        return xp.reshape(x.shape[0], self.nblocks, self.block_size).permute(1, 2, 0)

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x [d] or [k, d]; differentiable in x."""
        x = _check_vector(x, self.d, self.dtype, self.device)
        xb = self._blocks(x.reshape(-1, self.d))
        if self.dense:
            yb = self.Finv @ xb
        else:
            yb = (xb - self.W.transpose(1, 2) @ (self.W @ xb)) / self.damp
        y = yb.permute(2, 0, 1).reshape(-1, self.nblocks * self.block_size)[:, : self.d]
        return y.reshape(x.shape)

    def inverse_diagonal(self) -> torch.Tensor:
        """diag(F^-1) [d]."""
        if self.dense:
            diag = self.Finv.diagonal(dim1=1, dim2=2)
        else:
            diag = (1.0 - self.W.square().sum(1)) / self.damp
        return diag.reshape(-1)[: self.d].clone()


# ---- sliding window (dynamic algorithm) ------------------------------------------------------------

class SlidingWindowIHVP:
    """F^-1 x with F = damp I + (1/s) sum of the last m gradients g g^T (the dynamic algorithm).

    Args:
      dim: the number of coordinates of a gradient held here (with `process_group`: this rank's slice).
      m: the window size (any m >= 1).
      damp: lambda.
      dtype: the dtype of gradients and results: float32 or float64.
      device: where G lives (CPU or CUDA).
      storage_dtype: the dtype of the buffer G: dtype (default), or bfloat16 (float32 dtype only; halves
        the bytes each pass reads; the products accumulate in float32; the window holds g.bfloat16(), and
        `update_mul` preconditions that stored gradient: see there).
      warmup: what F is while fewer than m gradients were inserted. "scaled" (default, the spec's):
        s = min(steps, m), damp I plus the average of g g^T over the gradients seen so far; "zeros": the
        official code's zero-filled buffer, s = m from the first step (the missing gradients count as
        zeros). The same operator once m gradients were inserted. `lossforge.optim.MFAC` defaults to
        "zeros", the paper's optimizer.
      refactor_every: refactor the m x m factor from the float64 Gram matrix every this many
        incremental updates (0: never). Each update in between is O(m^2).
      process_group: a torch.distributed group: G is sharded along d across its ranks (each passes its
        slice of every vector); the m-vectors are all-reduced and the m x m algebra is replicated.

    State: G [m, dim] (ring buffer, slot = step % m), the float64 Gram matrix G G^T [m, m], and the upper
    Cholesky factor U of K = s damp I + G G^T in age order (oldest gradient first), so that replacing
    the oldest gradient is "drop the first row and column" (a stable rank-1 update) plus "append one"
    (a triangular solve), O(m^2) in all.

    torch.compile: `mul` compiles with fullgraph=True. `update` and `update_mul` compile with graph
    breaks: inserting a gradient makes host decisions by design, whether g may enter the window (NaN, inf
    or too large an entry raises before anything changes, so a training loop can skip the step) and
    whether the O(m^2) factor update kept its accuracy or the factor is refactored.

    >>> import torch, lossforge
    >>> W = lossforge.mfac.SlidingWindowIHVP(100, 4, damp=1e-2, dtype=torch.float64)
    >>> G = torch.randn(6, 100, dtype=torch.float64)
    >>> for g in G:
    ...     W.update(g)
    >>> x = torch.randn(100, dtype=torch.float64)
    >>> last4 = lossforge.mfac.StaticIHVP(G[-4:], damp=1e-2)  # the window holds the last 4 gradients
    >>> torch.allclose(W.mul(x), last4.mul(x))
    True
    """

    def __init__(self, dim: int, m: int, damp: float = 1e-5, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, storage_dtype: torch.dtype | None = None, *,
                 warmup: str = "scaled", refactor_every: int = 64,
                 process_group: "torch.distributed.ProcessGroup | None" = None) -> None:
        self.dim = _check_int("dim", dim, 1)
        self.m = _check_int("m", m, 1)
        self.damp = _check_damp(damp)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        storage_dtype = dtype if storage_dtype is None else storage_dtype
        if storage_dtype not in _STORAGE:
            raise TypeError(f"storage_dtype must be float32, float64 or bfloat16, got {storage_dtype}")
        if _compute_dtype(storage_dtype) != dtype:
            raise TypeError(f"storage_dtype {storage_dtype} needs dtype {_compute_dtype(storage_dtype)}, got {dtype} "
                            "(bfloat16 storage computes in float32; float64 storage in float64)")
        if warmup not in ("scaled", "zeros"):
            raise ValueError(f"warmup must be 'scaled' or 'zeros', got {warmup!r}")
        self.refactor_every = _check_int("refactor_every", refactor_every, 0)
        self.dtype, self.storage_dtype, self.warmup = dtype, storage_dtype, warmup
        self.device = _check_device(torch.device(device) if device is not None else torch.device("cpu"),
                                    "SlidingWindowIHVP")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.process_group = process_group
        self.G = torch.zeros(self.m, self.dim, dtype=storage_dtype, device=self.device)
        self.gram = torch.zeros(self.m, self.m, dtype=torch.float64, device=self.device)
        self.U = torch.zeros(self.m, self.m, dtype=torch.float64, device=self.device)
        self.count = 0
        self.since_refactor = 0
        if warmup == "zeros":
            self._refactor()

    # -- window bookkeeping --
    @property
    def size(self) -> int:
        """Rows of G in the window (zeros mode: always m)."""
        return self.m if self.warmup == "zeros" else min(self.count, self.m)

    @property
    def scale(self) -> int:
        """s in F = damp I + G^T G / s."""
        return self.size

    def _full(self) -> bool:
        return self.warmup == "zeros" or self.count >= self.m

    def _rows(self) -> int:
        """Leading rows of G the passes read (the others are still zero in scaled warm-up)."""
        return self.m if self._full() else self.count

    def _order(self) -> torch.Tensor:
        """Slots of the window's gradients in age order (oldest first)."""
        if self._full():
            start = self.count % self.m
            return (torch.arange(self.m, device=self.device) + start) % self.m
        return torch.arange(self.count, device=self.device)

    def _allreduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.process_group is not None:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        return t

    def _refactor(self):
        n = self.size
        if n:
            idx = self._order()
            K = self.gram[idx][:, idx]
            K.diagonal().add_(self.scale * self.damp)
            U = _cholesky_upper(K, "SlidingWindowIHVP")  # raises before U changes
            self.U.zero_()
            self.U[:n, :n] = U
        else:
            self.U.zero_()
        self.since_refactor = 0

    def _snapshot(self):
        """What an insertion changes: G's next row, the Gram row and column, the factor, the counters."""
        r = self.count % self.m
        return r, self.G[r].clone(), self.gram[r].clone(), self.U.clone(), self.count, self.since_refactor

    def _restore(self, snap):
        r, row, gram_row, U, count, since = snap
        self.G[r] = row
        self.gram[r] = gram_row
        self.gram[:, r] = gram_row
        self.U.copy_(U)
        self.count, self.since_refactor = count, since

    def _insert(self, segments) -> torch.Tensor:
        """Pass 1 with the insertion. segments: [(col, len, grads, params, weight_decay)] covering [0, dim).
        Returns G x_s [rows] float64 (x_s: the inserted vector as stored), all-reduced."""
        r = self.count % self.m
        rows = self.m if self._full() else self.count + 1
        G = self.G[:rows]
        dots = None
        for col, n, grads, params, wd in segments:
            Gs = G if (col == 0 and n == self.dim) else G.narrow(1, col, n)
            part = ops.mfac_insert_gemv_(Gs, r, grads, params, float(wd))
            dots = part if dots is None else dots + part
        dots = self._allreduce(dots)
        self.gram[r, :rows] = dots
        self.gram[:rows, r] = dots
        self.count += 1
        self._update_factor(r)
        return dots

    def _update_factor(self, r: int):
        if not self._full() or self.count == self.m and self.warmup == "scaled":
            self._refactor()  # scaled warm-up: s changes every step, K is only count x count
            return
        idx = self._order()  # newest (slot r) last
        shift = self.scale * self.damp
        piv = ops.mfac_chol_replace_oldest_(self.U, self.gram[r, idx].contiguous(), shift)
        # piv >= s damp in exact arithmetic; far below it means the update lost accuracy: refactor. (One
        # host sync per step on CUDA: the algorithm needs the decision.)
        if not bool(piv[0] > 0.5 * shift):
            self._refactor()
            return
        self.since_refactor += 1
        if self.refactor_every and self.since_refactor >= self.refactor_every:
            self._refactor()

    def _solve(self, t: torch.Tensor) -> torch.Tensor:
        """b = K^-1 t for t [rows] or [k, rows] (slot order, float64) -> compute dtype, slot order."""
        idx = self._order()
        n = idx.numel()
        tt = t.reshape(-1, t.shape[-1]).T[idx]  # [n, k] in age order
        b_age = _chol_solve(self.U[:n, :n], tt.contiguous())
        b = torch.empty_like(b_age)
        b[idx] = b_age
        return b.T.reshape(t.shape).to(self.dtype).contiguous()

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """Whatever raises inside (a factor that is not positive definite, an interrupt) restores the window
        as it was before the block."""
        snap = self._snapshot()
        try:
            yield
        except BaseException:
            self._restore(snap)
            raise

    # -- public API --
    def update(self, g: torch.Tensor) -> None:
        """Insert g [dim] into the window (replacing the oldest gradient once the window is full).

        A g with NaN or inf (or, in float32, an entry above 2^56) raises ValueError and changes nothing,
        so a training loop can skip that step and go on."""
        g = self._check_g(g)
        with self._all_or_nothing():
            self._insert([(0, self.dim, [g], [], 0.0)])

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        """Insert g, then return F^-1 g with the new window (one pass 1, one pass 2). Bad g: as `update`.

        With bfloat16 storage this is F^-1 g_s with g_s = g.bfloat16(), the gradient as the window holds
        it: g_s lies in the window's span, while the rounding residual g - g_s does not, and F^-1 would
        scale that residual by 1 / damp (for small damp, far more than the whole preconditioned step).
        """
        g = self._check_g(g)
        r = self.count % self.m
        with self._all_or_nothing():
            b = self._solve(self._insert([(0, self.dim, [g], [], 0.0)]))
        G = self.G[: self._rows()]
        x = g if self.storage_dtype == self.dtype else self.G[r].to(self.dtype)
        return ops.mfac_gemv_t(G, b, x, -1.0 / self.damp, 1.0 / self.damp)

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x [dim] or [k, dim]; differentiable in x (single process)."""
        x = _check_vector(x, self.dim, self.dtype, self.device)
        rows = self._rows()
        if self.size == 0:
            return x / self.damp
        G = self.G[:rows]
        t = self._allreduce(ops.mfac_gemv(G, x).double())
        b = self._solve(t)
        return ops.mfac_gemv_t(G, b, x, -1.0 / self.damp, 1.0 / self.damp)

    def _check_g(self, g) -> torch.Tensor:
        g = _check_vector(g, self.dim, self.dtype, self.device, "g")
        if g.dim() != 1:
            raise ValueError(f"g must have shape [{self.dim}], got {tuple(g.shape)}")
        _check_insertable([([("g", g)], [], 0.0)], self.dtype)  # NaN/inf raises before anything changes
        return g

    # -- state --
    def state_dict(self) -> dict:
        """The window's tensors (references, like torch.optim) and counters."""
        return {"G": self.G, "gram": self.gram, "U": self.U, "count": self.count,
                "since_refactor": self.since_refactor, "m": self.m, "dim": self.dim, "damp": self.damp,
                "warmup": self.warmup, "storage_dtype": str(self.storage_dtype).replace("torch.", "")}

    def _check_state(self, state) -> None:
        """Raises ValueError/TypeError unless `state` is a state_dict this window can load as it is."""
        if not isinstance(state, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
        missing = [k for k in ("G", "gram", "U", "count", "since_refactor", "m", "dim", "damp", "warmup",
                               "storage_dtype") if k not in state]
        if missing:
            raise ValueError(f"state_dict lacks {missing} (not saved by SlidingWindowIHVP.state_dict)")
        for key in ("m", "dim", "damp", "warmup"):  # the factor U holds s * damp on its diagonal
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={state[key]!r}, this window has {getattr(self, key)!r}")
        if state["storage_dtype"] != str(self.storage_dtype).replace("torch.", ""):
            raise ValueError(f"state_dict has storage_dtype={state['storage_dtype']!r}, this window stores "
                             f"{self.storage_dtype}")
        for key in ("G", "gram", "U"):
            src, dst = state[key], getattr(self, key)
            if not isinstance(src, torch.Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
                got = (f"{src.dtype} of shape {tuple(src.shape)}" if isinstance(src, torch.Tensor)
                       else type(src).__name__)
                raise ValueError(f"state_dict[{key!r}] must be a {dst.dtype} tensor of shape {tuple(dst.shape)}, "
                                 f"got {got}")
            if not bool(torch.isfinite(src).all()):
                raise ValueError(f"state_dict[{key!r}] has NaN or inf entries")
        for key in ("count", "since_refactor"):
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"state_dict[{key!r}] must be an int >= 0, got {v!r}")

    def load_state_dict(self, state: dict) -> None:
        """Loads a state_dict of a window with the same m, dim, damp, warmup and storage dtype. Everything
        is checked before anything changes: a state_dict that raises leaves the window as it was."""
        self._check_state(state)
        for key in ("G", "gram", "U"):
            getattr(self, key).copy_(state[key])
        self.count = state["count"]
        self.since_refactor = state["since_refactor"]
