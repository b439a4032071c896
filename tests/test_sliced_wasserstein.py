"""Sliced Wasserstein family: SW against POT and the pure-torch reference, gradients, opcheck, ties and
sorting paths, vMF sampling, Max-SW, v-DSW, the amortized module, and bad input."""
import math

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
    with pytest.raises(ValueError, match="kappa must be finite and >= 0"):
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
