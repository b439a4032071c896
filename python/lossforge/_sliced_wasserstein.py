"""Sliced Wasserstein distances: SW, Max-SW, v-DSW, and the vMF sampler (spec: specs/sliced_wasserstein.md).

One fused kernel (`torch.ops.lossforge.sliced_wasserstein`) projects both point clouds on every direction,
sorts the projections on chip, computes the 1D distances and, in the same pass, the gradient of each pair's
value with respect to the points, the weights and the directions. Autograd scales those by the incoming
gradient, so a forward+backward sorts every slice once and never stores B x L x N tensors.

Conventions (same as POT's `ot.sliced_wasserstein_distance`):
    W_p^p(mu, nu) = int_0^1 |F^-1(q) - G^-1(q)|^p dq         (1D, between the projected measures)
    SW_p = (1/L sum_l W_p^p(theta_l # mu, theta_l # nu))^(1/p)     (root=True)
Weights are normalised per point cloud (they need not sum to 1).
"""
from __future__ import annotations

import math
import numbers

import torch

from ._ops import ops, register_fake

__all__ = [
    "sliced_wasserstein",
    "max_sliced_wasserstein",
    "vmf_sample",
    "distributional_sliced_wasserstein",
    "random_projections",
]

_REDUCTIONS = ("mean", "sum", "none")

# ---------------------------------------------------------------------------------------------------
# The op: fake (shapes) and autograd registrations.


