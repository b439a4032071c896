"""Sliced Wasserstein distances: SW, Max-SW, v-DSW, and the vMF sampler.

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


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@register_fake("lossforge::sliced_wasserstein")
def _sliced_wasserstein_fake(x, y, x_weights, y_weights, projections, p, grad_points, grad_weights,
                             grad_projections):
    # The checks of the C++ kernels (sliced_wasserstein_args.h), with the same messages, so that a direct
    # torch.ops.lossforge.sliced_wasserstein call fails under torch.compile as it does in eager.
    op = "sliced_wasserstein"
    for name, t in (("x", x), ("y", y), ("projections", projections)):
        torch._check(t.is_contiguous(), lambda name=name: f"{op}: {name} must be contiguous")
    torch._check(x.dtype in (torch.float32, torch.float64),
                 lambda: f"{op}: x must be float32 or float64, got {_dtype_name(x.dtype)}")
    for name, t in (("y", y), ("projections", projections)):
        torch._check(t.dtype == x.dtype,
                     lambda name=name, t=t: f"{op}: {name} must be {_dtype_name(x.dtype)}, got {_dtype_name(t.dtype)}")
    torch._check(x.dim() == 3 and y.dim() == 3, lambda: f"{op}: x and y must be [B, N, d] and [B, M, d]")
    B, N, d = x.shape
    M = y.shape[1]
    torch._check(y.shape[0] == B and y.shape[2] == d, lambda: f"{op}: y must have shape [{B}, M, {d}]")
    torch._check(N > 0 and M > 0 and d > 0, lambda: f"{op}: x and y need at least one point of dimension >= 1")
    torch._check(projections.dim() in (2, 3), lambda: f"{op}: projections must be [d, L] or [B, d, L]")
    L = projections.shape[-1]
    torch._check(projections.shape[-2] == d and (projections.dim() == 2 or projections.shape[0] == B),
                 lambda: f"{op}: projections must be [{d}, L] or [{B}, {d}, L]")
    torch._check(L > 0, lambda: f"{op}: need at least one projection")
    torch._check(p >= 1.0 and math.isfinite(p), lambda: f"{op}: p must be a finite number >= 1, got {p}")
    for name, w, n in (("x_weights", x_weights, N), ("y_weights", y_weights, M)):
        if w is not None:
            torch._check(w.is_contiguous(), lambda name=name: f"{op}: {name} must be contiguous")
            torch._check(w.dtype == x.dtype, lambda name=name, w=w: f"{op}: {name} must be {_dtype_name(x.dtype)}, "
                                                                    f"got {_dtype_name(w.dtype)}")
            torch._check(w.dim() == 2 and w.shape[0] == B and w.shape[1] == n,
                         lambda name=name, n=n: f"{op}: {name} must be [{B}, {n}]")
    empty = x.new_empty((0,))
    grad_weights = grad_weights and (x_weights is not None or y_weights is not None)
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


def _make_generator(generator: torch.Generator | None, seed: int | None, device) -> torch.Generator | None:
    """`seed=` (POT's spelling) as a fresh torch.Generator on `device`; exclusive with `generator=`."""
    if seed is None:
        return generator
    if generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.Generator(device=device).manual_seed(int(seed))


def random_projections(d: int, n_projections: int, *, generator: torch.Generator | None = None,
                       seed: int | None = None, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n_projections directions drawn uniformly from the unit sphere S^{d-1}, as the columns of a [d, L] tensor.

    `seed` (an int, as in POT) or `generator` make the draw reproducible; `seed=s` draws the same directions
    as `generator=torch.Generator(device).manual_seed(s)` (not the same as POT's numpy draw for that seed).
    Under torch.compile(fullgraph=True) leave both unset (torch cannot trace a Generator object) and seed
    the global RNG outside the compiled function.

    >>> import torch, lossforge
    >>> P = lossforge.random_projections(3, 100, seed=0, dtype=torch.float64)
    >>> P.shape, bool(torch.allclose(P.norm(dim=0), torch.ones(100, dtype=torch.float64)))
    (torch.Size([3, 100]), True)
    """
    d = _check_count(d, "d")
    n_projections = _check_count(n_projections, "n_projections")
    generator = _make_generator(generator, seed, device if device is not None else "cpu")
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


def _per_slice(X, Y, WX, WY, P, p: float) -> torch.Tensor:
    """W_p^p per pair and slice, [B, L], differentiable (for log=True and the maximum over given directions).
    Each slice goes through the op as a 1D pair, so this materialises the B x L x N projections (the fused
    path never does)."""
    B, N, _ = X.shape
    M = Y.shape[1]
    Pb = P if P.dim() == 3 else P.unsqueeze(0).expand(B, -1, -1)
    L = Pb.shape[-1]
    u = torch.matmul(X, Pb).transpose(1, 2).reshape(B * L, N, 1)
    v = torch.matmul(Y, Pb).transpose(1, 2).reshape(B * L, M, 1)

    def rows(w, n):
        return None if w is None else w.unsqueeze(1).expand(B, L, n).reshape(B * L, n).contiguous()

    one = torch.ones(1, 1, dtype=X.dtype, device=X.device)
    return _sw_per_pair(u.contiguous(), v.contiguous(), rows(WX, N), rows(WY, M), one, p).reshape(B, L)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, x_weights: torch.Tensor | None = None,
                       y_weights: torch.Tensor | None = None, *, n_projections: int = 100, p: float = 2.0,
                       projections: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       seed: int | None = None, root: bool = True, reduction: str = "mean",
                       log: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sliced Wasserstein distance SW_p between point clouds, batched, differentiable.

    Args:
        x: [N, d] or [B, N, d] points of the first measure(s).
        y: [M, d] or [B, M, d] points of the second; M may differ from N.
        x_weights, y_weights: optional non-negative weights [N] / [B, N] and [M] / [B, M], normalised per
            point cloud (default uniform).
        n_projections: L, the number of random directions when `projections` is not given.
        p: the order, p >= 1.
        projections: directions as unit columns, [d, L] (shared by all pairs) or [B, d, L]; used as given.
            Default: L directions uniform on the sphere, drawn with `generator` (or `seed`), shared by the batch.
        generator, seed: the random draw of the directions (`seed`, an int, as in POT; pass at most one).
            `seed=s` equals `generator=torch.Generator(device).manual_seed(s)`; torch's RNG is not numpy's,
            so the directions differ from POT's for the same seed: pass `projections` for identical ones.
        root: True returns (mean_l W_p^p)^(1/p) (like POT); False returns mean_l W_p^p (smooth at 0).
        reduction: over the pairs of a batch: "mean", "sum" or "none" ([B]). A single pair gives a 0-d tensor.
        log: True also returns POT's log dict {"projections": the directions used ([d, L] or [B, d, L]),
            "projected_emds": W_p^p per slice ([L], or [B, L] for a batch), unrooted as in POT}, so that
            value = mean(projected_emds)^(1/p). The per-slice values are differentiable; computing them
            materialises the B x L x N projections (a diagnostic path, not the fused one).

    Differentiable with respect to x, y, the weights and `projections`. Ties in the projections are
    broken by point index (deterministic, like torch.sort(stable=True)). On CPU, non-finite inputs and
    invalid weights raise ValueError; on CUDA they are not checked (that would synchronise) and give NaN.
    Compiles with torch.compile(fullgraph=True) when no `generator`/`seed` is passed (torch cannot trace
    a Generator object; seed the global RNG outside, or pass `projections`).

    >>> import torch, lossforge
    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    >>> P = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # the two axes
    >>> lossforge.sliced_wasserstein(x, x + torch.tensor([2.0, 0.0], dtype=torch.float64), projections=P, p=1.0)
    tensor(1., dtype=torch.float64)
    >>> value, log = lossforge.sliced_wasserstein(x, x + 2, projections=P, p=2.0, log=True)
    >>> log["projected_emds"], value
    (tensor([4., 4.], dtype=torch.float64), tensor(2., dtype=torch.float64))
    """
    X, Y, WX, WY, single = _prepare(x, y, x_weights, y_weights)
    p = _check_p(p)
    _check_reduction(reduction)
    if projections is None:
        projections = random_projections(X.shape[-1], n_projections, generator=generator, seed=seed, device=X.device,
                                         dtype=X.dtype)
    else:
        projections = _check_projections(projections, X, single)
    per_pair = _sw_per_pair(X, Y, WX, WY, projections, p)
    if root:
        per_pair = per_pair.pow(1.0 / p)
    out = _reduce(per_pair, single, reduction).to(x.dtype)
    if not log:
        return out
    emds = _per_slice(X, Y, WX, WY, projections, p).to(x.dtype)
    return out, {"projections": projections, "projected_emds": emds[0] if single else emds}


# ---------------------------------------------------------------------------------------------------
# von Mises-Fisher sampling: w = <sample, mu> (as 1 - w, exact for any kappa), a uniform tangent
# direction, then an orthogonal map e_1 -> mu that is smooth in mu.


def _check_loc(loc) -> torch.Tensor:
    """The unit mean directions loc / |loc|. A zero loc raises on CPU; on CUDA and under torch.compile (no
    host check) it gives NaN samples, as a NaN loc does everywhere: never samples around an arbitrary axis."""
    _check_tensor(loc, "loc")
    if not loc.is_floating_point():
        raise TypeError(f"loc must be a floating-point tensor, got dtype {loc.dtype}")
    if loc.dim() < 1 or loc.shape[-1] < 2:
        raise ValueError(f"loc must be [..., d] with d >= 2, got shape {tuple(loc.shape)}")
    norm = loc.norm(dim=-1, keepdim=True)
    if _host_checks(loc) and bool((norm == 0).any()):
        raise ValueError("loc contains a zero vector: the mean direction is undefined (pass a nonzero loc)")
    return loc / norm


def _vmf_kappa(kappa, batch, dev) -> torch.Tensor:
    """kappa validated and broadcast to the batch, float64 [..., 1] (detached: no gradient to kappa)."""
    if isinstance(kappa, torch.Tensor):
        if kappa.device != dev:
            raise ValueError(f"kappa must be on the same device as loc, got kappa: {kappa.device}, loc: {dev}")
        try:
            k = torch.broadcast_to(kappa.detach().to(torch.float64), batch)
        except RuntimeError:
            raise ValueError(f"kappa must be broadcastable to loc.shape[:-1] = {tuple(batch)}, got shape "
                             f"{tuple(kappa.shape)}") from None
        if _host_checks(k) and not bool((k >= 0).all()):
            raise ValueError("kappa must be >= 0 (inf: the point mass at loc), got a negative or NaN value")
    else:
        if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real):
            raise TypeError(f"kappa must be a float or a tensor, got {type(kappa).__name__}")
        if not kappa >= 0:
            raise ValueError(f"kappa must be >= 0 (inf: the point mass at loc), got {kappa}")
        k = torch.full(batch, float(kappa), dtype=torch.float64, device=dev)
    return k.unsqueeze(-1)


def _vmf_one_minus_w(k: torch.Tensor, d: int, n: int, batch, generator, dev) -> torch.Tensor:
    """1 - w, w the component along the mean direction, [..., n] in float64 (k is [..., 1]). Drawn as 1 - w
    so that large kappa stays exact (w itself rounds to 1 once 1 - w ~ (d-1)/(2 kappa) < 1e-16)."""
    shape = (*batch, n)
    f64 = torch.float64
    if d == 3:
        u = 1 - torch.rand(shape, generator=generator, device=dev, dtype=f64)  # (0, 1]
        ks = k.clamp_min(1e-300)
        y = -torch.log1p((1 - u) * torch.expm1(-2 * ks)) / ks  # 0 at kappa = inf
        y = torch.where(k > 0, y, 2 - 2 * u)
        return y.clamp(0.0, 2.0)
    # Wood (1994): envelope from a Beta((d-1)/2, (d-1)/2) proposal z; the Beta draw is a ratio of two
    # chi-square(d-1) variables so that it uses only the generator's normals. Written in 1 - w: with
    # b = (d-1) / (2k + sqrt(4k^2 + (d-1)^2)) (as 1 / (r + hypot(r, 1)), r = 2k/(d-1): 1 at k = 0, 0 at k = inf),
    # w = (1 - (1+b) z) / (1 - (1-b) z) gives 1 - w = 2 b z' / (z'' + b z'), and Wood's test
    # k w + (d-1) log(1 - x0 w) - c >= log u (x0 = (1-b)/(1+b), c = k x0 + (d-1) log(1 - x0^2)) becomes
    # k (2b/(1+b) - (1-w)) + (d-1) log((1+b)(2b + (1-b)(1-w)) / (4b)) >= log u: every term stays O(1) as k grows.
    m1 = d - 1.0
    r = 2 * k / m1
    b = 1 / (r + torch.hypot(r, torch.ones_like(r)))
    y = torch.zeros(shape, dtype=f64, device=dev)
    pending = torch.ones(shape, dtype=torch.bool, device=dev)
    for _ in range(1000):
        g1 = torch.randn(*shape, d - 1, generator=generator, device=dev, dtype=f64).square().sum(-1)
        g2 = torch.randn(*shape, d - 1, generator=generator, device=dev, dtype=f64).square().sum(-1)
        cand = 2 * b * g1 / (g2 + b * g1)
        u = 1 - torch.rand(shape, generator=generator, device=dev, dtype=f64)
        t = k * (2 * b / (1 + b) - cand) + m1 * torch.log((1 + b) * (2 * b + (1 - b) * cand) / (4 * b))
        accept = (t >= torch.log(u)) | (b == 0)  # b = 0 (kappa = inf): the point mass, 1 - w = 0
        take = pending & accept
        y = torch.where(take, cand, y)
        pending = pending & ~take
        # The rejection loop must know when every sample is accepted: one host sync per round (a few rounds),
        # and a graph break under torch.compile.
        if not bool(pending.any()):
            break
    else:
        raise RuntimeError("vmf_sample: Wood's rejection sampler did not accept every sample in 1000 rounds")
    return y.clamp(0.0, 2.0)


def _vmf_base(k: torch.Tensor, batch, d: int, n: int, generator, dtype: torch.dtype, dev) -> torch.Tensor:
    """Samples of vMF(e_1, kappa), [..., n, d], without gradient."""
    y = _vmf_one_minus_w(k, d, n, batch, generator, dev)
    v = torch.randn(*batch, n, d - 1, generator=generator, device=dev, dtype=dtype)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    w = (1 - y).to(dtype).unsqueeze(-1)
    s = (y * (2 - y)).clamp_min(0).sqrt().to(dtype).unsqueeze(-1)  # sqrt(1 - w^2) without cancellation
    return torch.cat([w, s * v], dim=-1)


def _vmf_frame(mu: torch.Tensor):
    """s = sign(mu_1) (+1 at 0, -1 for NaN), u = e_1 + s mu and D = 1 + s mu_1 = u_1 >= 1 (|u|^2 = 2D)."""
    mu1 = mu[..., :1]
    s = torch.where(mu1 >= 0, torch.ones_like(mu1), -torch.ones_like(mu1))
    u = torch.cat([1 + s * mu1, s * mu[..., 1:]], dim=-1)
    return s, u, u[..., :1]


def _vmf_map(mu: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x = s (u u^T / D - I) z: the orthogonal map -s H_u (H_u the reflection along u) takes e_1 to mu. The
    denominator D = 1 + |mu_1| >= 1, so the map and its derivative in mu are smooth on each half-sphere
    mu_1 >= 0 and mu_1 < 0, e_1 and -e_1 included (the reflection e_1 -> mu along e_1 - mu has a 0/0 at
    mu = e_1). Crossing mu_1 = 0 changes the sample drawn from fixed noise, not its distribution."""
    s, u, D = _vmf_frame(mu)
    zu = (z * u.unsqueeze(-2)).sum(-1, keepdim=True)
    return s.unsqueeze(-2) * (zu * (u / D).unsqueeze(-2) - z)


def _vmf_map_grad(mu: torch.Tensor, z: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The gradient of sum_l <G_l, _vmf_map(mu, z)_l> with respect to loc at a unit loc = mu, in closed form
    (so the v-DSW ascent needs no autograd): with S = sum_l G_l z_l^T, J = s (u^T S u / D - tr(S)), and
    dJ/dmu = (S + S^T) u / D - (u^T S u / D^2) e_1, projected on the tangent space (the normalisation)."""
    _, u, D = _vmf_frame(mu)
    # S u = sum_l G_l <z_l, u>, S^T u = sum_l z_l <G_l, u>: O(L d) without forming S (tiny bmms are slow on CPU)
    zu = (z * u.unsqueeze(-2)).sum(-1, keepdim=True)
    Gu = (G * u.unsqueeze(-2)).sum(-1, keepdim=True)
    Su = (G * zu).sum(-2)
    STu = (z * Gu).sum(-2)
    uSu = (Gu * zu).sum(-2)
    g = (Su + STu) / D
    g = torch.cat([g[..., :1] - uSu / (D * D), g[..., 1:]], dim=-1)
    return g - (g * mu).sum(-1, keepdim=True) * mu


def vmf_sample(loc: torch.Tensor, kappa: float | torch.Tensor, n: int, generator: torch.Generator | None = None, *,
               seed: int | None = None) -> torch.Tensor:
    """n samples of the von Mises-Fisher distribution vMF(loc, kappa) on S^{d-1}, reparameterised in loc.

    Args:
        loc: [..., d] mean directions (normalised here), d >= 2. A NaN loc gives NaN samples; a zero loc
            raises ValueError on CPU (NaN samples on CUDA and under torch.compile, where it is not checked).
        kappa: concentration >= 0, a float or a tensor broadcastable to loc.shape[:-1]; inf is allowed (every
            sample equals the mean direction: v-DSW becomes Max-SW). No gradient flows to kappa.
        n: samples per direction.
        generator, seed: the random draw (`seed`, an int, makes a fresh torch.Generator; pass at most one).
    Returns:
        [..., n, d] unit vectors. The component w along the mean is drawn in closed form for d = 3
        (w = 1 + log(u + (1 - u) exp(-2 kappa)) / kappa) and by Wood's rejection sampler otherwise, both as
        1 - w so that any kappa, up to inf, stays exact. The sample around e_1 is then taken onto loc by an
        orthogonal map that is smooth in loc on each half-sphere loc_1 >= 0 / loc_1 < 0 (e_1 included, where
        a Householder reflection e_1 -> loc is singular); gradients flow to loc through it.
        kappa -> 0 gives the uniform distribution, kappa -> inf the point mass at loc.

    torch.compile: d = 3 compiles with fullgraph=True (no generator/seed: torch cannot trace a Generator).
    For d != 3 the rejection loop decides on the host when every sample is accepted (one sync per round):
    that is inherent to rejection sampling, so it compiles with a graph break per round (fullgraph=False).

    >>> import torch, lossforge
    >>> loc = torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)
    >>> s = lossforge.vmf_sample(loc, 50.0, 1000, seed=0)
    >>> s.shape, bool(torch.allclose(s.norm(dim=-1), torch.ones(1000, dtype=torch.float64)))
    (torch.Size([1000, 3]), True)
    >>> round(float((s @ loc / 2).mean()), 2)  # A_3(50) = coth(50) - 1/50 = 0.98
    0.98
    >>> lossforge.vmf_sample(loc, float("inf"), 2)
    tensor([[0., 0., 1.],
            [0., 0., 1.]], dtype=torch.float64)
    """
    mu = _check_loc(loc)
    n = _check_count(n, "n")
    batch = loc.shape[:-1]
    k = _vmf_kappa(kappa, batch, loc.device)
    generator = _make_generator(generator, seed, loc.device)
    return _vmf_map(mu, _vmf_base(k, batch, loc.shape[-1], n, generator, loc.dtype, loc.device))


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


def _max_ascent(Xd, Yd, WXd, WYd, theta0, p, n_iters, lr, optimizer, x_dtype):
    """The best direction per pair [B, d] seen in n_iters ascent steps from theta0."""
    asc = _Ascent(theta0, lr, optimizer)
    B = Xd.shape[0]
    # Every evaluated direction gives a lower bound of the maximum: keep the best one per pair (the
    # ascent with a constant step ends near, not at, the maximum).
    best_value = torch.full((B,), -1.0, dtype=Xd.dtype, device=Xd.device)
    theta = asc.theta
    for t in range(n_iters + 1):
        try:
            value, _, _, _, _, g = ops.sliced_wasserstein(Xd, Yd, WXd, WYd, asc.theta.unsqueeze(-1).contiguous(),
                                                          p, False, False, t < n_iters)
        except RuntimeError as e:  # finite clouds: the ascent's direction left the finite range (CPU)
            if "not finite" not in str(e):
                raise
            scale = max(float(Xd.abs().max()), float(Yd.abs().max()))
            raise ValueError(f"max_sliced_wasserstein: the ascent overflowed {_dtype_name(x_dtype)}: "
                             f"|u - v|^{p:g} and its gradient are too large for clouds with coordinates up to "
                             f"{scale:.3g}; rescale the clouds or use float64") from None
        better = value > best_value
        best_value = torch.where(better, value, best_value)
        theta = torch.where(better[:, None], asc.theta, theta)
        if t < n_iters:
            asc.step(_root_grad_scale(value, p)[:, None] * g[..., 0])
    return theta


def max_sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, x_weights: torch.Tensor | None = None,
                           y_weights: torch.Tensor | None = None, *, n_iters: int = 50, lr: float = 0.05,
                           p: float = 2.0, optimizer: str = "adam", init: torch.Tensor | None = None,
                           projections: torch.Tensor | None = None, generator: torch.Generator | None = None,
                           seed: int | None = None, root: bool = True, reduction: str = "mean",
                           return_projections: bool = False,
                           log: bool = False) -> torch.Tensor | tuple[torch.Tensor | dict[str, torch.Tensor], ...]:
    """Max-sliced Wasserstein: max over unit theta of W_p(theta # mu, theta # nu), one direction per pair.

    Default (no `projections`): the direction is found by `n_iters` steps of projected gradient ascent on
    W_p (Adam by default, as in the papers' code, or "sgd"), with x and y detached, keeping the best
    direction evaluated on the way (every direction gives a lower bound of the maximum); the returned value
    is then evaluated at that direction with gradients to x, y and the weights (the direction is treated as
    a constant, as in the papers). `init`: optional starting direction(s) [d] or [B, d]; random otherwise
    (drawn with `generator` or `seed`).

    `projections` ([d, L] or [B, d, L], unit columns): POT's `ot.max_sliced_wasserstein_distance` instead,
    the maximum of W_p over the given directions (no ascent: n_iters, lr, optimizer are unused and `init`
    is refused). For POT's random directions pass `projections=lossforge.random_projections(d, 50, seed=s)`.
    Gradients reach x, y, the weights and the maximising column of `projections`.

    `return_projections=True` also returns the maximising directions, [d] or [B, d]. `log=True` also returns
    POT's log dict {"projections", "projected_emds"}: with `projections`, the given directions and W_p^p per
    direction ([L] or [B, L]); after the ascent, the direction found ([d, 1] or [B, d, 1]) and W_p^p along it.
    The results come in the order (value, directions, log).

    torch.compile: compiles with fullgraph=True when no `generator`/`seed` is passed (torch cannot trace
    a Generator object; the default random start then uses the global RNG).

    >>> import torch, lossforge
    >>> x = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> y = torch.tensor([[3.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    >>> P = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> lossforge.max_sliced_wasserstein(x, y, projections=P, return_projections=True)
    (tensor(3., dtype=torch.float64), tensor([1., 0.], dtype=torch.float64))
    >>> value = lossforge.max_sliced_wasserstein(x, y, n_iters=100, seed=0)  # the ascent finds e_1
    >>> round(float(value), 4)
    3.0
    """
    X, Y, WX, WY, single = _prepare(x, y, x_weights, y_weights)
    p = _check_p(p)
    _check_reduction(reduction)
    B, _, d = X.shape
    per_slice = None
    if projections is not None:
        if init is not None:
            raise ValueError("init starts the ascent, but with projections the maximum is taken over the given "
                             "directions: pass one or the other")
        P = _check_projections(projections, X, single)
        with torch.set_grad_enabled(log and torch.is_grad_enabled()):
            per_slice = _per_slice(X, Y, WX, WY, P, p)  # [B, L]
        best = per_slice.detach().argmax(dim=-1)  # the first maximising direction
        Pb = P if P.dim() == 3 else P.unsqueeze(0).expand(B, -1, -1)
        theta = Pb.gather(-1, best.view(B, 1, 1).expand(B, d, 1)).squeeze(-1)  # keeps the graph to P
    else:
        n_iters, lr = _check_ascent(n_iters, lr, optimizer)
        generator = _make_generator(generator, seed, X.device)
        theta0 = _initial_directions(init, B, d, X, generator, single)
        WXd = None if WX is None else WX.detach()
        WYd = None if WY is None else WY.detach()
        with torch.no_grad():
            theta = _max_ascent(X.detach(), Y.detach(), WXd, WYd, theta0, p, n_iters, lr, optimizer, X.dtype)
    per_pair = sliced_wasserstein(X, Y, WX, WY, p=p, projections=theta.unsqueeze(-1), root=False, reduction="none")
    value = _reduce(per_pair.pow(1.0 / p) if root else per_pair, single, reduction).to(x.dtype)
    if not (return_projections or log):
        return value
    out = [value]
    if return_projections:
        out.append(theta[0] if single else theta)
    if log:
        if per_slice is None:
            emds, used = per_pair.unsqueeze(-1), theta.unsqueeze(-1)
            used = used[0] if single else used
        else:
            emds, used = per_slice, P
        emds = emds.to(x.dtype)
        out.append({"projections": used, "projected_emds": emds[0] if single else emds})
    return tuple(out)


def distributional_sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, kappa: float | torch.Tensor,
                                      x_weights: torch.Tensor | None = None, y_weights: torch.Tensor | None = None,
                                      *, n_projections: int = 100, n_iters: int = 50, lr: float = 0.05,
                                      p: float = 2.0, optimizer: str = "adam", init: torch.Tensor | None = None,
                                      generator: torch.Generator | None = None, seed: int | None = None,
                                      root: bool = True, reduction: str = "mean",
                                      return_locations: bool = False
                                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """von Mises-Fisher distributional sliced Wasserstein (v-DSW):

        v-DSW_p(mu, nu; kappa) = max_{eps in S^{d-1}} (E_{theta ~ vMF(eps, kappa)} W_p^p(theta # mu, theta # nu))^(1/p)

    The location eps (one per pair) is found by `n_iters` steps of projected ascent (Adam or "sgd") on the
    Monte-Carlo estimate with `n_projections` reparameterised vMF samples drawn afresh at every step, with
    x and y detached (the gradient with respect to eps through the sampler is computed in closed form);
    the value is then evaluated with fresh samples around the final eps, with gradients to x, y and the
    weights. kappa -> 0 gives SW, kappa -> inf (allowed) Max-SW. `init`: starting location(s) [d] or [B, d];
    random otherwise. `generator` or `seed` (an int) make the draws reproducible.
    `return_locations=True` also returns eps, [d] or [B, d].

    torch.compile: for d = 3 it compiles with fullgraph=True (no generator/seed: torch cannot trace a
    Generator object). For d != 3 the vMF rejection sampler decides on the host when every sample is
    accepted (see `vmf_sample`), so it compiles with graph breaks (fullgraph=False).

    >>> import torch, lossforge
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(64, 3, generator=g, dtype=torch.float64) * torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64)
    >>> y = torch.randn(64, 3, generator=g, dtype=torch.float64)
    >>> value, eps = lossforge.distributional_sliced_wasserstein(x, y, 50.0, init=torch.tensor([0.0, 1.0, 0.0]),
    ...                                                          n_iters=100, seed=0, return_locations=True)
    >>> bool(eps[0].abs() > 0.9)  # the ascent moved eps to the stretched axis
    True
    """
    X, Y, WX, WY, single = _prepare(x, y, x_weights, y_weights)
    p = _check_p(p)
    _check_reduction(reduction)
    n_iters, lr = _check_ascent(n_iters, lr, optimizer)
    L = _check_count(n_projections, "n_projections")
    B, _, d = X.shape
    if d < 2:
        raise ValueError(f"distributional_sliced_wasserstein needs d >= 2 (vMF directions), got d={d}")
    k = _vmf_kappa(kappa, (B,), X.device)
    generator = _make_generator(generator, seed, X.device)
    asc = _Ascent(_initial_directions(init, B, d, X, generator, single), lr, optimizer)
    Xd, Yd = X.detach(), Y.detach()
    WXd = None if WX is None else WX.detach()
    WYd = None if WY is None else WY.detach()
    with torch.no_grad():
        for _ in range(n_iters):
            mu = asc.theta
            z = _vmf_base(k, (B,), d, L, generator, X.dtype, X.device)  # [B, L, d] about e_1
            proj = _vmf_map(mu, z).transpose(-1, -2).contiguous()  # [B, d, L]
            value, _, _, _, _, g = ops.sliced_wasserstein(Xd, Yd, WXd, WYd, proj, p, False, False, True)
            G = (_root_grad_scale(value, p)[:, None, None] * g).transpose(-1, -2)  # d objective / d sample
            asc.step(_vmf_map_grad(mu, z, G))
    loc = asc.theta.detach()
    proj = _vmf_map(loc, _vmf_base(k, (B,), d, L, generator, X.dtype, X.device)).transpose(-1, -2).contiguous()
    out = sliced_wasserstein(X, Y, WX, WY, p=p, projections=proj, root=root, reduction="none")
    out = _reduce(out, single, reduction).to(x.dtype)
    if return_locations:
        return out, (loc[0] if single else loc)
    return out
