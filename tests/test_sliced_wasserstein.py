"""Sliced Wasserstein family: SW against POT and the pure-torch reference, gradients, opcheck, ties and
sorting paths, vMF sampling, Max-SW, v-DSW, the amortized module, and bad input."""
import math
import re

import ot  # POT: the independent oracle (a test dependency; never skipped when missing)
import pytest
import scipy.stats
import torch

import lossforge
from lossforge import nn as lfnn
from lossforge.reference import sliced_wasserstein as ref
from lossforge import random_projections

ops = torch.ops.lossforge
F64 = torch.float64


def unit_columns(t):
    return t / t.norm(dim=-2, keepdim=True)


def rand_proj(d, L, gen, batch=None, dtype=F64, device="cpu"):
    shape = (d, L) if batch is None else (batch, d, L)
    return unit_columns(torch.randn(shape, generator=gen, dtype=dtype)).to(device)


def clouds(B, N, M, d, gen, weights=False, dtype=F64, device="cpu"):
    x = torch.randn(B, N, d, generator=gen, dtype=dtype)
    y = 1.3 * torch.randn(B, M, d, generator=gen, dtype=dtype) + 0.4
    wx = torch.rand(B, N, generator=gen, dtype=dtype) + 0.05 if weights else None
    wy = torch.rand(B, M, generator=gen, dtype=dtype) + 0.05 if weights else None
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(x), mv(y), mv(wx), mv(wy)


# ---------------------------------------------------------------------------------------------------
# Values: POT (independent oracle) and the reference


@pytest.mark.parametrize("sizes", [(40, 40), (40, 29), (1, 7)])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
def test_matches_pot(sizes, weights, p, gen):
    N, M = sizes
    B, d, L = 3, 3, 8
    x, y, wx, wy = clouds(B, N, M, d, gen, weights)
    P = rand_proj(d, L, gen)
    ours = lossforge.sliced_wasserstein(x, y, wx, wy, projections=P, p=p, reduction="none")
    for b in range(B):
        a = None if wx is None else (wx[b] / wx[b].sum()).numpy()
        bb = None if wy is None else (wy[b] / wy[b].sum()).numpy()
        want = ot.sliced_wasserstein_distance(x[b].numpy(), y[b].numpy(), a, bb, projections=P.numpy(), p=p)
        assert ours[b].item() == pytest.approx(float(want), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("sizes,weights", [((33, 33), False), ((33, 20), False), ((25, 25), True), ((17, 30), True)])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
def test_values_and_gradients_match_reference(sizes, weights, shared, p, device, gen):
    N, M = sizes
    B, d, L = 3, 4, 6
    x, y, wx, wy = clouds(B, N, M, d, gen, weights, device=device)
    P = rand_proj(d, L, gen, None if shared else B, device=device)
    inputs = [t.requires_grad_() for t in (x, y, wx, wy, P) if t is not None]
    for root in (True, False):
        ours = lossforge.sliced_wasserstein(x, y, wx, wy, projections=P, p=p, root=root, reduction="sum")
        want = ref.sliced_wasserstein(x, y, wx, wy, projections=P, p=p, root=root, reduction="sum")
        torch.testing.assert_close(ours, want, rtol=1e-11, atol=1e-12)
        g_ours = torch.autograd.grad(ours, inputs)
        g_want = torch.autograd.grad(want, inputs)
        for a, b in zip(g_ours, g_want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_float32_agrees_with_float64(device, gen):
    x, y, _, _ = clouds(4, 300, 300, 3, gen, device=device)
    P = rand_proj(3, 20, gen, device=device)
    xs, ys, Ps = (t.float().requires_grad_() for t in (x, y, P))
    x64, y64, P64 = (t.clone().requires_grad_() for t in (x, y, P))
    ours = lossforge.sliced_wasserstein(xs, ys, projections=Ps, reduction="sum")
    want = lossforge.sliced_wasserstein(x64, y64, projections=P64, reduction="sum")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (xs, ys, Ps)), torch.autograd.grad(want, (x64, y64, P64))):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_half_precision_input_computes_in_float32(gen):
    x, y, _, _ = clouds(2, 64, 64, 3, gen)
    P = rand_proj(3, 10, gen)
    out = lossforge.sliced_wasserstein(x.half(), y.half(), projections=P)
    assert out.dtype == torch.float16
    want = lossforge.sliced_wasserstein(x.half().float(), y.half().float(), projections=P.float())
    torch.testing.assert_close(out.float(), want, rtol=2e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# gradcheck and opcheck


@pytest.mark.parametrize("case", ["equal", "unequal", "weighted"])
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
def test_gradcheck(case, p, gen):
    N, M = (9, 9) if case != "unequal" else (9, 6)
    x, y, wx, wy = clouds(2, N, M, 3, gen, weights=case == "weighted")
    P = rand_proj(3, 4, gen, batch=2)
    args = [t.requires_grad_() for t in (x, y, wx, wy, P) if t is not None]

    def f(*a):
        if case == "weighted":
            xx, yy, wxx, wyy, PP = a
        else:
            (xx, yy, PP), wxx, wyy = a, None, None
        return lossforge.sliced_wasserstein(xx, yy, wxx, wyy, projections=PP, p=p, reduction="none")

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


def test_gradcheck_shared_projections_root(gen):
    x, y, _, _ = clouds(3, 8, 11, 2, gen)
    P = rand_proj(2, 5, gen)
    args = [t.requires_grad_() for t in (x, y, P)]
    f = lambda a, b, c: lossforge.sliced_wasserstein(a, b, projections=c, p=2.0, root=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_opcheck(weights, shared, gen):
    x, y, wx, wy = clouds(2, 7, 5 if weights else 7, 3, gen, weights)
    P = rand_proj(3, 4, gen, None if shared else 2)
    for t in (x, y, wx, wy, P):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(ops.sliced_wasserstein.default, (x, y, wx, wy, P, 2.0, True, weights, True))
    torch.library.opcheck(ops.sliced_wasserstein.default,
                          (x.detach(), y.detach(), None, None, P.detach(), 1.5, False, False, False))


def test_raw_op_without_gradient_flags_refuses_backward(gen):
    x, y, _, _ = clouds(1, 5, 5, 2, gen)
    x.requires_grad_()
    P = rand_proj(2, 3, gen)
    value = ops.sliced_wasserstein(x, y, None, None, P, 2.0, False, False, False)[0]
    with pytest.raises(RuntimeError, match="grad_points=False"):
        value.sum().backward()


def test_double_backward_is_refused(gen):
    x, y, _, _ = clouds(1, 6, 6, 2, gen)
    x.requires_grad_()
    loss = lossforge.sliced_wasserstein(x, y, projections=rand_proj(2, 3, gen))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


# ---------------------------------------------------------------------------------------------------
# Ties, sorting paths, determinism


def test_ties_follow_stable_index_order(gen):
    # Integer coordinates: many exactly equal projections; gradients are assigned by (value, index) order,
    # the order of torch.sort(stable=True) in the reference.
    x = torch.randint(-3, 4, (2, 60, 3), generator=gen).to(F64).requires_grad_()
    y = torch.randint(-3, 4, (2, 60, 3), generator=gen).to(F64).requires_grad_()
    P = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]], dtype=F64)  # axis-aligned directions
    ours = lossforge.sliced_wasserstein(x, y, projections=P, root=False, reduction="sum")
    want = ref.sliced_wasserstein(x, y, projections=P, root=False, reduction="sum")
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (x, y)), torch.autograd.grad(want, (x, y))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_negative_zero_ties_with_positive_zero(gen):
    x = torch.tensor([[[0.0], [-0.0], [1.0], [-0.0]]], dtype=F64, requires_grad=True)
    y = torch.tensor([[[0.5], [0.0], [-1.0], [2.0]]], dtype=F64, requires_grad=True)
    P = torch.ones(1, 1, dtype=F64)
    ours = lossforge.sliced_wasserstein(x, y, projections=P, root=False)
    want = ref.sliced_wasserstein(x, y, projections=P, root=False)
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(want, x)[0])