@register_fake("lossforge::sliced_wasserstein")
def _sliced_wasserstein_fake(x, y, x_weights, y_weights, projections, p, grad_points, grad_weights,
                             grad_projections):
    B, N, d = x.shape
    M = y.shape[1]
    L = projections.shape[-1]
    empty = x.new_empty((0,))
    return (
        x.new_empty((B,)),
        x.new_empty((B, N, d)) if grad_points else empty,
        x.new_empty((B, M, d)) if grad_points else x.new_empty((0,)),
        x.new_empty((B, N)) if grad_weights and x_weights is not None else x.new_empty((0,)),
        x.new_empty((B, M)) if grad_weights and y_weights is not None else x.new_empty((0,)),
        x.new_empty((B, d, L)) if grad_projections else x.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, y, x_weights, y_weights, projections, p, grad_points, grad_weights, grad_projections = inputs
    _, gx, gy, gwx, gwy, gth = output
    ctx.save_for_backward(gx, gy, gwx, gwy, gth)
    ctx.flags = (grad_points, grad_weights, grad_projections)
    ctx.shared_projections = projections.dim() == 2
    ctx.mark_non_differentiable(gx, gy, gwx, gwy, gth)


def _missing(name: str, flag: str):
    raise RuntimeError(
        f"lossforge::sliced_wasserstein: a gradient with respect to {name} was requested, but the op was called "
        f"with {flag}=False (call lossforge.sliced_wasserstein, which sets the flags from requires_grad)")


def _backward(ctx, g_value, *_unused):
    if torch.is_grad_enabled():
        # The gradients were computed in the forward pass as constants: a graph through them would give a
        # silently wrong second derivative, so refuse it.
        raise RuntimeError("lossforge.sliced_wasserstein does not support double backward (create_graph=True)")
    gx, gy, gwx, gwy, gth = ctx.saved_tensors
    grad_points, grad_weights, grad_projections = ctx.flags
    need = ctx.needs_input_grad
    out = [None] * 9
    g3 = g_value[:, None, None]
    if need[0] or need[1]:
        if not grad_points:
            _missing("x and y", "grad_points")
        out[0] = g3 * gx if need[0] else None
        out[1] = g3 * gy if need[1] else None
    for i, gw in ((2, gwx), (3, gwy)):
        if need[i]:
            if not grad_weights or gw.numel() == 0:
                _missing("the weights", "grad_weights")
            out[i] = g_value[:, None] * gw
    if need[4]:
        if not grad_projections:
            _missing("projections", "grad_projections")
        out[4] = torch.einsum("b,bdl->dl", g_value, gth) if ctx.shared_projections else g3 * gth
    return tuple(out)


torch.library.register_autograd("lossforge::sliced_wasserstein", _backward, setup_context=_setup_context)

# ---------------------------------------------------------------------------------------------------
# Validation helpers: clear TypeError / ValueError naming the argument, before any kernel runs.


def _check_tensor(t, name: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_points(x, y):
    _check_tensor(x, "x")
    _check_tensor(y, "y")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got x: {x.dtype}, y: {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got x: {x.device}, y: {y.device}")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be [N, d] or [B, N, d], got shape {tuple(x.shape)}")
    if y.dim() != x.dim():
        raise ValueError(f"x and y must both be single point clouds [N, d] or both batches [B, N, d], got x: "
                         f"{tuple(x.shape)}, y: {tuple(y.shape)}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have the same dimension d, got x: {tuple(x.shape)} (d={x.shape[-1]}), "
                         f"y: {tuple(y.shape)} (d={y.shape[-1]})")
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same batch size B, got x: {tuple(x.shape)}, y: {tuple(y.shape)}")
    if x.shape[-2] == 0 or y.shape[-2] == 0:
        raise ValueError(f"x and y need at least one point each, got x: {tuple(x.shape)}, y: {tuple(y.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"the points need at least one coordinate, got d=0 (x: {tuple(x.shape)})")


def _host_checks(t: torch.Tensor) -> bool:
    # Value checks (finite, non-negative, ...) need the data on the host: done for CPU tensors only, so a
    # CUDA call never synchronises (on CUDA a non-finite input gives a NaN result instead), and not while
    # torch.compile traces (data-dependent branches would break the graph; the CPU kernel still checks).
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_finite(t: torch.Tensor, name: str):
    if _host_checks(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_weights(w, name: str, points: torch.Tensor, pts_name: str):
    if w is None:
        return None
    _check_tensor(w, name)
    if not (w.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if w.device != points.device:
        raise ValueError(f"{name} must be on the same device as {pts_name}, got {name}: {w.device}, "
                         f"{pts_name}: {points.device}")
    if tuple(w.shape) != tuple(points.shape[:-1]):
        raise ValueError(f"{name} must have shape {tuple(points.shape[:-1])} (one weight per point of {pts_name}), "
                         f"got {tuple(w.shape)}")
    if _host_checks(w):
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        if bool((w < 0).any()):
            raise ValueError(f"{name} must be non-negative, got a minimum of {float(w.min())}")
        zero = (w.sum(dim=-1) <= 0).reshape(-1)
        if bool(zero.any()):
            which = int(torch.nonzero(zero)[0])
            raise ValueError(f"{name} sum to 0 for pair {which}: each point cloud needs a positive total weight")
    return w


def _check_p(p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a real number >= 1, got {type(p).__name__}")
    p = float(p)
    if not (math.isfinite(p) and p >= 1.0):
        raise ValueError(f"p must be a finite number >= 1, got {p}")
    return p


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_count(n, name: str, minimum: int = 1):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return int(n)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The kernels run in float32 or float64; half-precision inputs are computed in float32.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def random_projections(d: int, n_projections: int, *, generator=None, device=None,
                       dtype=torch.float32) -> torch.Tensor:
    """n_projections directions drawn uniformly from the unit sphere S^{d-1}, as the columns of a [d, L] tensor."""
    d = _check_count(d, "d")
    n_projections = _check_count(n_projections, "n_projections")
    theta = torch.randn(d, n_projections, generator=generator, device=device, dtype=dtype)
    return theta / theta.norm(dim=0, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def _reduce(per_pair: torch.Tensor, single: bool, reduction: str) -> torch.Tensor:
    if single:
        return per_pair[0]
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def _sw_per_pair(X, Y, WX, WY, P, p):
    """mean_l W_p^p per pair [B] through the op, with the gradient flags set from requires_grad."""
    grad = torch.is_grad_enabled()
    grad_points = grad and (X.requires_grad or Y.requires_grad)
    grad_weights = grad and ((WX is not None and WX.requires_grad) or (WY is not None and WY.requires_grad))
    grad_projections = grad and P.requires_grad
    value, *_ = ops.sliced_wasserstein(X, Y, WX, WY, P, p, grad_points, grad_weights, grad_projections)
    return value


def _prepare(x, y, x_weights, y_weights):
    """Validated, batched ([B, N, d]) contiguous inputs in the compute dtype; `single` for [N, d] inputs."""
    _check_points(x, y)
    _check_finite(x, "x")
    _check_finite(y, "y")
    _check_weights(x_weights, "x_weights", x, "x")
    _check_weights(y_weights, "y_weights", y, "y")
    single = x.dim() == 2
    dt = _compute_dtype(x.dtype)

    def batch(t):
        if t is None:
            return None
        t = t.unsqueeze(0) if single else t
        return t.to(dt).contiguous()

    return batch(x), batch(y), batch(x_weights), batch(y_weights), single


def _check_projections(projections, X, single: bool):
    _check_tensor(projections, "projections")
    if not projections.is_floating_point():
        raise TypeError(f"projections must be a floating-point tensor, got dtype {projections.dtype}")
    if projections.device != X.device:
        raise ValueError(f"projections must be on the same device as x, got projections: {projections.device}, "
                         f"x: {X.device}")
    B, _, d = X.shape
    ok = (projections.dim() == 2 and projections.shape[0] == d) or (
        projections.dim() == 3 and not single and projections.shape[0] == B and projections.shape[1] == d)
    if not ok or projections.shape[-1] == 0:
        want = f"[{d}, L]" if single else f"[{d}, L] or [{B}, {d}, L]"
        raise ValueError(f"projections must have shape {want} with L >= 1 (unit directions as columns), got "
                         f"{tuple(projections.shape)}")
    _check_finite(projections, "projections")
    return projections.to(X.dtype).contiguous()


# ---------------------------------------------------------------------------------------------------
# Public API


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, x_weights: torch.Tensor | None = None,
                       y_weights: torch.Tensor | None = None, *, n_projections: int = 100, p: float = 2.0,
                       projections: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       root: bool = True, reduction: str = "mean") -> torch.Tensor:
    """Sliced Wasserstein distance SW_p between point clouds, batched, differentiable.

    Args:
        x: [N, d] or [B, N, d] points of the first measure(s).
        y: [M, d] or [B, M, d] points of the second; M may differ from N.
        x_weights, y_weights: optional non-negative weights [N] / [B, N] and [M] / [B, M], normalised per
            point cloud (default uniform).
        n_projections: L, the number of random directions when `projections` is not given.
        p: the order, p >= 1.
        projections: directions as unit columns, [d, L] (shared by all pairs) or [B, d, L]; used as given.
            Default: L directions uniform on the sphere, drawn with `generator`, shared by the batch.
        root: True returns (mean_l W_p^p)^(1/p) (like POT); False returns mean_l W_p^p (smooth at 0).
        reduction: over the pairs of a batch: "mean", "sum" or "none" ([B]). A single pair gives a 0-d tensor.

    Differentiable with respect to x, y, the weights and `projections`. Ties in the projections are
    broken by point index (deterministic, like torch.sort(stable=True)). On CPU, non-finite inputs and
    invalid weights raise ValueError; on CUDA they are not checked (that would synchronise) and give NaN.
    """
    X, Y, WX, WY, single = _prepare(x, y, x_weights, y_weights)
    p = _check_p(p)
    _check_reduction(reduction)
    if projections is None:
        projections = random_projections(X.shape[-1], n_projections, generator=generator, device=X.device,
                                         dtype=X.dtype)
    else:
        projections = _check_projections(projections, X, single)
    per_pair = _sw_per_pair(X, Y, WX, WY, projections, p)
    if root:
        per_pair = per_pair.pow(1.0 / p)
    return _reduce(per_pair, single, reduction).to(x.dtype)


def vmf_sample(loc: torch.Tensor, kappa, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n samples of the von Mises-Fisher distribution vMF(loc, kappa) on S^{d-1}, reparameterised in loc.

    Args:
        loc: [..., d] mean directions (normalised here), d >= 2.
        kappa: concentration >= 0, a float or a tensor broadcastable to loc.shape[:-1].
        n: samples per direction.
    Returns:
        [..., n, d] unit vectors. The component along the mean, w, is drawn in closed form for d = 3
        (w = 1 + log(u + (1 - u) exp(-2 kappa)) / kappa) and by Wood's rejection sampler otherwise; the
        sample around e_1 is then reflected onto loc by a Householder reflection, through which gradients
        flow to loc. kappa -> 0 gives the uniform distribution, kappa -> inf the point mass at loc.
    """
    _check_tensor(loc, "loc")
    if not loc.is_floating_point():
        raise TypeError(f"loc must be a floating-point tensor, got dtype {loc.dtype}")
    if loc.dim() < 1 or loc.shape[-1] < 2:
        raise ValueError(f"loc must be [..., d] with d >= 2, got shape {tuple(loc.shape)}")
    n = _check_count(n, "n")
    batch = loc.shape[:-1]
    d = loc.shape[-1]
    dev = loc.device
    if isinstance(kappa, torch.Tensor):
        if kappa.device != dev:
            raise ValueError(f"kappa must be on the same device as loc, got kappa: {kappa.device}, loc: {dev}")
        try:
            k = torch.broadcast_to(kappa.detach().to(torch.float64), batch)
        except RuntimeError:
            raise ValueError(f"kappa must be broadcastable to loc.shape[:-1] = {tuple(batch)}, got shape "
                             f"{tuple(kappa.shape)}") from None
        if _host_checks(k) and not bool(((k >= 0) & torch.isfinite(k)).all()):
            raise ValueError("kappa must be finite and >= 0")
    else:
        if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real):
            raise TypeError(f"kappa must be a float or a tensor, got {type(kappa).__name__}")
        if not (math.isfinite(kappa) and kappa >= 0):
            raise ValueError(f"kappa must be finite and >= 0, got {kappa}")
        k = torch.full(batch, float(kappa), dtype=torch.float64, device=dev)
    k = k.unsqueeze(-1)  # [..., 1]
    w = _vmf_w(k, d, n, batch, generator, dev)  # [..., n] float64
    dt = loc.dtype
    v = torch.randn(*batch, n, d - 1, generator=generator, device=dev, dtype=dt)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
    w = w.to(dt)
    z = torch.cat([w.unsqueeze(-1), (1 - w * w).clamp_min(0).sqrt().unsqueeze(-1) * v], dim=-1)  # about e_1
    mu = loc / loc.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
    e1 = torch.zeros_like(mu)
    e1[..., 0] = 1
    h = e1 - mu
    hn = h.norm(dim=-1, keepdim=True)
    eps = 1e-6 if dt == torch.float32 else 1e-12
    hu = (h / hn.clamp_min(eps)).unsqueeze(-2)  # [..., 1, d]
    reflected = z - 2 * (z * hu).sum(dim=-1, keepdim=True) * hu
    # loc ~ e_1: the reflection degenerates to the identity (guarded so no 0/0 reaches the gradient).
    return torch.where((hn > eps).unsqueeze(-1), reflected, z)


def _vmf_w(k: torch.Tensor, d: int, n: int, batch, generator, dev) -> torch.Tensor:
    """The component along the mean direction, [..., n] in float64 (k is [..., 1])."""
    shape = (*batch, n)
    f64 = torch.float64
    if d == 3:
        u = 1 - torch.rand(shape, generator=generator, device=dev, dtype=f64)  # (0, 1]
        ks = k.clamp_min(1e-300)
        w = 1 + torch.log1p((1 - u) * torch.expm1(-2 * ks)) / ks
        w = torch.where(k > 0, w, 2 * u - 1)
        return w.clamp(-1.0, 1.0)
    # Wood (1994): envelope from a Beta((d-1)/2, (d-1)/2) proposal; the Beta draw is a ratio of two
    # chi-square(d-1) variables so that it uses only the generator's normals.
    m1 = d - 1.0
    b = m1 / (2 * k + torch.sqrt(4 * k * k + m1 * m1))
    x0 = (1 - b) / (1 + b)
    c = k * x0 + m1 * torch.log1p(-x0 * x0)
    w = torch.zeros(shape, dtype=f64, device=dev)
    pending = torch.ones(shape, dtype=torch.bool, device=dev)
    for _ in range(1000):
        g1 = torch.randn(*shape, d - 1, generator=generator, device=dev, dtype=f64).square().sum(-1)
        g2 = torch.randn(*shape, d - 1, generator=generator, device=dev, dtype=f64).square().sum(-1)
        z = g1 / (g1 + g2)
        cand = (1 - (1 + b) * z) / (1 - (1 - b) * z)
        u = 1 - torch.rand(shape, generator=generator, device=dev, dtype=f64)
        accept = k * cand + m1 * torch.log1p(-x0 * cand) - c >= torch.log(u)
        take = pending & accept
        w = torch.where(take, cand, w)
        pending = pending & ~take
        # The rejection loop must know when every sample is accepted: one host sync per round (a few rounds).
        if not bool(pending.any()):
            break
    else:
        raise RuntimeError("vmf_sample: Wood's rejection sampler did not accept every sample in 1000 rounds")
    return w.clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Ascent on directions: Max-SW and v-DSW. The loops call the fused op directly for the gradient with
# respect to the directions only (x and y detached), so a step allocates O(B x d x L), never B x L x N.


class _Ascent:
    """Batched ascent on unit vectors [B, d]: Adam (as the papers' code) or plain gradient steps, each step
    followed by the projection back onto the sphere."""

    def __init__(self, theta: torch.Tensor, lr: float, optimizer: str):
        self.theta = theta
        self.lr = lr
        self.adam = optimizer == "adam"
        self.m = torch.zeros_like(theta)
        self.v = torch.zeros_like(theta)
        self.t = 0

    def step(self, grad: torch.Tensor):
        self.t += 1
        if self.adam:
            b1, b2, eps = 0.9, 0.999, 1e-8
            self.m.mul_(b1).add_(grad, alpha=1 - b1)
            self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            mhat = self.m / (1 - b1 ** self.t)
            vhat = self.v / (1 - b2 ** self.t)
            upd = mhat / (vhat.sqrt() + eps)
        else:
            upd = grad
        th = self.theta + self.lr * upd
        self.theta = th / th.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(th.dtype).tiny)


def _check_ascent(n_iters, lr, optimizer):
    n_iters = _check_count(n_iters, "n_iters", minimum=0)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    return n_iters, float(lr)


def _initial_directions(init, B: int, d: int, X: torch.Tensor, generator, single: bool):
    if init is None:
        th = torch.randn(B, d, generator=generator, device=X.device, dtype=X.dtype)
    else:
        _check_tensor(init, "init")
        if init.device != X.device:
            raise ValueError(f"init must be on the same device as x, got init: {init.device}, x: {X.device}")
        if tuple(init.shape) not in ((d,), (B, d)):
            want = f"[{d}]" if single else f"[{d}] or [{B}, {d}]"
            raise ValueError(f"init must have shape {want}, got {tuple(init.shape)}")
        th = init.detach().to(X.dtype).expand(B, d).clone()
    return th / th.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)


def _root_grad_scale(value: torch.Tensor, p: float) -> torch.Tensor:
    """d (v^(1/p)) / d v per pair, 0 where v = 0 (a pair of identical projections has no ascent direction)."""
    safe = value.clamp_min(torch.finfo(value.dtype).tiny)
    return torch.where(value > 0, safe.pow(1.0 / p - 1.0) / p, torch.zeros_like(value))


def max_sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, x_weights: torch.Tensor | None = None,
                           y_weights: torch.Tensor | None = None, *, n_iters: int = 50, lr: float = 0.05,
                           p: float = 2.0, optimizer: str = "adam", init: torch.Tensor | None = None,
                           generator: torch.Generator | None = None, root: bool = True, reduction: str = "mean",
                           return_projections: bool = False):
    """Max-sliced Wasserstein: max over unit theta of W_p(theta # mu, theta # nu), one direction per pair.

    The direction is found by `n_iters` steps of projected gradient ascent on W_p (Adam by default, as in the
    papers' code, or "sgd"), with x and y detached, keeping the best direction evaluated on the way (every
    direction gives a lower bound of the maximum); the returned value is then evaluated at that direction
    with gradients to x, y and the weights (the direction is treated as a constant, as in the papers).
    `init`: optional starting direction(s) [d] or [B, d]; random otherwise (drawn with `generator`).
    `return_projections=True` also returns the directions, [d] or [B, d].
    """
    X, Y, WX, WY, single = _prepare(x, y, x_weights, y_weights)
    p = _check_p(p)
    _check_reduction(reduction)
    n_iters, lr = _check_ascent(n_iters, lr, optimizer)
    B, _, d = X.shape
    asc = _Ascent(_initial_directions(init, B, d, X, generator, single), lr, optimizer)
    Xd, Yd = X.detach(), Y.detach()
    WXd = None if WX is None else WX.detach()
    WYd = None if WY is None else WY.detach()
    with torch.no_grad():
        # Every evaluated direction gives a lower bound of the maximum: keep the best one per pair (the
        # ascent with a constant step ends near, not at, the maximum).
        best_value = torch.full((B,), -1.0, dtype=X.dtype, device=X.device)
        theta = asc.theta
        for t in range(n_iters + 1):
            try:
                value, _, _, _, _, g = ops.sliced_wasserstein(Xd, Yd, WXd, WYd, asc.theta.unsqueeze(-1).contiguous(),
                                                              p, False, False, t < n_iters)
            except RuntimeError as e:  # finite clouds: the ascent's direction left the finite range (CPU)
                if "not finite" not in str(e):
                    raise
                scale = max(float(Xd.abs().max()), float(Yd.abs().max()))
                raise ValueError(f"max_sliced_wasserstein: the ascent overflowed {str(X.dtype).replace('torch.', '')}: "
                                 f"|u - v|^{p:g} and its gradient are too large for clouds with coordinates up to "
                                 f"{scale:.3g}; rescale the clouds or use float64") from None
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            theta = torch.where(better[:, None], asc.theta, theta)
            if t < n_iters:
                asc.step(_root_grad_scale(value, p)[:, None] * g[..., 0])
    theta = theta.detach()
    out = sliced_wasserstein(X, Y, WX, WY, p=p, projections=theta.unsqueeze(-1).contiguous(), root=root,
                             reduction="none")
    out = _reduce(out, single, reduction).to(x.dtype)
    if return_projections:
        return out, (theta[0] if single else theta)
    return out


def distributional_sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, kappa, x_weights: torch.Tensor | None = None,
                                      y_weights: torch.Tensor | None = None, *, n_projections: int = 100,
                                      n_iters: int = 50, lr: float = 0.05, p: float = 2.0, optimizer: str = "adam",
                                      init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                                      root: bool = True, reduction: str = "mean", return_locations: bool = False):
    """von Mises-Fisher distributional sliced Wasserstein (v-DSW):

        v-DSW_p(mu, nu; kappa) = max_{eps in S^{d-1}} (E_{theta ~ vMF(eps, kappa)} W_p^p(theta # mu, theta # nu))^(1/p)

    The location eps (one per pair) is found by `n_iters` steps of projected ascent (Adam or "sgd") on the
    Monte-Carlo estimate with `n_projections` reparameterised vMF samples drawn afresh at every step, with
    x and y detached; the value is then evaluated with fresh samples around the final eps, with gradients
    to x, y and the weights. kappa -> 0 gives SW, kappa -> inf Max-SW.
    `return_locations=True` also returns eps, [d] or [B, d].
    """
    X, Y, WX, WY, single = _prepare(x, y, x_weights, y_weights)
    p = _check_p(p)
    _check_reduction(reduction)
    n_iters, lr = _check_ascent(n_iters, lr, optimizer)
    L = _check_count(n_projections, "n_projections")
    B, _, d = X.shape
    if d < 2:
        raise ValueError(f"distributional_sliced_wasserstein needs d >= 2 (vMF directions), got d={d}")
    asc = _Ascent(_initial_directions(init, B, d, X, generator, single), lr, optimizer)
    Xd, Yd = X.detach(), Y.detach()
    WXd = None if WX is None else WX.detach()
    WYd = None if WY is None else WY.detach()
    for _ in range(n_iters):
        with torch.enable_grad():
            loc = asc.theta.detach().requires_grad_(True)
            proj = vmf_sample(loc, kappa, L, generator).transpose(-1, -2)  # [B, d, L]
        with torch.no_grad():
            value, _, _, _, _, g = ops.sliced_wasserstein(Xd, Yd, WXd, WYd, proj.detach().contiguous(), p, False,
                                                          False, True)
            g = _root_grad_scale(value, p)[:, None, None] * g
        (grad_loc,) = torch.autograd.grad(proj, loc, grad_outputs=g)
        asc.step(grad_loc)
    loc = asc.theta.detach()
    proj = vmf_sample(loc, kappa, L, generator).transpose(-1, -2).contiguous()
    out = sliced_wasserstein(X, Y, WX, WY, p=p, projections=proj, root=root, reduction="none")
    out = _reduce(out, single, reduction).to(x.dtype)
    if return_locations:
        return out, (loc[0] if single else loc)
    return out
