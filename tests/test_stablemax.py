"""StableMax family: oracle F.cross_entropy(sign(x)·log1p|x|, ...) in float64 for every option,
gradcheck, opcheck, the spec's numerics, ⊥Grad, the fused linear loss and bad input."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import lossforge
from lossforge.reference import stablemax as ref
from lossforge._stablemax import _orthograd_

ops = torch.ops.lossforge
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def transformed(x):
    """t = sign(x)·log1p(|x|) = log s(x): StableMax-CE(x) == softmax-CE(t)."""
    return torch.sign(x) * torch.log1p(x.abs())


def logits(shape, gen, dtype=torch.float64, device="cpu", scale=3.0):
    """Random logits with the cases that matter: exact 0 and 1.0, ties, large magnitudes."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    flat = x.view(-1)
    n = flat.numel()
    idx = torch.randperm(n, generator=gen)
    k = max(1, n // 10)
    flat[idx[:k]] = 1.0
    flat[idx[k:2 * k]] = 0.0
    flat[idx[2 * k:3 * k]] = -1.0
    flat[idx[3 * k:3 * k + max(1, n // 50)]] = 40.0
    return x.to(dtype).to(device)


def targets(shape, n_classes, gen, device="cpu", ignore_frac=0.2, ignore_index=-100):
    t = torch.randint(0, n_classes, shape, generator=gen)
    if ignore_frac and t.numel() > 1:
        mask = torch.rand(shape, generator=gen) < ignore_frac
        mask.view(-1)[0] = False  # keep at least one row
        t[mask] = ignore_index
    return t.to(device)


class Transformed:
    """t = log s(x) as a float64 leaf, so that the oracle's gradient with respect to x is
    dL/dt · h(x), h(x) = 1 / (1 + |x|) (autograd through sign(x)·log1p|x| would give 0 at x = 0,
    where the true derivative is 1)."""

    def __init__(self, x):
        self.x = x.detach().double().cpu()
        self.t = transformed(self.x).requires_grad_(True)

    def grad(self, out, grad_out=None):
        (gt,) = torch.autograd.grad(out, self.t, grad_out)
        return gt / (1 + self.x.abs())


def oracle_ce(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, dim=1):
    """F.cross_entropy on the transformed logits, in float64, with the class dimension moved to 1.
    Returns the loss and the Transformed whose .grad(loss, g) is the gradient with respect to x."""
    tr = Transformed(x)
    t = tr.t
    if x.dim() > 1 and dim % x.dim() != 1:
        t = t.movedim(dim, 1)
    w = None if weight is None else weight.double().cpu()
    loss = F.cross_entropy(t, target.cpu(), w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    return loss, tr


# ---- stablemax / log_stablemax ----------------------------------------------------------------------

@pytest.mark.parametrize("shape,dim", [((7, 13), -1), ((7, 13), 0), ((3, 5, 4), 1), ((2, 3, 4, 5), 2), ((11,), 0),
                                       ((4, 1), -1), ((3, 70), -1), ((2, 3000), -1)])
@pytest.mark.parametrize("log", [False, True])
def test_stablemax_matches_softmax_of_transformed(shape, dim, log, gen, device):
    x = logits(shape, gen, device=device)
    ours = (lossforge.log_stablemax if log else lossforge.stablemax)(x, dim=dim)
    t = transformed(x.cpu())
    expected = torch.log_softmax(t, dim) if log else torch.softmax(t, dim)
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("log", [False, True])
def test_stablemax_low_precision(dtype, log, gen, device):
    x = logits((16, 37), gen, dtype=dtype, device=device)
    ours = (lossforge.log_stablemax if log else lossforge.stablemax)(x, dim=-1)
    assert ours.dtype == dtype
    t = transformed(x.double().cpu())
    expected = torch.log_softmax(t, -1) if log else torch.softmax(t, -1)
    torch.testing.assert_close(ours.double().cpu(), expected, rtol=TOL[dtype], atol=TOL[dtype])
    xg = x.detach().requires_grad_()
    g = torch.randn(x.shape, generator=gen).to(dtype).to(device)
    (gx,) = torch.autograd.grad((lossforge.log_stablemax if log else lossforge.stablemax)(xg, dim=-1), xg, g)
    assert gx.dtype == dtype
    tr = Transformed(x)
    expected_gx = tr.grad(torch.log_softmax(tr.t, -1) if log else torch.softmax(tr.t, -1), g.double().cpu())
    torch.testing.assert_close(gx.double().cpu(), expected_gx, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_stablemax_gradcheck(log, dim, gen, device):
    x = (torch.randn(4, 6, 3, generator=gen, dtype=torch.float64) * 2).to(device).requires_grad_()
    fn = lossforge.log_stablemax if log else lossforge.stablemax
    assert torch.autograd.gradcheck(lambda v: fn(v, dim=dim), (x,))


def test_stablemax_backward_matches_oracle(gen, device):
    x = logits((9, 21), gen, device=device).requires_grad_()
    g = torch.randn(9, 21, generator=gen, dtype=torch.float64).to(device)
    for fn, sm in ((lossforge.stablemax, torch.softmax), (lossforge.log_stablemax, torch.log_softmax)):
        (ours,) = torch.autograd.grad(fn(x, dim=-1), x, g)
        tr = Transformed(x)
        expected = tr.grad(sm(tr.t, -1), g.cpu())
        torch.testing.assert_close(ours.cpu(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("V", [2, 5, 3000])  # 3000 > 2048: the whole-block CUDA path
def test_top_of_the_float_range(dtype, V, gen, device):
    """Logits near the top of the float range: wherever the exact result is finite and representable, it
    is returned. The sum of s(x) used to overflow (stablemax([[3e38, 3e38]]) was NaN for 0.5, 0.5), and so
    did S_-y / s_y (the float32 loss of [[m, -m]] with target 1 was inf from m = 2e19 for about 89)."""
    big = torch.finfo(dtype).max
    rows = [[big / 2, big / 2], [big, big], [2e19, -2e19], [1e30, -1e30], [big / 3, -big / 3], [big, 1.0]]
    x = torch.stack([torch.tensor(r + [0.5] * (V - 2), dtype=torch.float64) for r in rows])
    x[:, 2:] += torch.randn(len(rows), V - 2, generator=gen, dtype=torch.float64)
    if V > 2:
        x[1, 2] = big  # three logits at the maximum
    x = x.to(dtype)
    tol = TOL[dtype]  # log S and log s(x) of about 89 (float32) or 710 (float64) round to a few of their ulps
    t = transformed(x.double())
    for log, fn, ref in ((False, lossforge.stablemax, torch.softmax), (True, lossforge.log_stablemax, torch.log_softmax)):
        got = fn(x.to(device), dim=1).cpu().double()
        torch.testing.assert_close(got, ref(t, 1), rtol=tol, atol=tol)
    for target in (torch.ones(len(rows), dtype=torch.long), torch.zeros(len(rows), dtype=torch.long)):
        for eps in (0.0, 0.1):
            xd = x.to(device).clone().requires_grad_()
            loss = lossforge.stablemax_cross_entropy(xd, target.to(device), reduction="none", label_smoothing=eps)
            (g,) = torch.autograd.grad(loss.sum(), xd)
            want, tr = oracle_ce(x, target, reduction="none", label_smoothing=eps)
            assert torch.isfinite(loss).all()
            torch.testing.assert_close(loss.cpu().double(), want, rtol=tol, atol=tol)
            torch.testing.assert_close(g.cpu().double(), tr.grad(want.sum()), rtol=tol, atol=1e-30)
    # a +inf logit still makes its row NaN, as with softmax
    x[0, 0] = math.inf
    assert torch.isnan(lossforge.stablemax(x.to(device), dim=1)[0]).all()
    assert torch.isfinite(lossforge.stablemax(x.to(device), dim=1)[1:]).all()


# ---- cross-entropy against the F.cross_entropy oracle -----------------------------------------------

LAYOUTS = [
    ((32, 10), (32,), 1),              # [N, V]
    ((6, 5, 4, 3), (6, 4, 3), 1),      # [N, V, d1, d2] (segmentation layout)
    ((3, 8, 12), (3, 8), -1),          # [B, L, V] with dim=-1 (HRM / LM layout)
    ((12,), (), 0),                    # unbatched [V]
    ((5, 2100), (5,), 1),              # a large V
]


@pytest.mark.parametrize("in_shape,t_shape,dim", LAYOUTS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_cross_entropy_matches_oracle(in_shape, t_shape, dim, reduction, weighted, label_smoothing, gen, device):
    x = logits(in_shape, gen, device=device).requires_grad_()
    V = in_shape[dim] if len(in_shape) > 1 else in_shape[0]
    target = targets(t_shape, V, gen, device=device, ignore_frac=0.2 if t_shape else 0.0)
    weight = (torch.rand(V, generator=gen, dtype=torch.float64) + 0.1).to(device) if weighted else None
    ours = lossforge.stablemax_cross_entropy(x, target, weight, reduction=reduction,
                                             label_smoothing=label_smoothing, dim=dim)
    expected, tr = oracle_ce(x, target, weight, reduction=reduction, label_smoothing=label_smoothing, dim=dim)
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-10, atol=1e-12)
    g = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    (gx,) = torch.autograd.grad(ours, x, g.to(device))
    gx_expected = tr.grad(expected, g)
    torch.testing.assert_close(gx.cpu(), gx_expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_low_precision(dtype, reduction, gen, device):
    x = logits((64, 12), gen, dtype=dtype, device=device).requires_grad_()
    target = targets((64,), 12, gen, device=device)
    ours = lossforge.stablemax_cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
    assert ours.dtype == dtype
    expected, tr = oracle_ce(x, target, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(ours.double().cpu(), expected, rtol=TOL[dtype], atol=TOL[dtype])
    (gx,) = torch.autograd.grad(ours.sum(), x)
    gx_expected = tr.grad(expected.sum())
    assert gx.dtype == dtype
    torch.testing.assert_close(gx.double().cpu(), gx_expected, rtol=TOL[dtype], atol=TOL[dtype])


def test_matches_the_papers_reference(gen, device):
    """The eager float64 formulation users copy today, [B, L, V] with ignore_index, in float64."""
    x = (torch.randn(4, 9, 11, generator=gen, dtype=torch.float64) * 3).to(device)
    target = targets((4, 9), 11, gen, device=device)
    for reduction in ("none", "sum", "mean"):
        ours = lossforge.stablemax_cross_entropy(x, target, reduction=reduction, dim=-1)
        expected = ref.stablemax_cross_entropy(x, target, reduction=reduction)
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_gradcheck(reduction, weighted, gen, device):
    x = (torch.randn(5, 4, 3, generator=gen, dtype=torch.float64) * 2).to(device).requires_grad_()
    target = targets((5, 3), 4, gen, device=device)
    weight = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).to(device) if weighted else None
    assert torch.autograd.gradcheck(
        lambda v: lossforge.stablemax_cross_entropy(v, target, weight, reduction=reduction, label_smoothing=0.1), (x,))


def test_all_rows_ignored_gives_nan_mean_like_torch(device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    target = torch.full((4,), -100, device=device)
    assert torch.isnan(lossforge.stablemax_cross_entropy(x, target))
    assert torch.isnan(F.cross_entropy(x, target))
    assert lossforge.stablemax_cross_entropy(x, target, reduction="sum") == 0


def test_custom_ignore_index(gen, device):
    x = logits((20, 6), gen, device=device)
    target = targets((20,), 6, gen, device=device, ignore_index=3, ignore_frac=0.3)
    ours = lossforge.stablemax_cross_entropy(x, target, ignore_index=3)
    expected, _ = oracle_ce(x, target, ignore_index=3)
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-10, atol=1e-12)


# ---- numerics the spec requires ---------------------------------------------------------------------

def test_finite_gradient_at_logit_exactly_one(device):
    x = torch.tensor([[1.0, 1.0, -2.0, 0.5], [1.0, 0.0, 1.0, 1.0]], device=device, requires_grad=True)
    target = torch.tensor([0, 1], device=device)
    lossforge.stablemax_cross_entropy(x, target).backward()
    assert torch.isfinite(x.grad).all()
    # the reference's where() evaluates 1 / (1 - x) = inf at x == 1 and its gradient is NaN there
    x_ref = x.detach().clone().requires_grad_()
    ref.stablemax_cross_entropy(x_ref, target).backward()
    assert torch.isnan(x_ref.grad).any()
    # and ours agrees with the oracle
    expected, tr = oracle_ce(x, target)
    g64 = tr.grad(expected)
    torch.testing.assert_close(x.grad.double().cpu(), g64, rtol=1e-5, atol=1e-7)


def test_confident_rows_keep_their_loss_in_float32(device):
    # s(x_y) = 1e8 + 1 while the other 9 classes sum to ~0.8: the naive float32 loss rounds to 0
    x = torch.full((3, 10), -10.0, device=device)
    x[:, 4] = 1e8
    x[1, 0] = -3.0
    target = torch.full((3,), 4, device=device)
    ours = lossforge.stablemax_cross_entropy(x, target, reduction="none")
    expected, tr = oracle_ce(x, target, reduction="none")
    assert (ours > 0).all()
    torch.testing.assert_close(ours.double().cpu(), expected, rtol=1e-5, atol=0)
    naive = torch.log(ref.s(x).sum(-1)) - torch.log(ref.s(x[:, 4]))
    assert (naive == 0).all()  # what the fp32 formulation returns
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(lossforge.stablemax_cross_entropy(xg, target, reduction="sum"), xg)
    g64 = tr.grad(expected.sum())
    assert g[:, 4].abs().min() > 0  # the target's gradient survives too
    torch.testing.assert_close(g.double().cpu(), g64, rtol=1e-5, atol=1e-30)


def test_negative_inf_logits_are_masked(gen, device):
    x = logits((8, 7), gen, device=device)
    x[:, 5] = -math.inf  # a masked class
    x[2, 0] = -math.inf  # row 2's own target is masked
    target = torch.tensor([0, 1, 0, 3, 4, 6, 0, 1], device=device)
    xg = x.clone().requires_grad_()
    ours = lossforge.stablemax_cross_entropy(xg, target, reduction="none")
    keep = [0, 1, 2, 3, 4, 6]  # the same problem without the masked class
    expected, _ = oracle_ce(x[:, keep], torch.tensor([0, 1, 0, 3, 4, 5, 0, 1]), reduction="none")
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-10, atol=0)
    assert ours[2] == math.inf  # as in F.cross_entropy
    rows = torch.arange(8, device=device) != 2
    ours[rows].sum().backward()
    assert (xg.grad[:, 5] == 0).all()
    assert torch.isfinite(xg.grad).all()
    sm = lossforge.stablemax(x, dim=-1)
    assert (sm[:, 5] == 0).all() and torch.isfinite(sm).all()


def test_nan_and_pos_inf_propagate(device):
    x = torch.tensor([[0.5, float("nan"), 1.0], [0.5, float("inf"), 1.0], [0.1, 0.2, 0.3]], device=device)
    target = torch.tensor([0, 0, 0], device=device)
    expected, _ = oracle_ce(x, target, reduction="none")
    xg = x.clone().requires_grad_()
    loss = lossforge.stablemax_cross_entropy(xg, target, reduction="none")
    assert torch.isnan(expected[:2]).all()
    assert torch.isnan(loss[:2]).all() and torch.isfinite(loss[2])
    loss.sum().backward()
    assert torch.isnan(xg.grad[:2]).all() and torch.isfinite(xg.grad[2]).all()
    for fn in (lossforge.stablemax, lossforge.log_stablemax):
        out = fn(x)
        assert torch.isnan(out[:2]).all() and torch.isfinite(out[2]).all()
        assert torch.isnan(torch.softmax(transformed(x.cpu()), -1)[:2]).all()


# ---- collapse diagnostic ------------------------------------------------------------------------

def test_collapse_fraction(device):
    x = torch.zeros(4, 6, device=device)
    x[0, 2] = 200.0   # softmax collapses in float32 (exp(-200) underflows next to 1)
    x[1, 2] = 1e8     # both collapse
    target = torch.tensor([2, 2, 3, -100], device=device)
    soft = lossforge.collapse_fraction(x, target, loss="softmax")
    stab = lossforge.collapse_fraction(x, target, loss="stablemax")
    expected_soft = (F.cross_entropy(x, target, reduction="none")[:3] == 0).float().mean()
    assert soft.item() == pytest.approx(expected_soft.item()) and soft.item() == pytest.approx(2 / 3)
    assert stab.item() == pytest.approx(1 / 3)
    # the [B, L, V] layout with dim=-1 and the [N, V, d] layout with dim=1 give the same
    assert lossforge.collapse_fraction(x.view(2, 2, 6), target.view(2, 2), dim=-1) == soft
    assert lossforge.collapse_fraction(x.t().reshape(1, 6, 4), target.view(1, 4), loss="stablemax") == stab
    # our loss is not collapsed on the row where the naive float32 StableMax-CE is
    assert lossforge.stablemax_cross_entropy(x[1:2], target[1:2]) > 0
    # an out-of-range target: an error on the CPU, NaN on CUDA (no host sync, no out-of-bounds gather)
    bad = torch.tensor([2, 6, 3, -100], device=device)
    for kind in ("softmax", "stablemax"):
        if device == "cpu":
            with pytest.raises(ValueError, match="target value 6 at flat index 1 is out of range"):
                lossforge.collapse_fraction(x, bad, loss=kind)
        else:
            assert torch.isnan(lossforge.collapse_fraction(x, bad, loss=kind))
    with pytest.raises(ValueError, match="loss must be"):
        lossforge.collapse_fraction(x, target, loss="exp")


# ---- op registration ------------------------------------------------------------------------------

def test_opcheck(gen, device):
    x = torch.randn(6, 5, 3, generator=gen).to(device)
    target = targets((6, 3), 5, gen, device=device)
    weight = torch.rand(5, generator=gen).to(device)
    torch.library.opcheck(ops.stablemax.default, (x, 1, False))
    torch.library.opcheck(ops.stablemax.default, (x.transpose(0, 2).contiguous(), -1, True))
    out = ops.stablemax(x, 1, True)
    torch.library.opcheck(ops.stablemax_backward.default, (torch.randn_like(x), x, out, 1, True))
    torch.library.opcheck(ops.stablemax_cross_entropy.default, (x, target, weight, 1, -100, 0.1))
    loss, stats = ops.stablemax_cross_entropy(x, target, weight, 1, -100, 0.1)
    torch.library.opcheck(ops.stablemax_cross_entropy_backward.default,
                          (torch.rand_like(loss), x, target, weight, stats, 1, -100, 0.1))
    torch.library.opcheck(ops.orthograd_.default, (torch.randn(40, device=device), torch.randn(40, device=device)))


@pytest.mark.slow
def test_torch_compile_fullgraph(gen):
    x = torch.randn(8, 3, 10, generator=gen, requires_grad=True)
    target = targets((8, 3), 10, gen)
    h = torch.randn(8, 4, generator=gen, requires_grad=True)
    W = torch.randn(10, 4, generator=gen, requires_grad=True)

    def step(x, h, W):
        a = lossforge.stablemax_cross_entropy(x, target, dim=-1, label_smoothing=0.1)
        b = lossforge.fused_linear_stablemax_cross_entropy(h, W, target[:, 0])
        return a + b + lossforge.log_stablemax(x).sum()

    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x, h, W)
    grads = torch.autograd.grad(out, (x, h, W))
    out_eager = step(x, h, W)
    grads_eager = torch.autograd.grad(out_eager, (x, h, W))
    torch.testing.assert_close(out, out_eager)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)


# ---- module, fused linear loss ----------------------------------------------------------------------

def test_module_matches_functional(gen, device):
    x = logits((4, 6, 9), gen, device=device)
    target = targets((4, 6), 9, gen, device=device)
    weight = torch.rand(9, generator=gen, dtype=torch.float64).to(device)
    mod = lossforge.nn.StableMaxCrossEntropyLoss(weight=weight, reduction="sum", label_smoothing=0.05, dim=-1)
    assert torch.equal(mod(x, target), lossforge.stablemax_cross_entropy(x, target, weight, reduction="sum",
                                                                         label_smoothing=0.05, dim=-1))
    assert "weight" in mod.state_dict()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_matches_unfused(reduction, bias, gen, device):
    N, H, V = 37, 8, 23
    h = torch.randn(N, H, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    W = torch.randn(V, H, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(V, generator=gen, dtype=torch.float64).to(device).requires_grad_() if bias else None
    target = targets((N,), V, gen, device=device)
    cw = torch.rand(V, generator=gen, dtype=torch.float64).to(device)
    ours = lossforge.fused_linear_stablemax_cross_entropy(h, W, target, b, class_weight=cw, reduction=reduction,
                                                          label_smoothing=0.1, chunk_size=10)
    logits_full = h @ W.t() + (b if bias else 0)
    expected, _ = oracle_ce(logits_full, target, cw, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-10, atol=1e-12)
    g = torch.randn(expected.shape, generator=gen, dtype=torch.float64).to(device)
    params = (h, W) + ((b,) if bias else ())
    got = torch.autograd.grad(ours, params, g)
    want = torch.autograd.grad(lossforge.stablemax_cross_entropy(logits_full, target, cw, reduction=reduction,
                                                                 label_smoothing=0.1), params, g)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_fused_linear_leading_dims_and_gradcheck(gen):
    h = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    target = targets((2, 3), 6, gen)
    loss = lossforge.fused_linear_stablemax_cross_entropy(h, W, target, reduction="none", chunk_size=4)
    assert loss.shape == (2, 3)
    assert torch.autograd.gradcheck(
        lambda a, b: lossforge.fused_linear_stablemax_cross_entropy(a, b, target, chunk_size=4), (h, W))


# ---- ⊥Grad ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_orthograd_kernel_matches_reference(dtype, gen, device):
    w = torch.randn(3, 1000, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 1000, generator=gen, dtype=torch.float64) + 0.3 * w
    expected = ref.orthograd_(w, g.clone())
    got = g.to(dtype).to(device)
    _orthograd_(got, w.to(dtype).to(device))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double().cpu(), expected, rtol=tol, atol=tol)
    # the result is orthogonal to w and has the norm of g
    got64 = got.double().cpu().reshape(-1)
    assert abs(torch.dot(got64, w.reshape(-1).to(dtype).double())) < tol * 1e3
    assert got64.norm().item() == pytest.approx(g.norm().item(), rel=tol * 10)


def test_orthograd_non_contiguous_and_zero(device):
    w = torch.randn(8, 6, dtype=torch.float64, device=device)
    g = torch.randn(6, 8, dtype=torch.float64, device=device).t()  # non-contiguous gradient
    expected = ref.orthograd_(w, g.clone())
    _orthograd_(g, w)
    torch.testing.assert_close(g, expected)
    z = torch.zeros(5, dtype=torch.float64, device=device)
    _orthograd_(z, torch.zeros(5, dtype=torch.float64, device=device))
    assert (z == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_orthograd_gradient_parallel_to_the_parameter(dtype, gen, device):
    """g parallel to w (always so for a one-element parameter): the exact g_perp is 0, so is the result.
    The computed g - proj w is rounding noise, which rescaled to |g| gave a random vector of norm |g| (in
    about 27% of one-element cases, with the sign flipped in 2%)."""
    cases = [(torch.randn(1, generator=gen), torch.randn(1, generator=gen)) for _ in range(200)]
    w = torch.randn(1000, generator=gen)
    cases += [(w, c * w) for c in (2.0, -0.5, 2.0**-10)]  # exact multiples in every dtype
    for w, g in cases:
        w, g = w.to(dtype).to(device), g.to(dtype).to(device)
        got = g.clone()
        _orthograd_(got, w)
        assert (got == 0).all(), (w, g, got)
    # NaN propagates
    got = torch.tensor([1.0, math.nan], dtype=dtype, device=device)
    _orthograd_(got, torch.ones(2, dtype=dtype, device=device))
    assert got.isnan().all()


def _train(opt_factory, steps=5, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    opt = opt_factory(model)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    for _ in range(steps):
        opt.zero_grad()
        lossforge.stablemax_cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("base,kwargs", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
                                         (torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1))])
def test_orthograd_optimizer_forwards_arguments(base, kwargs):
    def reference_step(model):
        inner = base(model.parameters(), **kwargs)

        class Manual:
            def zero_grad(self):
                inner.zero_grad()

            def step(self):
                with torch.no_grad():
                    for p in model.parameters():
                        ref.orthograd_(p, p.grad)
                inner.step()
        return Manual()

    ours, opt = _train(lambda m: lossforge.optim.OrthoGrad(m.parameters(), base, **kwargs))
    theirs, _ = _train(reference_step)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for key, value in kwargs.items():
        assert opt.param_groups[0][key] == value


def test_orthograd_closure_gradients_are_projected():
    """A closure reaches the base optimizer, and every evaluation of it (LBFGS evaluates several per
    step) leaves projected gradients: orthogonal to the parameter, with the raw gradient's norm."""
    torch.manual_seed(0)
    w = torch.randn(20, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(40, 20, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    raw, at = [], []

    def closure():
        w.grad = None
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        raw.append(w.grad.clone())
        at.append(w.detach().clone())
        return loss

    class ThreeEvaluations(torch.optim.SGD):
        """SGD that evaluates the closure three times per step, moving between them, and records what it sees."""
        seen = []

        @torch.no_grad()
        def step(self, closure=None):
            for _ in range(3):
                with torch.enable_grad():
                    closure()
                type(self).seen.append((w.detach().clone(), w.grad.clone()))
                w.sub_(0.05 * w.grad)

    loss = lossforge.optim.OrthoGrad([w], ThreeEvaluations, lr=0.1).step(closure)
    assert loss is None and len(raw) == 3 and len(ThreeEvaluations.seen) == 3
    for g_raw, (w_at, g_seen) in zip(raw, ThreeEvaluations.seen):
        torch.testing.assert_close(g_seen, ref.orthograd_(w_at, g_raw.clone()), rtol=1e-12, atol=1e-14)
        assert abs(torch.dot(g_seen, w_at).item()) < 1e-10 * w_at.norm().item() * g_raw.norm().item()

    # LBFGS runs with its closure (several evaluations); the gradient it holds is the last one, projected
    raw.clear()
    at.clear()
    opt = lossforge.optim.OrthoGrad([w], torch.optim.LBFGS, lr=0.5, max_iter=4)
    assert torch.is_tensor(opt.step(closure)) and len(raw) >= 2
    torch.testing.assert_close(w.grad, ref.orthograd_(at[-1], raw[-1].clone()), rtol=1e-12, atol=1e-14)


def test_orthograd_state_dict_round_trip():
    factory = lambda m: lossforge.optim.OrthoGrad(m.parameters(), torch.optim.Adam, lr=1e-2)  # noqa: E731
    model, opt = _train(factory, steps=3)
    state = copy.deepcopy(opt.state_dict())  # state_dict() shares tensors with the live state
    model2, opt2 = _train(factory, steps=0)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(state)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        lossforge.stablemax_cross_entropy(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b)
    assert opt2.state is opt2.base_optimizer.state and len(opt2.state) == 4


def test_orthograd_rejects_non_optimizer():
    with pytest.raises(TypeError, match="base_optimizer_cls"):
        lossforge.optim.OrthoGrad([torch.zeros(2, requires_grad=True)], object)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bench_check_accepts_our_results(dtype, device):
    """`lossforge bench` checks every case before timing it and stops on a failed check: the check of the
    cross-entropy cases must hold in each dtype they use (small sizes here), and must catch a wrong loss."""
    from lossforge.benchmarks import stablemax as cases

    case = cases._ce_case(64, 300, dtype, device, "test", compiled=False)
    inputs = case.setup(device)
    results = {name: impl(*inputs) for name, impl in case.impls.items()}
    case.check(results)
    loss, grad = results["lossforge"]
    results["lossforge"] = (loss * 1.05, grad)
    with pytest.raises(AssertionError, match="loss differs"):
        case.check(results)


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_inputs():
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, 2, 3])
    ce = lossforge.stablemax_cross_entropy
    with pytest.raises(TypeError, match="target must be int64"):
        ce(x, t.float())
    with pytest.raises(TypeError, match="target must be int64"):
        ce(x, t.int())
    with pytest.raises(TypeError, match="input must be float32"):
        ce(x.long(), t)
    with pytest.raises(ValueError, match=r"target shape \[3\] does not match"):
        ce(x, t[:3])
    with pytest.raises(ValueError, match="pass dim=-1"):
        ce(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be"):
        ce(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        ce(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"weight must have shape \[5\]"):
        ce(x, t, torch.ones(4))
    with pytest.raises(ValueError, match="input is empty"):
        ce(torch.randn(0, 5), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no classes"):
        ce(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="dim 3 is out of range"):
        ce(x, t, dim=3)
    with pytest.raises(ValueError, match="target is on meta"):
        ce(x, t.to("meta"))
    with pytest.raises(ValueError, match="weight is on meta"):
        ce(x, t, torch.ones(5, device="meta"))
    with pytest.raises(RuntimeError, match="gradient with respect to weight"):
        ce(x, t, torch.ones(5, requires_grad=True))
    with pytest.raises(ValueError, match=r"target value 7 at flat index 2 is out of range"):
        ce(x, torch.tensor([0, 1, 7, 3]))
    with pytest.raises(ValueError, match=r"target value -1 .* is out of range"):
        ce(x, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="x is empty"):
        lossforge.stablemax(torch.randn(3, 0))
    with pytest.raises(TypeError, match="x must be float32"):
        lossforge.log_stablemax(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="0-d"):
        lossforge.stablemax(torch.tensor(1.0))
    fused = lossforge.fused_linear_stablemax_cross_entropy
    with pytest.raises(ValueError, match="hidden's last dimension"):
        fused(torch.randn(4, 3), torch.randn(5, 4), t)
    with pytest.raises(ValueError, match="leading shape"):
        fused(torch.randn(4, 3), torch.randn(5, 3), t[:2])
    with pytest.raises(ValueError, match="chunk_size"):
        fused(torch.randn(4, 3), torch.randn(5, 3), t, chunk_size=0)
    with pytest.raises(TypeError, match="weight dtype"):
        fused(torch.randn(4, 3), torch.randn(5, 3, dtype=torch.float64), t)
    with pytest.raises(ValueError, match="V >= 1 classes"):
        fused(torch.randn(4, 3), torch.randn(0, 3), t)


def test_direct_op_calls_are_checked_in_cpp():
    """Called through torch.ops directly (no Python validation), the kernels still refuse bad input."""
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.stablemax(x.t(), -1, False)
    with pytest.raises(RuntimeError, match="target has 3 elements"):
        ops.stablemax_cross_entropy(x, torch.zeros(3, dtype=torch.long), None, 1, -100, 0.0)
    with pytest.raises(RuntimeError, match="weight must be float32"):
        ops.stablemax_cross_entropy(x, torch.zeros(4, dtype=torch.long), torch.ones(5, dtype=torch.float64), 1, -100,
                                    0.0)
    with pytest.raises(RuntimeError, match="dim 2 is out of range"):
        ops.stablemax(x, 2, False)
    with pytest.raises(RuntimeError, match="must have the same shape"):  # same numel, other shape
        ops.stablemax_backward(torch.randn(5, 4), x, x, 1, False)


# ---- CPU vs CUDA ------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,t_shape,dim", [((4096, 12), (4096,), 1), ((64, 5000), (64,), 1),
                                               ((8, 5, 33), (8, 33), 1)])
def test_cpu_cuda_agree(dtype, shape, t_shape, dim, gen):
    x = logits(shape, gen, dtype=dtype)
    V = shape[dim]
    target = targets(t_shape, V, gen)
    weight = torch.rand(V, generator=gen)
    outs = []
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_()
        loss = lossforge.stablemax_cross_entropy(xd, target.to(dev), weight.to(dev), label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss, xd)
        outs.append((loss.double().cpu(), g.double().cpu(), lossforge.stablemax(xd.detach(), dim).double().cpu()))
    tol = TOL[dtype]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_errors_name_the_problem():
    """Each error names the argument and the problem (they used to surface from another op, a chunk, or
    C++ without the dtype's name, or not at all)."""
    h, W = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"fused_linear_stablemax_cross_entropy: target value 7 at flat index 2 "
                                         r"is out of range: expected a class index in \[0, 5\)"):
        lossforge.fused_linear_stablemax_cross_entropy(h, W, torch.tensor([0, 1, 7, 2]), chunk_size=2)
    for dtype, name in ((torch.uint8, "uint8"), (torch.complex64, "complex64"), (torch.int16, "int16")):
        with pytest.raises(RuntimeError, match=f"x must be float32, float64, bfloat16 or float16, got {name}"):
            ops.stablemax(torch.zeros(3, 4, dtype=dtype), 1, False)
    # a CPU tensor beside a meta one: an error, not meta outputs
    with pytest.raises(RuntimeError, match="stablemax_cross_entropy: all tensor arguments must be on one device, "
                                           "got cpu and meta"):
        ops.stablemax_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long, device="meta"), None, 1,
                                    -100, 0.0)