@pytest.mark.parametrize("kind", ["clustered", "outlier", "constant", "large_n"])
def test_sorting_paths(kind, gen):
    # clustered / outlier: most keys collide, the kernel falls back to the exact radix sort;
    # constant: every projection equal; large_n: more than 2^16 points (64-bit packed keys).
    N, L = (70000, 2) if kind == "large_n" else (3000, 3)
    x = torch.randn(1, N, 2, generator=gen, dtype=F64)
    if kind == "clustered":
        x = 1e-9 * x + torch.randint(0, 3, (1, N, 1), generator=gen).to(F64)
    elif kind == "outlier":
        x[0, 5] = 1e9
    elif kind == "constant":
        x = torch.full_like(x, 0.25)
    y = torch.randn(1, N, 2, generator=gen, dtype=F64)
    x.requires_grad_()
    P = rand_proj(2, L, gen)
    ours = lossforge.sliced_wasserstein(x, y, projections=P, root=False)
    want = ref.sliced_wasserstein(x, y, projections=P, root=False)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(want, x)[0], rtol=1e-9,
                               atol=1e-15)


def test_bitwise_deterministic_across_thread_counts(gen):
    x, y, wx, wy = clouds(3, 500, 400, 3, gen, weights=True, dtype=torch.float32)
    P = rand_proj(3, 50, gen, dtype=torch.float32)
    args = (x, y, wx, wy, P, 2.0, True, True, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.sliced_wasserstein(*args)
        torch.set_num_threads(max(2, before))
        many = ops.sliced_wasserstein(*args)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Properties


def test_invariant_to_permuting_points(gen):
    x, y, wx, wy = clouds(2, 50, 37, 3, gen, weights=True)
    P = rand_proj(3, 12, gen)
    px, py = torch.randperm(50, generator=gen), torch.randperm(37, generator=gen)
    a = lossforge.sliced_wasserstein(x, y, wx, wy, projections=P, reduction="none")
    b = lossforge.sliced_wasserstein(x[:, px], y[:, py], wx[:, px], wy[:, py], projections=P, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_symmetric_in_x_and_y(gen):
    x, y, wx, wy = clouds(2, 45, 31, 3, gen, weights=True)
    P = rand_proj(3, 12, gen)
    a = lossforge.sliced_wasserstein(x, y, wx, wy, projections=P, p=1.5, reduction="none")
    b = lossforge.sliced_wasserstein(y, x, wy, wx, projections=P, p=1.5, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_zero_between_identical_clouds_and_weight_scale_invariance(gen):
    x, _, wx, _ = clouds(2, 30, 30, 3, gen, weights=True)
    P = rand_proj(3, 7, gen)
    assert lossforge.sliced_wasserstein(x, x, projections=P, reduction="sum").item() == 0.0
    assert lossforge.sliced_wasserstein(x, x, wx, wx, projections=P, reduction="sum").item() == pytest.approx(0, abs=1e-15)
    y = torch.randn(2, 20, 3, generator=gen, dtype=F64)
    wy = torch.rand(2, 20, generator=gen, dtype=F64)
    a = lossforge.sliced_wasserstein(x, y, wx, wy, projections=P, reduction="none")
    b = lossforge.sliced_wasserstein(x, y, 7 * wx, 0.1 * wy, projections=P, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_zero_weight_points_do_not_count(gen):
    x, y, wx, wy = clouds(1, 20, 15, 3, gen, weights=True)
    wx[0, :5] = 0
    P = rand_proj(3, 6, gen)
    a = lossforge.sliced_wasserstein(x, y, wx, wy, projections=P)
    b = lossforge.sliced_wasserstein(x[:, 5:], y, wx[:, 5:], wy, projections=P)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    wx.requires_grad_()
    g = torch.autograd.grad(lossforge.sliced_wasserstein(x, y, wx, wy, projections=P), wx)[0]
    gr = torch.autograd.grad(ref.sliced_wasserstein(x, y, wx, wy, projections=P), wx)[0]
    torch.testing.assert_close(g[:, 5:], gr[:, 5:], rtol=1e-9, atol=1e-12)
    # A zero weight sits at a kink (it cannot decrease): its gradient is the one-sided derivative.
    h = 1e-7
    with torch.no_grad():
        for k in range(5):
            w2 = wx.detach().clone()
            w2[0, k] += h
            fd = (lossforge.sliced_wasserstein(x, y, w2, wy, projections=P) - a) / h
            assert g[0, k].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("p", [1.0, 2.0, 1.5])
def test_zero_weight_point_anywhere_changes_nothing(dtype, p, device, gen):
    """A point of weight 0 (a padding sentinel) at any coordinates, on either side, leaves the value and
    every other point's gradients (points and weights) as they are. The rounding sliver of the cumulative
    weights used to be charged to the last sorted atom: a sentinel at 1e8 there moved the value (by up to
    47x), and the huge trade at its boundary cancelled in the weight gradients of all the others."""
    for trial in range(40):
        N, M, d, L = 7, 5, 3, 4
        x, y, wx, wy = clouds(1, N, M, d, gen, weights=True, dtype=dtype)
        P = rand_proj(d, L, gen, dtype=dtype)
        far = [1e8, -1e8, 1e4, 3.0][trial % 4]
        side = trial % 3  # sentinels in x, in y, or in both
        kx, ky = int(torch.randint(0, N + 1, (1,), generator=gen)), int(torch.randint(0, M + 1, (1,), generator=gen))

        def pad(c, w, k):
            point = torch.full((1, 1, d), far, dtype=dtype) * (1 - 2 * torch.rand(1, 1, d, generator=gen, dtype=dtype))
            return torch.cat([c[:, :k], point, c[:, k:]], 1), torch.cat([w[:, :k], w.new_zeros(1, 1), w[:, k:]], 1)

        x2, wx2 = pad(x, wx, kx) if side != 1 else (x, wx)
        y2, wy2 = pad(y, wy, ky) if side != 0 else (y, wy)
        keep_x = [i for i in range(x2.shape[1]) if side == 1 or i != kx]
        keep_y = [j for j in range(y2.shape[1]) if side == 0 or j != ky]
        args = [t.to(device) for t in (x, y, wx, wy, P)]
        args2 = [t.to(device) for t in (x2, y2, wx2, wy2, P)]
        a = [t.cpu() for t in ops.sliced_wasserstein(*args, p, True, True, True)]
        b = [t.cpu() for t in ops.sliced_wasserstein(*args2, p, True, True, True)]
        tol = 1e-10 if dtype == F64 else 2e-4
        torch.testing.assert_close(b[0], a[0], rtol=tol, atol=tol)
        torch.testing.assert_close(b[1][:, keep_x], a[1], rtol=tol, atol=tol)
        torch.testing.assert_close(b[2][:, keep_y], a[2], rtol=tol, atol=tol)
        torch.testing.assert_close(b[3][:, keep_x], a[3], rtol=tol * 100, atol=tol * 100)
        torch.testing.assert_close(b[4][:, keep_y], a[4], rtol=tol * 100, atol=tol * 100)
        if side != 1:
            assert (b[1][:, kx] == 0).all()  # the sentinel itself gets no point gradient


def test_reductions_single_pair_and_generated_projections(gen):
    x, y, _, _ = clouds(3, 20, 20, 3, gen)
    P = rand_proj(3, 9, gen)
    none = lossforge.sliced_wasserstein(x, y, projections=P, reduction="none")
    assert none.shape == (3,)
    torch.testing.assert_close(lossforge.sliced_wasserstein(x, y, projections=P), none.mean())
    torch.testing.assert_close(lossforge.sliced_wasserstein(x, y, projections=P, reduction="sum"), none.sum())
    single = lossforge.sliced_wasserstein(x[1], y[1], projections=P)
    assert single.dim() == 0
    torch.testing.assert_close(single, none[1])
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    a = lossforge.sliced_wasserstein(x, y, n_projections=17, generator=g1)
    b = lossforge.sliced_wasserstein(x, y, n_projections=17, generator=g2)
    assert torch.equal(a, b)
    theta = random_projections(3, 17, generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(theta.norm(dim=0), torch.ones(17, dtype=F64))
    torch.testing.assert_close(a, lossforge.sliced_wasserstein(x, y, projections=theta))


def test_sliced_wasserstein_in_1d_is_exact_wasserstein(gen):
    x = torch.randn(1, 40, 1, generator=gen, dtype=F64)
    y = torch.randn(1, 25, 1, generator=gen, dtype=F64) + 1
    wx = torch.rand(1, 40, generator=gen, dtype=F64)
    wy = torch.rand(1, 25, generator=gen, dtype=F64)
    ours = lossforge.sliced_wasserstein(x, y, wx, wy, projections=torch.ones(1, 1, dtype=F64), p=1.0)
    want = scipy.stats.wasserstein_distance(x.flatten().numpy(), y.flatten().numpy(), wx.flatten().numpy(),
                                            wy.flatten().numpy())
    assert ours.item() == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors(gen):
    x, y, wx, wy = clouds(2, 10, 8, 3, gen, weights=True)
    P = rand_proj(3, 4, gen)
    sw = lossforge.sliced_wasserstein
    with pytest.raises(ValueError, match="same dimension d"):
        sw(x, torch.randn(2, 8, 2, dtype=F64))
    with pytest.raises(ValueError, match="same batch size"):
        sw(x, y[:1])
    with pytest.raises(ValueError, match=r"\[N, d\] or \[B, N, d\]"):
        sw(x[0, 0], y[0, 0])
    with pytest.raises(ValueError, match="both be single point clouds"):
        sw(x[0], y)
    with pytest.raises(TypeError, match="same dtype"):
        sw(x, y.float())
    with pytest.raises(TypeError, match="floating-point"):
        sw(x.long(), y.long())
    with pytest.raises(TypeError, match="torch.Tensor"):
        sw(x.numpy(), y)
    with pytest.raises(ValueError, match="at least one point"):
        sw(x[:, :0], y)
    bad = wx.clone()
    bad[1, 3] = -0.5
    with pytest.raises(ValueError, match="x_weights must be non-negative"):
        sw(x, y, bad, wy)
    zero = wy.clone()
    zero[1] = 0
    with pytest.raises(ValueError, match="y_weights sum to 0 for pair 1"):
        sw(x, y, wx, zero)
    nan_w = wx.clone()
    nan_w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x_weights contains NaN"):
        sw(x, y, nan_w, wy)
    with pytest.raises(ValueError, match=r"x_weights must have shape \(2, 10\)"):
        sw(x, y, wx[:, :5], wy)
    nan_x = x.clone()
    nan_x[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        sw(nan_x, y)
    inf_y = y.clone()
    inf_y[0, 0, 1] = float("inf")
    with pytest.raises(ValueError, match="y contains NaN or infinite"):
        sw(x, inf_y)
    with pytest.raises(ValueError, match="p must be a finite number >= 1"):
        sw(x, y, p=0.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sw(x, y, reduction="max")
    with pytest.raises(ValueError, match=r"projections must have shape \[3, L\] or \[2, 3, L\]"):
        sw(x, y, projections=P[:2])
    with pytest.raises(ValueError, match="n_projections must be >= 1"):
        sw(x, y, n_projections=0)
    nan_p = P.clone()
    nan_p[0, 0] = float("nan")
    with pytest.raises(ValueError, match="projections contains NaN"):
        sw(x, y, projections=nan_p)


def test_kernel_checks_when_called_directly(gen):
    x, y, wx, wy = clouds(2, 10, 10, 3, gen, weights=True)
    P = rand_proj(3, 4, gen)
    x[0, 1, 1] = float("nan")
    with pytest.raises(RuntimeError, match="not finite"):
        ops.sliced_wasserstein(x, y, None, None, P, 2.0, False, False, False)
    x[0, 1, 1] = 0
    wx[1, 2] = -1
    with pytest.raises(RuntimeError, match="non-negative"):
        ops.sliced_wasserstein(x, y, wx, wy, P, 2.0, False, False, False)
    with pytest.raises(RuntimeError, match="p must be"):
        ops.sliced_wasserstein(x, y, None, None, P, 0.5, False, False, False)
    with pytest.raises(RuntimeError, match="projections must be"):
        ops.sliced_wasserstein(x, y, None, None, P[:2].contiguous(), 2.0, False, False, False)


# ---------------------------------------------------------------------------------------------------
# vMF sampling


@pytest.mark.parametrize("d,kappa", [(3, 0.0), (3, 0.7), (3, 8.0), (3, 200.0), (2, 3.0), (5, 2.0), (10, 25.0)])
def test_vmf_unit_norm_and_mean_resultant_length(d, kappa, gen):
    n = 20000
    loc = torch.randn(d, generator=gen, dtype=F64)
    loc = loc / loc.norm()
    s = lossforge.vmf_sample(loc, kappa, n, generator=gen)
    assert s.shape == (n, d)
    torch.testing.assert_close(s.norm(dim=-1), torch.ones(n, dtype=F64))
    w = s @ loc
    want = ref.vmf_mean_resultant_length(kappa, d)
    # the sample mean of w is within 5 standard errors of A_d(kappa); the mean direction is loc
    assert abs(w.mean().item() - want) < 5 * w.std().item() / math.sqrt(n) + 1e-12
    perp = s.mean(0) - w.mean() * loc
    assert perp.norm().item() < 5 * math.sqrt(d / n)


def test_vmf_batched_and_reparameterized(gen):
    loc = torch.randn(4, 3, generator=gen, dtype=F64)
    kappa = torch.tensor([0.5, 2.0, 10.0, 50.0], dtype=F64)
    s = lossforge.vmf_sample(loc, kappa, 7, generator=gen)
    assert s.shape == (4, 7, 3)
    target = torch.randn(3, generator=gen, dtype=F64)

    def f(l):
        g = torch.Generator().manual_seed(11)  # the same base noise for every evaluation
        return (lossforge.vmf_sample(l, kappa, 7, generator=g) @ target).square().sum()

    assert torch.autograd.gradcheck(f, (loc.clone().requires_grad_(),))
    # loc on (or opposite to) e_1: the Householder reflection is guarded
    for v in ([2.0, 0, 0], [-1.0, 0, 0]):
        l = torch.tensor([v], dtype=F64, requires_grad=True)
        out = lossforge.vmf_sample(l, 5.0, 9, generator=gen)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(1, 9, dtype=F64))
        (out.sum()).backward()
        assert torch.isfinite(l.grad).all()
        assert (out[0] @ (l.detach()[0] / l.detach()[0].norm())).mean() > 0.5


def test_vmf_bad_input(gen):
    with pytest.raises(ValueError, match=r"kappa must be >= 0 \(inf: the point mass at loc\), got -1.0"):
        lossforge.vmf_sample(torch.ones(3), -1.0, 4)
    with pytest.raises(ValueError, match="d >= 2"):
        lossforge.vmf_sample(torch.ones(1), 1.0, 4)
    with pytest.raises(ValueError, match="n must be >= 1"):
        lossforge.vmf_sample(torch.ones(3), 1.0, 0)
    with pytest.raises(ValueError, match="broadcastable"):
        lossforge.vmf_sample(torch.ones(2, 3), torch.ones(3), 4)
    with pytest.raises(TypeError, match="kappa must be a float or a tensor"):
        lossforge.vmf_sample(torch.ones(3), "big", 4)


# ---------------------------------------------------------------------------------------------------
# Max-SW and v-DSW


def w_along(x, y, theta, p=2.0):
    return ref.sliced_wasserstein(x, y, projections=theta.unsqueeze(-1), p=p, reduction="none")


def test_max_sliced_wasserstein_finds_the_best_direction(gen):
    # In 2D the maximum over the circle is found by brute force on a fine grid.
    x = torch.randn(2, 60, 2, generator=gen, dtype=F64) * torch.tensor([3.0, 0.5], dtype=F64)
    y = torch.randn(2, 60, 2, generator=gen, dtype=F64)
    angles = torch.linspace(0, math.pi, 1801, dtype=F64)
    grid = torch.stack([angles.cos(), angles.sin()])  # [2, 1801]
    # W_2 along every grid direction, per pair: the brute-force maximum
    per_dir = torch.stack([ref.wasserstein_1d_pp((x[b] @ grid).T, (y[b] @ grid).T).sqrt().max() for b in range(2)])
    value, theta = lossforge.max_sliced_wasserstein(x, y, n_iters=100, lr=0.05, generator=gen, reduction="none",
                                                    return_projections=True)
    assert theta.shape == (2, 2)
    torch.testing.assert_close(theta.norm(dim=-1), torch.ones(2, dtype=F64))
    assert torch.all(value >= 0.995 * per_dir)
    # The true maximum may sit between grid directions: W_2 along theta is Lipschitz in theta with constant
    # rms|x| + rms|y|, and every direction is within half a grid step of the grid.
    lipschitz = x.square().sum(-1).mean(-1).sqrt() + y.square().sum(-1).mean(-1).sqrt()
    assert torch.all(value <= per_dir + lipschitz * (math.pi / 1800) / 2)
    torch.testing.assert_close(value, w_along(x, y, theta))


def test_max_sliced_wasserstein_gradients_and_options(gen):
    x, y, wx, wy = clouds(2, 30, 20, 3, gen, weights=True)
    x.requires_grad_()
    init = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    v0 = lossforge.max_sliced_wasserstein(x, y, wx, wy, n_iters=0, init=init)
    torch.testing.assert_close(v0, ref.sliced_wasserstein(x, y, wx, wy, projections=init[:, None]))
    v = lossforge.max_sliced_wasserstein(x, y, wx, wy, n_iters=40, init=init, optimizer="sgd", lr=0.5)
    assert v.item() >= v0.item()
    (g,) = torch.autograd.grad(v, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    single = lossforge.max_sliced_wasserstein(x[0], y[0], n_iters=5, generator=gen)
    assert single.dim() == 0
    with pytest.raises(ValueError, match="optimizer must be"):
        lossforge.max_sliced_wasserstein(x, y, optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        lossforge.max_sliced_wasserstein(x, y, lr=0.0)
    with pytest.raises(ValueError, match=r"init must have shape \[3\] or \[2, 3\]"):
        lossforge.max_sliced_wasserstein(x, y, init=torch.ones(2, dtype=F64))


def test_distributional_sliced_wasserstein(gen):
    x = torch.randn(2, 80, 3, generator=gen, dtype=F64) * torch.tensor([2.5, 1.0, 0.5], dtype=F64)
    y = torch.randn(2, 80, 3, generator=gen, dtype=F64)
    x.requires_grad_()
    init = torch.tensor([0.5, 0.0, -0.75**0.5], dtype=F64)  # W_2 ~ 0.3 there; ~1.5 along the first axis
    g = torch.Generator().manual_seed(3)
    before = lossforge.distributional_sliced_wasserstein(x, y, 20.0, n_projections=400, n_iters=0, init=init,
                                                         generator=g, reduction="none")
    after, loc = lossforge.distributional_sliced_wasserstein(x, y, 20.0, n_projections=400, n_iters=60, init=init,
                                                             generator=g, reduction="none", return_locations=True)
    assert torch.all(after > 1.3 * before)
    torch.testing.assert_close(loc.norm(dim=-1), torch.ones(2, dtype=F64))
    assert torch.all(loc[:, 0].abs() > 0.9)  # the stretched axis
    # kappa -> inf: v-DSW -> Max-SW (all samples at loc); kappa -> 0: SW
    sharp, loc2 = lossforge.distributional_sliced_wasserstein(x, y, 1e6, n_projections=8, n_iters=60, generator=g,
                                                              reduction="none", return_locations=True)
    torch.testing.assert_close(sharp, w_along(x, y, loc2), rtol=1e-3, atol=1e-6)
    flat = lossforge.distributional_sliced_wasserstein(x, y, 0.0, n_projections=4000, n_iters=3, generator=g)
    sw = lossforge.sliced_wasserstein(x, y, n_projections=4000, generator=g)
    assert flat.item() == pytest.approx(sw.item(), rel=0.05)
    (gx,) = torch.autograd.grad(after.sum(), x)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    wx = torch.rand(2, 80, generator=gen, dtype=F64)
    assert torch.isfinite(lossforge.distributional_sliced_wasserstein(x, y, 5.0, wx, n_iters=3, generator=g))


# ---------------------------------------------------------------------------------------------------
# Amortized v-DSW


def test_amortizer_is_permutation_invariant_symmetric_and_unit(gen):
    torch.manual_seed(0)
    m = lfnn.AmortizedSlicedWasserstein(3, kappa=10.0, n_projections=50).double()
    x = torch.randn(4, 40, 3, generator=gen, dtype=F64)
    y = torch.randn(4, 33, 3, generator=gen, dtype=F64)
    e = m.direction(x, y)
    assert e.shape == (4, 3)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4, dtype=F64))
    torch.testing.assert_close(m.direction(y, x), e)
    torch.testing.assert_close(m.direction(x[:, torch.randperm(40, generator=gen)], y[:, torch.randperm(33, generator=gen)]), e)


def test_amortized_training_step_moves_directions_to_the_informative_axis(gen):
    torch.manual_seed(0)
    m = lfnn.AmortizedSlicedWasserstein(3, kappa=20.0, n_projections=64, amortizer_lr=0.02).double()
    scale = torch.tensor([0.3, 0.3, 3.0], dtype=F64)
    x = torch.randn(6, 48, 3, generator=gen, dtype=F64) * scale
    y = torch.randn(6, 48, 3, generator=gen, dtype=F64) * 0.3
    g = torch.Generator().manual_seed(1)
    first = m.amortizer_step(x, y, generator=g)
    for _ in range(40):
        last = m.amortizer_step(x, y, generator=g)
    assert last > first
    e = m.direction(x, y)
    assert e[:, 2].abs().min() > 0.9
    # the loss: gradients reach x and y, not the amortizer
    xr = x.clone().requires_grad_()
    loss = m(xr, y, generator=g)
    assert loss.dim() == 0
    loss.backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())  # the direction is a constant for the loss
    with pytest.raises(ValueError, match="amortizer must be"):
        lfnn.AmortizedSlicedWasserstein(3, kappa=1.0, amortizer="mlp")


def test_amortizer_step_survives_an_identical_pair(gen):
    # SW = 0 for one pair: the root's infinite slope there must not turn the amortizer's weights into NaN
    torch.manual_seed(0)
    m = lfnn.AmortizedSlicedWasserstein(3, kappa=10.0, n_projections=20).double()
    x = torch.randn(4, 30, 3, generator=gen, dtype=F64)
    y = torch.randn(4, 30, 3, generator=gen, dtype=F64)
    y[1] = x[1]
    before = [p.detach().clone() for p in m.parameters()]
    value = m.amortizer_step(x, y, generator=gen)
    assert math.isfinite(value) and value > 0
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


# ---------------------------------------------------------------------------------------------------
# CUDA against the CPU kernel (itself checked against POT and the reference above)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["fast", "fast_large", "weighted", "weighted_global", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cuda_matches_cpu(case, dtype, gen):
    # fast_large: padded length 4096 in shared memory; weighted_global: the working arrays do not fit in
    # shared memory and live in global scratch.
    N, M, weights = {"fast": (300, 300, False), "fast_large": (3000, 3000, False), "weighted": (257, 100, True),
                     "weighted_global": (9000, 7000, True), "ties": (200, 200, False)}[case]
    x, y, wx, wy = clouds(3, N, M, 3, gen, weights, dtype=dtype)
    if case == "ties":
        x, y = torch.round(2 * x), torch.round(2 * y)
    P = rand_proj(3, 40, gen, batch=3, dtype=dtype)
    args = [x, y, wx, wy, P]
    cpu = ops.sliced_wasserstein(*args, 1.5, True, weights, True)
    gpu = ops.sliced_wasserstein(*[None if t is None else t.cuda() for t in args], 1.5, True, weights, True)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, **tol)


@pytest.mark.cuda
def test_cuda_deterministic_and_on_the_current_stream(gen):
    x, y, wx, wy = clouds(4, 500, 300, 3, gen, weights=True, dtype=torch.float32, device="cuda")
    P = rand_proj(3, 64, gen, dtype=torch.float32, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        first = ops.sliced_wasserstein(x, y, wx, wy, P, 2.0, True, True, True)
        second = ops.sliced_wasserstein(x, y, wx, wy, P, 2.0, True, True, True)
    s.synchronize()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("weights", [False, True])
def test_cuda_non_finite_projections_give_nan_not_out_of_bounds(weights, gen):
    # CUDA does not check values (that would synchronise): NaN points, and finite points whose projections
    # overflow to +-inf, must give a NaN/inf value and in-range gradient writes (N = 300: padded to 512).
    x, y, wx, wy = clouds(2, 300, 300 if not weights else 200, 3, gen, weights, dtype=torch.float32)
    x[0, 5, 1] = float("nan")
    x[1, :7] = 3e38  # x . theta overflows for most directions
    P = rand_proj(3, 16, gen, dtype=torch.float32)
    args = [None if t is None else t.cuda() for t in (x, y, wx, wy, P)]
    value, gx, gy, *_ = ops.sliced_wasserstein(*args, 2.0, True, weights, True)
    torch.cuda.synchronize()
    assert not torch.isfinite(value).any()
    assert gx.shape == x.shape and gy.shape == y.shape


@pytest.mark.slow
def test_torch_compile_fullgraph(gen):
    x, y, wx, wy = clouds(2, 40, 30, 3, gen, weights=True, dtype=torch.float32)
    P = rand_proj(3, 16, gen, dtype=torch.float32)
    x.requires_grad_()

    def loss(a, b, wa, wb, proj):
        return lossforge.sliced_wasserstein(a, b, wa, wb, projections=proj, p=2.0)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(x, y, wx, wy, P)
    want = loss(x, y, wx, wy, P)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


def test_errors_name_the_problem(gen):
    m = lfnn.AmortizedSlicedWasserstein(3, kappa=10.0)
    x = torch.randn(2, 10, 3, generator=gen, dtype=F64)
    with pytest.raises(TypeError, match=r"x is torch.float64 but the amortizer's parameters are torch.float32: "
                                        r"convert the clouds \(x.to\(torch.float32\)\) or the module"):
        m(x, x)
    with pytest.raises(TypeError, match="y is torch.float64 but the amortizer's parameters are torch.float32"):
        m(x.float(), x)
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        m(x.half(), x.half())
    assert torch.isfinite(m.double()(x, x + 1))
    # finite clouds whose distance overflows float32: the error says so (it blamed the finite inputs)
    big = torch.randn(1, 10, 3, generator=gen) * 1e30
    with pytest.raises(ValueError, match="max_sliced_wasserstein: the ascent overflowed float32: .* rescale the "
                                         "clouds or use float64"):
        lossforge.max_sliced_wasserstein(big, big + 1e29)
    assert torch.isfinite(lossforge.max_sliced_wasserstein(big.double(), big.double() + 1e29))


# ---------------------------------------------------------------------------------------------------
# vMF: NaN / zero locations, a map smooth at e_1, any kappa up to inf (issue 13)

from lossforge._sliced_wasserstein import _vmf_map, _vmf_map_grad  # noqa: E402


def test_vmf_nan_location_propagates_and_zero_location_raises(gen):
    for d in (3, 5):
        loc = torch.randn(3, d, generator=gen, dtype=F64)
        loc[1, 1] = float("nan")
        s = lossforge.vmf_sample(loc, 4.0, 6, generator=gen)
        assert torch.isnan(s[1]).all()  # not finite samples around an arbitrary axis
        assert torch.isfinite(s[0]).all() and torch.isfinite(s[2]).all()
        loc[1] = 0.0
        with pytest.raises(ValueError, match="loc contains a zero vector"):
            lossforge.vmf_sample(loc, 4.0, 6, generator=gen)


@pytest.mark.parametrize("d", [2, 3, 5])
@pytest.mark.parametrize("loc", ["e1", "2e1", "-e1", "near_e1"])
def test_vmf_gradient_at_e1_is_smooth_and_matches_finite_differences(d, loc, gen):
    # The Householder reflection e_1 -> loc had a 0/0 at loc = e_1 (guarded to a zero gradient, and a jump
    # in the samples next to it): the gradient there must exist and match finite differences.
    base = torch.zeros(d, dtype=F64)
    base[0] = {"e1": 1.0, "2e1": 2.0, "-e1": -1.0, "near_e1": 1.0}[loc]
    if loc == "near_e1":
        base[1] = 1e-9
    target = torch.randn(d, generator=gen, dtype=F64)

    def f(l):
        g = torch.Generator().manual_seed(7)  # the same base noise for every evaluation
        return (lossforge.vmf_sample(l, 5.0, 16, generator=g) @ target).square().sum()

    l0 = base.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(l0), l0)
    assert grad[1:].abs().sum() > 1e-3  # the location moves
    assert torch.autograd.gradcheck(f, (base.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


def test_vmf_map_takes_e1_to_loc_and_is_orthogonal(gen):
    for d in (2, 3, 6):
        mu = torch.randn(5, d, generator=gen, dtype=F64)
        mu[0] = 0
        mu[0, 0] = 1  # e_1
        mu[1] = 0
        mu[1, 0] = -1  # -e_1
        mu[2, 0] = 0  # on the switch mu_1 = 0
        mu = mu / mu.norm(dim=-1, keepdim=True)
        eye = torch.eye(d, dtype=F64).expand(5, d, d)
        Q = _vmf_map(mu, eye).transpose(-1, -2)  # columns: the images of the basis vectors
        torch.testing.assert_close(Q[..., 0], mu, rtol=0, atol=1e-15)
        torch.testing.assert_close(Q.transpose(-1, -2) @ Q, eye, rtol=0, atol=1e-14)


def test_vmf_closed_form_location_gradient_matches_autograd(gen):
    # v-DSW's ascent uses the closed-form gradient through the map; autograd through vmf_sample's map is the oracle
    for d in (2, 3, 5):
        mu = torch.randn(4, d, generator=gen, dtype=F64)
        mu[0] = torch.eye(d, dtype=F64)[0]
        mu[1] = -torch.eye(d, dtype=F64)[0]
        mu = mu / mu.norm(dim=-1, keepdim=True)
        z = lossforge.vmf_sample(torch.eye(d, dtype=F64)[0].expand(4, d), 3.0, 9, generator=gen)
        G = torch.randn(4, 9, d, generator=gen, dtype=F64)
        loc = mu.clone().requires_grad_()
        (want,) = torch.autograd.grad((_vmf_map(loc / loc.norm(dim=-1, keepdim=True), z) * G).sum(), loc)
        torch.testing.assert_close(_vmf_map_grad(mu, z, G), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d,kappa", [(3, 7.0), (5, 7.0), (4, 1e8), (3, 1e8), (10, 1e6)])
@pytest.mark.parametrize("loc", ["e1", "-e1", "switch", "random"])
def test_vmf_distribution_is_kept_by_the_map(d, kappa, loc, gen):
    # mean resultant length E<theta, mu> = A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa) (scipy), compared
    # through 1 - A_d so that large kappa (1 - A_d ~ (d-1)/(2 kappa)) is tested at full precision; the
    # mean direction is mu.
    from scipy.special import ive

    n = 20000
    mu = torch.randn(d, generator=gen, dtype=F64)
    if loc == "e1":
        mu = torch.eye(d, dtype=F64)[0]
    elif loc == "-e1":
        mu = -torch.eye(d, dtype=F64)[0]
    elif loc == "switch":
        mu[0] = 1e-12
    mu = mu / mu.norm()
    s = lossforge.vmf_sample(mu, kappa, n, generator=gen)
    one_minus_w = 1 - s @ mu
    want = 1 - ive(d / 2, kappa) / ive(d / 2 - 1, kappa)
    assert abs(one_minus_w.mean().item() - want) < 5 * one_minus_w.std().item() / math.sqrt(n)
    perp = s.mean(0) - (s @ mu).mean() * mu
    assert perp.norm().item() < 5 * math.sqrt(d / n) * math.sqrt(want * 2)


@pytest.mark.parametrize("d", [2, 3, 4, 10])
@pytest.mark.parametrize("kappa", [1e17, 1e20, 1e300, math.inf])
def test_vmf_huge_kappa_gives_the_mean_direction(d, kappa, gen):
    # kappa -> inf is Max-SW's point mass; Wood's sampler used to fail (d >= 4) from kappa = 1e17
    loc = torch.randn(3, d, generator=gen, dtype=F64)
    s = lossforge.vmf_sample(loc, kappa, 50, generator=gen)
    mu = loc / loc.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(s, mu.unsqueeze(-2).expand_as(s), rtol=0, atol=4e-16 if kappa > 1e30 else 1e-7)
    s32 = lossforge.vmf_sample(loc.float(), torch.full((3,), kappa, dtype=F64), 5, generator=gen)
    torch.testing.assert_close(s32, mu.float().unsqueeze(-2).expand_as(s32), rtol=0, atol=1e-6)


def test_dsw_started_at_e1_moves(gen):
    # The reflection's zero gradient at e_1 froze v-DSW started there
    x = torch.randn(2, 80, 3, generator=gen, dtype=F64) * torch.tensor([0.5, 2.5, 0.5], dtype=F64)
    y = torch.randn(2, 80, 3, generator=gen, dtype=F64) * 0.5
    e1 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    for d_extra in (0, 2):  # d = 3 (closed-form w) and d = 5 (Wood's sampler)
        xx = torch.cat([x, torch.zeros(2, 80, d_extra, dtype=F64)], -1)
        yy = torch.cat([y, torch.zeros(2, 80, d_extra, dtype=F64)], -1)
        init = torch.cat([e1, torch.zeros(d_extra, dtype=F64)])
        _, loc = lossforge.distributional_sliced_wasserstein(xx, yy, 20.0, n_projections=64, n_iters=60, init=init,
                                                             seed=1, reduction="none", return_locations=True)
        assert torch.all(loc[:, 1].abs() > 0.9)  # reached the stretched axis


def test_dsw_kappa_inf_is_max_sw_along_the_location(gen):
    x, y, _, _ = clouds(2, 40, 40, 3, gen)
    value, loc = lossforge.distributional_sliced_wasserstein(x, y, math.inf, n_projections=4, n_iters=20, seed=0,
                                                             reduction="none", return_locations=True)
    torch.testing.assert_close(value, w_along(x, y, loc), rtol=1e-12, atol=1e-14)
    m = lfnn.AmortizedSlicedWasserstein(3, kappa=math.inf, n_projections=4).double()
    eps = m.direction(x, y)
    torch.testing.assert_close(m(x, y), w_along(x, y, eps).mean(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# POT's options: seed=, log=True, the maximum over given directions (issue 13)


def test_seed_is_a_generator_seed_and_conflicts_with_generator(gen):
    x, y, _, _ = clouds(2, 20, 15, 3, gen)
    a = lossforge.sliced_wasserstein(x, y, n_projections=13, seed=4)
    b = lossforge.sliced_wasserstein(x, y, n_projections=13, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, lossforge.sliced_wasserstein(x, y, n_projections=13, seed=5))
    P = random_projections(3, 13, seed=4, dtype=F64)
    assert torch.equal(P, random_projections(3, 13, generator=torch.Generator().manual_seed(4), dtype=F64))
    m1 = lossforge.max_sliced_wasserstein(x, y, n_iters=3, seed=2)
    m2 = lossforge.max_sliced_wasserstein(x, y, n_iters=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(m1, m2)
    d1 = lossforge.distributional_sliced_wasserstein(x, y, 3.0, n_iters=2, n_projections=5, seed=2)
    d2 = lossforge.distributional_sliced_wasserstein(x, y, 3.0, n_iters=2, n_projections=5,
                                                     generator=torch.Generator().manual_seed(2))
    assert torch.equal(d1, d2)
    v1 = lossforge.vmf_sample(x[0, 0], 3.0, 5, seed=3)
    assert torch.equal(v1, lossforge.vmf_sample(x[0, 0], 3.0, 5, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="either seed or generator"):
        lossforge.sliced_wasserstein(x, y, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="seed must be an int"):
        lossforge.sliced_wasserstein(x, y, seed=1.5)


@pytest.mark.parametrize("sizes,weights", [((30, 30), False), ((30, 19), True)])
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
def test_log_matches_pot(sizes, weights, p, gen):
    N, M = sizes
    x, y, wx, wy = clouds(1, N, M, 3, gen, weights)
    x, y = x[0], y[0]
    wx = None if wx is None else wx[0] / wx[0].sum()
    wy = None if wy is None else wy[0] / wy[0].sum()
    P = rand_proj(3, 7, gen)
    value, log = lossforge.sliced_wasserstein(x, y, wx, wy, projections=P, p=p, log=True)
    npw = lambda w: None if w is None else w.numpy()  # noqa: E731
    want, want_log = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), npw(wx), npw(wy), projections=P.numpy(),
                                                    p=p, log=True)
    assert set(log) == set(want_log) == {"projections", "projected_emds"}
    assert value.item() == pytest.approx(float(want), rel=1e-10)
    torch.testing.assert_close(log["projections"], torch.from_numpy(want_log["projections"]))
    torch.testing.assert_close(log["projected_emds"], torch.from_numpy(want_log["projected_emds"]), rtol=1e-10,
                               atol=1e-12)
    # random directions: the log's directions reproduce the value with POT
    value, log = lossforge.sliced_wasserstein(x, y, wx, wy, n_projections=11, p=p, seed=3, log=True)
    assert log["projections"].shape == (3, 11) and log["projected_emds"].shape == (11,)
    again = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), npw(wx), npw(wy),
                                           projections=log["projections"].numpy(), p=p)
    assert value.item() == pytest.approx(float(again), rel=1e-10)


def test_log_batched_and_differentiable(gen):
    x, y, wx, wy = clouds(3, 12, 9, 2, gen, weights=True)
    P = rand_proj(2, 5, gen, batch=3)
    x.requires_grad_()
    value, log = lossforge.sliced_wasserstein(x, y, wx, wy, projections=P, root=False, reduction="none", log=True)
    assert log["projected_emds"].shape == (3, 5)
    torch.testing.assert_close(log["projected_emds"].mean(-1), value, rtol=1e-12, atol=1e-14)
    g_log = torch.autograd.grad(log["projected_emds"].mean(-1).sum(), x)[0]
    g_val = torch.autograd.grad(value.sum(), x)[0]
    torch.testing.assert_close(g_log, g_val, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sizes,weights", [((25, 25), False), ((25, 14), True)])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_max_over_given_projections_matches_pot(sizes, weights, p, gen):
    N, M = sizes
    B, d, L = 3, 4, 9
    x, y, wx, wy = clouds(B, N, M, d, gen, weights)
    P = rand_proj(d, L, gen)
    value, theta, log = lossforge.max_sliced_wasserstein(x, y, wx, wy, projections=P, p=p, reduction="none",
                                                         return_projections=True, log=True)
    for b in range(B):
        a = None if wx is None else (wx[b] / wx[b].sum()).numpy()
        bb = None if wy is None else (wy[b] / wy[b].sum()).numpy()
        want, want_log = ot.max_sliced_wasserstein_distance(x[b].numpy(), y[b].numpy(), a, bb, projections=P.numpy(),
                                                            p=p, log=True)
        assert value[b].item() == pytest.approx(float(want), rel=1e-10)
        torch.testing.assert_close(log["projected_emds"][b], torch.from_numpy(want_log["projected_emds"]),
                                   rtol=1e-10, atol=1e-12)
        k = int(torch.from_numpy(want_log["projected_emds"]).argmax())
        torch.testing.assert_close(theta[b], P[:, k])
    torch.testing.assert_close(log["projections"], P)
    # single pair, root=False, gradients: those of SW along the maximising direction
    xr = x[0].clone().requires_grad_()
    Pr = P.clone().requires_grad_()
    v, th = lossforge.max_sliced_wasserstein(xr, y[0], projections=Pr, p=p, root=False, return_projections=True)
    assert v.dim() == 0 and th.shape == (d,)
    k = int((P == th[:, None]).all(0).nonzero()[0])
    Pk = P[:, k:k + 1].clone().requires_grad_()
    xs = x[0].clone().requires_grad_()
    w = ref.sliced_wasserstein(xs, y[0], projections=Pk, p=p, root=False)
    torch.testing.assert_close(v, w, rtol=1e-12, atol=1e-14)
    gx, gP = torch.autograd.grad(v, (xr, Pr))
    wx_, wP = torch.autograd.grad(w, (xs, Pk))
    torch.testing.assert_close(gx, wx_, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gP[:, k:k + 1], wP, rtol=1e-10, atol=1e-12)
    assert (gP[:, :k] == 0).all() and (gP[:, k + 1:] == 0).all()
    with pytest.raises(ValueError, match="init starts the ascent"):
        lossforge.max_sliced_wasserstein(x, y, projections=P, init=P[:, 0])


def test_max_sliced_ascent_log(gen):
    x, y, _, _ = clouds(2, 20, 20, 3, gen)
    value, theta, log = lossforge.max_sliced_wasserstein(x, y, n_iters=5, seed=0, reduction="none",
                                                         return_projections=True, log=True)
    torch.testing.assert_close(log["projections"], theta.unsqueeze(-1))
    torch.testing.assert_close(log["projected_emds"][:, 0], value.square())
    v1, log1 = lossforge.max_sliced_wasserstein(x[0], y[0], n_iters=5, seed=0, log=True)
    assert log1["projections"].shape == (3, 1) and log1["projected_emds"].shape == (1,)


def test_official_code_value_is_n_times_the_unrooted_value(gen):
    # The official v-DSW / amortized code (Self-Amortized-DSW, loss/sw_variants.py) returns, per pair,
    # mean over slices of the SUM over points of |sorted difference|^p (no root), averaged over the batch:
    # written here from that description. It is N x POT's unrooted value, not N^(1/p) x POT's value.
    B, N, d, L = 3, 50, 3, 10
    x, y, _, _ = clouds(B, N, N, d, gen)
    P = rand_proj(d, L, gen, batch=B)
    for p in (1.5, 2.0):
        xs = torch.sort(torch.bmm(x, P), dim=1).values  # [B, N, L]
        ys = torch.sort(torch.bmm(y, P), dim=1).values
        official = (xs - ys).abs().pow(p).sum(dim=1).mean(dim=1).mean()
        ours = lossforge.sliced_wasserstein(x, y, projections=P, p=p, root=False)
        torch.testing.assert_close(official, N * ours, rtol=1e-12, atol=1e-12)
        pot = sum(ot.sliced_wasserstein_distance(x[b].numpy(), y[b].numpy(), projections=P[b].numpy(), p=p) ** p
                  for b in range(B)) / B
        assert official.item() == pytest.approx(N * float(pot), rel=1e-10)
        assert official.item() != pytest.approx(N ** (1 / p) * float(pot) ** (1 / p), rel=1e-2)


# ---------------------------------------------------------------------------------------------------
# Signatures, fake kernel, torch.compile (issue 13)


def test_booleans_are_keyword_only():
    import inspect

    for fn in (lossforge.sliced_wasserstein, lossforge.max_sliced_wasserstein,
               lossforge.distributional_sliced_wasserstein, lossforge.vmf_sample, random_projections,
               lfnn.AmortizedSlicedWasserstein.__init__):
        for name, par in inspect.signature(fn).parameters.items():
            if isinstance(par.default, bool):
                assert par.kind is inspect.Parameter.KEYWORD_ONLY, f"{fn.__qualname__}({name})"
            assert name in ("self",) or par.annotation is not inspect.Parameter.empty, f"{fn.__qualname__}({name})"
        assert inspect.signature(fn).return_annotation is not inspect.Signature.empty, fn.__qualname__


@pytest.mark.parametrize("case", ["dtype", "y_shape", "proj_shape", "weights", "p", "half"])
def test_fake_kernel_checks_like_the_kernel(case, gen):
    x, y, wx, wy = clouds(2, 6, 5, 3, gen, weights=True)
    P = rand_proj(3, 4, gen)
    args = [x, y, None, None, P, 2.0, False, False, False]
    if case == "dtype":
        args[1] = y.float()
    elif case == "y_shape":
        args[1] = y[..., :2].contiguous()
    elif case == "proj_shape":
        args[4] = P[:2].contiguous()
    elif case == "weights":
        args[2] = wx[:, :3].contiguous()
    elif case == "p":
        args[5] = 0.5
    elif case == "half":
        args[:2] = [x.half(), y.half()]
        args[4] = P.half()
    with pytest.raises(RuntimeError) as eager:
        ops.sliced_wasserstein(*args)
    message = str(eager.value).splitlines()[0]
    message = message[message.index("sliced_wasserstein: "):]  # after the C++ source location
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ops.sliced_wasserstein(*meta)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=re.escape(message)):
        torch.compile(lambda *a: ops.sliced_wasserstein(*a)[0], fullgraph=True, backend="aot_eager")(*args)


COMPILE_ENTRY_POINTS = (
    "lossforge.sliced_wasserstein",
    "lossforge.max_sliced_wasserstein",
    "lossforge.distributional_sliced_wasserstein",
    "lossforge.vmf_sample",
    "lossforge.random_projections",
    "lossforge.nn.AmortizedSlicedWasserstein",
    "lossforge.nn.EfficientAttentionAmortizer",
)


def compiled_and_eager(fn, *args, fullgraph=True):
    """fn compiled (aot_eager) and eager, each from the same global RNG state."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=fullgraph, backend="aot_eager")
    torch.manual_seed(0)
    got = compiled(*args)
    torch.manual_seed(0)
    want = fn(*args)
    return got, want


def small_clouds(gen, d=3):
    x = torch.randn(2, 12, d, generator=gen).requires_grad_()
    y = torch.randn(2, 9, d, generator=gen)
    return x, y


def test_compile_sliced_wasserstein_and_random_projections(gen):
    x, y = small_clouds(gen)
    wx = torch.rand(2, 12, generator=gen) + 0.1
    P = rand_proj(3, 5, gen, dtype=torch.float32)
    for fn in (lambda a, b: lossforge.sliced_wasserstein(a, b, wx, projections=P, p=1.5),
               lambda a, b: lossforge.sliced_wasserstein(a, b, n_projections=6, root=False),
               lambda a, b: lossforge.sliced_wasserstein(a, b, projections=P, log=True)[1]["projected_emds"].sum()):
        got, want = compiled_and_eager(fn, x, y)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    got, want = compiled_and_eager(lambda: random_projections(3, 7))
    torch.testing.assert_close(got, want)


def test_compile_max_sliced_wasserstein(gen):
    x, y = small_clouds(gen)
    P = rand_proj(3, 5, gen, dtype=torch.float32)
    for fn in (lambda a, b: lossforge.max_sliced_wasserstein(a, b, n_iters=3),
               lambda a, b: lossforge.max_sliced_wasserstein(a, b, projections=P)):
        got, want = compiled_and_eager(fn, x, y)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


@pytest.mark.parametrize("d", [3, 4])
def test_compile_vmf_and_distributional_sliced_wasserstein(d, gen):
    # d = 3: fullgraph. d != 3: Wood's rejection loop decides on the host (documented): graph breaks.
    fullgraph = d == 3
    loc = torch.randn(2, d, generator=gen)
    got, want = compiled_and_eager(lambda l: lossforge.vmf_sample(l, 5.0, 4), loc, fullgraph=fullgraph)
    torch.testing.assert_close(got, want)
    x, y = small_clouds(gen, d)
    got, want = compiled_and_eager(
        lambda a, b: lossforge.distributional_sliced_wasserstein(a, b, 5.0, n_iters=4 - d, n_projections=4), x, y,
        fullgraph=fullgraph)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


@pytest.mark.parametrize("d", [3, 4])
def test_compile_amortized_modules(d, gen):
    torch.manual_seed(0)
    m = lfnn.AmortizedSlicedWasserstein(d, kappa=5.0, n_projections=4, d_k=8)
    x, y = small_clouds(gen, d)
    got, want = compiled_and_eager(m, x, y, fullgraph=d == 3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    got, want = compiled_and_eager(m.amortizer, x)
    torch.testing.assert_close(got, want)
