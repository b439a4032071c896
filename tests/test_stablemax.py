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
    for log, fn, oracle in ((False, lossforge.stablemax, torch.softmax), (True, lossforge.log_stablemax, torch.log_softmax)):
        got = fn(x.to(device), dim=1).cpu().double()
        torch.testing.assert_close(got, oracle(t, 1), rtol=tol, atol=tol)
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
    # the fused linear loss (a Python op); need_grads=False: the forward skips the gradients, the backward
    # recomputes them (it returned empty gradients for mean and sum before)
    h = torch.randn(6, 3, generator=gen).to(device).requires_grad_()
    W = torch.randn(5, 3, generator=gen).to(device).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 4, -100], device=device)
    for reduction in ("none", "mean", "sum"):
        for need_grads in (True, False):
            torch.library.opcheck(ops.fused_linear_stablemax_cross_entropy.default,
                                  (h, W, y, None, weight, -100, 0.1, reduction, 4, need_grads))


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
    with pytest.raises(TypeError, match=r"floating target holds class probabilities.*got \[4\] "
                                        r"\(class indices must be int64\)"):
        ce(x, t.float())  # float class indices
    with pytest.raises(ValueError, match=r"must have input's shape \[4, 5\], got \[4, 4\]"):
        ce(x, torch.rand(4, 4))  # probabilities of the wrong shape
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
    with pytest.raises(TypeError, match="weight and bias must have one dtype"):
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


# ---- class-probability targets (issue 13) ---------------------------------------------------------

def probabilities(shape, cdim, gen, device="cpu"):
    """Random class probabilities along cdim, with some exact zeros (hard labels in some rows)."""
    raw = torch.rand(shape, generator=gen, dtype=torch.float64)
    raw[raw < 0.2] = 0.0
    p = raw / raw.sum(cdim, keepdim=True).clamp_min(1e-12)
    return p.to(device)


@pytest.mark.parametrize("in_shape,dim", [((9, 7), 1), ((4, 5, 3, 2), 1), ((3, 6, 8), -1), ((11,), 0)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_probability_targets_match_oracle(in_shape, dim, reduction, weighted, label_smoothing, gen, device):
    """F.cross_entropy's probability targets: loss = -sum_c w_c q_c log p_c with q smoothed to
    q (1 - eps) + eps / C, 'mean' over rows; gradients with respect to the logits and to the target."""
    cdim = dim % len(in_shape)
    x = logits(in_shape, gen, device=device).requires_grad_()
    q = probabilities(in_shape, cdim, gen, device).requires_grad_()
    V = in_shape[cdim]
    weight = (torch.rand(V, generator=gen, dtype=torch.float64) + 0.1).to(device) if weighted else None
    ours = lossforge.stablemax_cross_entropy(x, q, weight, reduction=reduction, label_smoothing=label_smoothing,
                                             dim=dim)
    q_ref = q.detach().cpu().requires_grad_()
    tr = Transformed(x)
    t = tr.t if cdim == 1 or len(in_shape) == 1 else tr.t.movedim(cdim, 1)
    qt = q_ref if cdim == 1 or len(in_shape) == 1 else q_ref.movedim(cdim, 1)
    expected = F.cross_entropy(t, qt, None if weight is None else weight.cpu(), reduction=reduction,
                               label_smoothing=label_smoothing)
    assert ours.dtype == torch.float64 and ours.shape == expected.shape
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-10, atol=1e-12)
    g = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    gx, gq = torch.autograd.grad(ours, (x, q), g.to(device))
    (gt_ref, gq_ref) = torch.autograd.grad(expected, (tr.t, q_ref), g)
    torch.testing.assert_close(gx.cpu(), gt_ref / (1 + tr.x.abs()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gq.cpu(), gq_ref, rtol=1e-10, atol=1e-12)
    if weighted:  # differentiable in weight, as torch's composite is
        wg, wg_ref = weight.clone().requires_grad_(), weight.cpu().clone().requires_grad_()
        ours_w = lossforge.stablemax_cross_entropy(x, q, wg, reduction=reduction, label_smoothing=label_smoothing,
                                                   dim=dim)
        (gw,) = torch.autograd.grad(ours_w, wg, g.to(device))
        (gw_ref,) = torch.autograd.grad(F.cross_entropy(t, qt, wg_ref, reduction=reduction,
                                                        label_smoothing=label_smoothing), wg_ref, g)
        torch.testing.assert_close(gw.cpu(), gw_ref, rtol=1e-10, atol=1e-12)
    # ignore_index does not apply to probability targets (as in torch)
    again = lossforge.stablemax_cross_entropy(x, q, weight, reduction=reduction, label_smoothing=label_smoothing,
                                              dim=dim, ignore_index=0)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_probability_targets_low_precision_and_module(dtype, gen, device):
    x = logits((32, 9), gen, dtype=dtype, device=device).requires_grad_()
    q = probabilities((32, 9), 1, gen, device).float()
    weight = torch.rand(9, generator=gen).to(device) + 0.5
    ours = lossforge.nn.StableMaxCrossEntropyLoss(weight, label_smoothing=0.1)(x, q)
    assert ours.dtype == dtype
    tr = Transformed(x)
    expected = F.cross_entropy(tr.t, q.double().cpu(), weight.double().cpu(), label_smoothing=0.1)
    torch.testing.assert_close(ours.double().cpu(), expected, rtol=TOL[dtype], atol=TOL[dtype])
    (gx,) = torch.autograd.grad(ours, x)
    assert gx.dtype == dtype
    torch.testing.assert_close(gx.double().cpu(), tr.grad(expected), rtol=TOL[dtype], atol=TOL[dtype])


def test_fused_linear_rejects_probability_targets():
    h, W = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(TypeError, match="class-probability targets are not supported here: compute the logits and "
                                        "use stablemax_cross_entropy"):
        lossforge.fused_linear_stablemax_cross_entropy(h, W, torch.rand(4, 5))


# ---- autocast (issue 13) -------------------------------------------------------------------------

def _autocast_dtype(device):
    return torch.bfloat16 if device == "cpu" else torch.float16


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_under_autocast_returns_float32_like_torch(in_dtype, gen, device):
    """F.cross_entropy is on autocast's float32 list: so is StableMax-CE, for index and probability targets
    (it returned the input's bfloat16 before). The kernel reads the low-precision logits as they are."""
    x = logits((24, 7), gen, dtype=in_dtype, device=device).requires_grad_()
    y = targets((24,), 7, gen, device=device)
    q = probabilities((24, 7), 1, gen, device).float()
    with torch.autocast(device, dtype=_autocast_dtype(device)):
        for target in (y, q):
            ours = lossforge.stablemax_cross_entropy(x, target, label_smoothing=0.1)
            theirs = F.cross_entropy(x, target, label_smoothing=0.1)
            assert ours.dtype == theirs.dtype == torch.float32
            expected, tr = oracle_ce(x, target, label_smoothing=0.1)
            torch.testing.assert_close(ours.double().cpu(), expected, rtol=TOL[in_dtype], atol=TOL[in_dtype])
            (gx,) = torch.autograd.grad(ours, x)
            assert gx.dtype == in_dtype
            torch.testing.assert_close(gx.double().cpu(), tr.grad(expected), rtol=TOL[in_dtype], atol=TOL[in_dtype])
        mod = lossforge.nn.StableMaxCrossEntropyLoss(reduction="none")
        assert mod(x, y).dtype == torch.float32


@pytest.mark.parametrize("log", [False, True])
def test_stablemax_under_autocast_follows_softmax(log, gen, device):
    """StableMax takes softmax's autocast policy on each device: float32 on CUDA (the float32 list), the
    input's dtype on the CPU (CPU autocast leaves softmax alone)."""
    ours_fn, torch_fn = (lossforge.log_stablemax, torch.log_softmax) if log else (lossforge.stablemax, torch.softmax)
    for in_dtype in (torch.float32, _autocast_dtype(device)):
        x = logits((6, 11), gen, dtype=in_dtype, device=device).requires_grad_()
        with torch.autocast(device, dtype=_autocast_dtype(device)):
            ours = ours_fn(x, dim=-1)
            assert ours.dtype == torch_fn(x, -1).dtype
            tol = TOL[ours.dtype] if ours.dtype == in_dtype else TOL[in_dtype]
            t = transformed(x.detach().double().cpu())
            torch.testing.assert_close(ours.double().cpu(), torch_fn(t, -1), rtol=tol, atol=tol)
            (gx,) = torch.autograd.grad(ours.sum(), x)
            assert gx.dtype == in_dtype
    # the CUDA rule is registered whether or not this machine has a GPU
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lossforge::stablemax", "AutocastCUDA")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("h_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_fused_linear_under_autocast(reduction, h_dtype, w_dtype, gen, device):
    """Under autocast the GEMMs run in the autocast dtype (F.linear's policy) and the loss accumulates in
    and comes back in float32 (F.cross_entropy's): it raised 'Expected out tensor to have dtype BFloat16'
    before, and TypeError for a bfloat16 hidden state with a float32 head."""
    low = _autocast_dtype(device)
    h_dtype = low if h_dtype == torch.bfloat16 else h_dtype
    w_dtype = low if w_dtype == torch.bfloat16 else w_dtype
    N, H, V = 21, 8, 13
    h = torch.randn(N, H, generator=gen).to(h_dtype).to(device).requires_grad_()
    W = (torch.randn(V, H, generator=gen) * 0.5).to(w_dtype).to(device).requires_grad_()
    b = torch.randn(V, generator=gen).to(w_dtype).to(device).requires_grad_()
    y = targets((N,), V, gen, device=device)
    with torch.autocast(device, dtype=low):
        ours = lossforge.fused_linear_stablemax_cross_entropy(h, W, y, b, reduction=reduction, chunk_size=8)
        unfused = lossforge.stablemax_cross_entropy(F.linear(h, W, b), y, reduction=reduction)
        theirs = F.cross_entropy(F.linear(h, W, b), y, reduction=reduction)
    assert ours.dtype == unfused.dtype == theirs.dtype == torch.float32
    # the oracle: the logits of the autocast-rounded operands, in float64
    hl, Wl, bl = (t.detach().to(low).double().cpu() for t in (h, W, b))
    expected, _ = oracle_ce(hl @ Wl.t() + bl, y, reduction=reduction)
    torch.testing.assert_close(ours.double().cpu(), expected, rtol=2e-2, atol=2e-2)
    g = torch.rand(ours.shape, generator=gen).to(device)
    got = torch.autograd.grad(ours, (h, W, b), g)
    want = torch.autograd.grad(unfused, (h, W, b), g)
    for a, c, leaf in zip(got, want, (h, W, b)):
        assert a.dtype == leaf.dtype
        torch.testing.assert_close(a.double(), c.double(), rtol=3e-2, atol=3e-2)


def test_mixed_dtypes_outside_autocast_raise_like_linear():
    h, W, y = torch.randn(4, 3).bfloat16(), torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError):  # torch's own F.linear refuses them too
        F.linear(h, W)
    with pytest.raises(TypeError, match=r"hidden, weight and bias must have one dtype \(as in F.linear\), got "
                                        r"hidden is torch.bfloat16, weight torch.float32: cast them, or run under "
                                        r"torch.autocast"):
        lossforge.fused_linear_stablemax_cross_entropy(h, W, y)
    with pytest.raises(TypeError, match="bias torch.float64"):
        lossforge.fused_linear_stablemax_cross_entropy(h.float(), W, y, torch.zeros(5, dtype=torch.float64))


# ---- keyword-only options (issue 13) -------------------------------------------------------------

def test_options_after_weight_are_keyword_only(gen):
    """The grokking reference is called stablemax_cross_entropy(logits, labels, reduction): here that third
    positional argument is weight, and the error says so instead of treating 'mean' as a weight."""
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    ce = lossforge.stablemax_cross_entropy
    with pytest.raises(TypeError, match=r"weight must be a per-class torch.Tensor or None, got str 'sum': the "
                                        r"arguments after weight \(ignore_index=, reduction=.*\) are keyword-only; "
                                        r"to choose the reduction pass reduction='sum'"):
        ce(x, y, "sum")
    with pytest.raises(TypeError, match="keyword-only"):
        ce(x, y, -100)  # an ignore_index in weight's place
    with pytest.raises(TypeError, match="positional argument"):
        ce(x, y, None, -100)
    with pytest.raises(TypeError, match="positional argument"):
        lossforge.nn.StableMaxCrossEntropyLoss(None, -100)
    with pytest.raises(TypeError, match="keyword-only; to choose the reduction pass reduction='none'"):
        lossforge.nn.StableMaxCrossEntropyLoss("none")
    with pytest.raises(TypeError, match="positional argument"):
        lossforge.fused_linear_stablemax_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), y, None, None)
    with pytest.raises(TypeError, match=r"bias must be a \[V\] torch.Tensor or None, got str 'mean': the arguments "
                                        r"after bias \(class_weight=, .*\) are keyword-only; to choose the reduction"):
        lossforge.fused_linear_stablemax_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), y, "mean")
    with pytest.raises(TypeError, match="positional argument"):
        lossforge.collapse_fraction(x, y, "softmax")
    # the keywords give the reference's result
    xd = x.double()
    torch.testing.assert_close(ce(xd, y, reduction="sum", dim=-1), ref.stablemax_cross_entropy(xd, y, reduction="sum"))


# ---- DTensor (issue 13) --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_mesh(tmp_path_factory):
    """A one-process gloo world and a one-device CPU mesh (torch.distributed is torn down afterwards)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from torch.distributed.device_mesh import DeviceMesh

    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        yield DeviceMesh("cpu", [0])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["index", "weighted index", "probability"])
def test_dtensor_sharded_over_the_batch(reduction, kind, cpu_mesh, gen):
    """A batch-sharded DTensor gives the loss of the whole batch (it raised torch's generic
    NotImplementedError: no sharding strategy for the op)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    x = logits((12, 6), gen)
    weight = torch.rand(6, generator=gen, dtype=torch.float64) + 0.2 if kind == "weighted index" else None
    target = probabilities((12, 6), 1, gen) if kind == "probability" else targets((12,), 6, gen)
    xd = distribute_tensor(x, cpu_mesh, [Shard(0)]).requires_grad_()
    td = distribute_tensor(target, cpu_mesh, [Shard(0)])
    ours = lossforge.stablemax_cross_entropy(xd, td, weight, reduction=reduction, label_smoothing=0.1)
    assert isinstance(ours, DTensor)
    expected, tr = oracle_ce(x, target, weight, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(ours.full_tensor(), expected, rtol=1e-10, atol=1e-12)
    g = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    gd = distribute_tensor(g, cpu_mesh, [Shard(0)] if reduction == "none" else [Replicate()])
    (gx,) = torch.autograd.grad(ours, xd, gd)
    torch.testing.assert_close(gx.full_tensor(), tr.grad(expected, g), rtol=1e-10, atol=1e-12)
    # the module too
    mod = lossforge.nn.StableMaxCrossEntropyLoss(weight, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(mod(xd, td).full_tensor(), expected, rtol=1e-10, atol=1e-12)


def test_dtensor_stablemax_and_clear_errors(cpu_mesh, gen):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    x = logits((5, 3, 7), gen)
    for fn, sm in ((lossforge.stablemax, torch.softmax), (lossforge.log_stablemax, torch.log_softmax)):
        out = fn(distribute_tensor(x, cpu_mesh, [Shard(0)]), dim=-1)
        assert isinstance(out, DTensor) and tuple(out.placements) == (Shard(0),)
        torch.testing.assert_close(out.full_tensor(), sm(transformed(x), -1), rtol=1e-12, atol=1e-12)
    y = targets((5, 7), 3, gen)
    ce = lossforge.stablemax_cross_entropy
    with pytest.raises(TypeError, match=r"sharded over a batch dimension \(e.g. Shard\(0\)\) or replicated, got "
                                        r"\(Shard\(dim=1\),\) with the class dimension 1.*full_tensor"):
        ce(distribute_tensor(x, cpu_mesh, [Shard(1)]), distribute_tensor(y, cpu_mesh, [Shard(1)]))
    with pytest.raises(TypeError, match="target is a plain tensor beside DTensors"):
        ce(distribute_tensor(x, cpu_mesh, [Shard(0)]), y)
    with pytest.raises(TypeError, match="shard them alike"):
        ce(distribute_tensor(x, cpu_mesh, [Shard(0)]), distribute_tensor(y, cpu_mesh, [Replicate()]))
    h, W = distribute_tensor(torch.randn(4, 3), cpu_mesh, [Shard(0)]), torch.randn(5, 3)
    with pytest.raises(TypeError, match=r"DTensor arguments are not supported .*`.to_local\(\)`.*`.full_tensor\(\)`"):
        lossforge.fused_linear_stablemax_cross_entropy(h, W, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="DTensor arguments are not supported"):
        lossforge.collapse_fraction(distribute_tensor(x, cpu_mesh, [Shard(0)]), distribute_tensor(y, cpu_mesh,
                                                                                                [Shard(0)]))


# ---- torch.compile (issue 13) --------------------------------------------------------------------

COMPILE_ENTRY_POINTS = (
    "lossforge.stablemax",
    "lossforge.log_stablemax",
    "lossforge.stablemax_cross_entropy",
    "lossforge.fused_linear_stablemax_cross_entropy",
    "lossforge.collapse_fraction",
    "lossforge.nn.StableMaxCrossEntropyLoss",
    "lossforge.optim.OrthoGrad.step",
)


def _compile_cases(gen):
    x = torch.randn(6, 5, generator=gen)
    y = torch.tensor([0, 4, -100, 2, 1, 3])
    q = probabilities((6, 5), 1, gen).float()
    h, W = torch.randn(6, 3, generator=gen), torch.randn(5, 3, generator=gen)
    mod = lossforge.nn.StableMaxCrossEntropyLoss(torch.rand(5, generator=gen), label_smoothing=0.1)
    return {
        "stablemax": (lambda x: lossforge.stablemax(x, dim=0), (x,)),
        "log_stablemax": (lambda x: lossforge.log_stablemax(x), (x,)),
        "ce index": (lambda x: lossforge.stablemax_cross_entropy(x, y, label_smoothing=0.1), (x,)),
        "ce probability": (lambda x: lossforge.stablemax_cross_entropy(x, q, reduction="sum"), (x,)),
        "ce autocast": (lambda x: _autocast_ce(x.bfloat16(), y), (x,)),
        "fused": (lambda h, W: lossforge.fused_linear_stablemax_cross_entropy(h, W, y, chunk_size=4), (h, W)),
        "fused none": (lambda h, W: lossforge.fused_linear_stablemax_cross_entropy(h, W, y, reduction="none"), (h, W)),
        "fused autocast": (lambda h, W: _autocast_fused(h.bfloat16(), W, y), (h, W)),
        "collapse_fraction": (lambda x: lossforge.collapse_fraction(x * 100, y, loss="softmax"), (x,)),
        "module": (lambda x: mod(x, y), (x,)),
    }


def _autocast_fused(h, W, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return lossforge.fused_linear_stablemax_cross_entropy(h, W, y, reduction="none")


def _autocast_ce(x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return lossforge.stablemax_cross_entropy(x, y)


@pytest.mark.parametrize("case", ["stablemax", "log_stablemax", "ce index", "ce probability", "ce autocast", "fused",
                                  "fused none", "fused autocast", "collapse_fraction", "module"])
def test_compile_fullgraph_matches_eager(case, gen):
    """Each entry point compiles into one graph (aot_eager) and gives eager's values and gradients
    (collapse_fraction broke the graph on its target check before)."""
    fn, args = _compile_cases(gen)[case]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    leaves = [a.clone().requires_grad_() for a in args]
    eager_leaves = [a.clone().requires_grad_() for a in args]
    got, want = compiled(*leaves), fn(*eager_leaves)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, equal_nan=True)
    if got.requires_grad:
        g = torch.rand(got.shape, generator=gen)
        for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, eager_leaves, g)):
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_compile_collapse_fraction_still_checks_targets():
    torch._dynamo.reset()
    compiled = torch.compile(lossforge.collapse_fraction, backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="target value 6 at flat index 1 is out of range"):
        compiled(torch.zeros(3, 6), torch.tensor([2, 6, 3]))
    torch._dynamo.reset()
    torch.library.opcheck(torch.ops.lossforge.stablemax_target_out_of_range.default,
                          (torch.tensor([0, 2, -100]), 3, -100, "collapse_fraction"))


def test_compile_orthograd_step_matches_eager():
    """OrthoGrad.step compiles with the graph breaks torch's optimizers insert around every step
    (fullgraph is impossible: torch.optim.Optimizer calls torch._dynamo.graph_break()); the projection
    itself is one graph. Both match eager."""
    def run(compile_step):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = lossforge.optim.OrthoGrad(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        step = torch.compile(opt.step, backend="aot_eager") if compile_step else opt.step
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        for _ in range(3):
            opt.zero_grad()
            lossforge.stablemax_cross_entropy(model(x), y).backward()
            step()
        return [p.detach().clone() for p in model.parameters()]

    torch._dynamo.reset()
    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    w = torch.nn.Parameter(torch.randn(10))
    w.grad = torch.randn(10)
    opt = lossforge.optim.OrthoGrad([w], torch.optim.SGD, lr=0.1)
    expected = ref.orthograd_(w.detach(), w.grad.clone())
    torch.compile(opt._project_gradients, backend="aot_eager", fullgraph=True)()
    torch.testing.assert_close(w.grad, expected)
    torch._dynamo.reset()


def test_direct_op_under_compile_fails_with_the_eager_message():
    """The fake kernels repeat the kernels' checks, so tracing fails with the kernel's message (a grad of
    the wrong shape used to be traced as x's shape and fail later, in an unrelated op)."""
    x, g = torch.randn(4, 5), torch.randn(5, 4)
    out = ops.stablemax(x, 1, False)

    def f(g, x, out):
        return ops.stablemax_backward(g, x, out, 1, False) + g

    with pytest.raises(RuntimeError, match="stablemax_backward: grad, x and out must have the same shape"):
        f(g, x, out)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="stablemax_backward: grad, x and out must have the same shape"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(g, x, out)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"stablemax_cross_entropy: target has 3 elements, expected 4"):
        torch.compile(lambda x, t: ops.stablemax_cross_entropy(x, t, None, 1, -100, 0.0)[0] + t,
                      backend="aot_eager", fullgraph=True)(x, torch.zeros(3, dtype=torch.long))
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="orthograd_: grad and param must have the same dtype"):
        torch.compile(lambda g, w: ops.orthograd_(g, w), backend="aot_eager", fullgraph=True)(
            torch.randn(4), torch.randn(4, dtype=torch.float64))
    torch._dynamo.reset()


def test_dtensor_under_compile(cpu_mesh, gen):
    """The batch-sharded DTensor path compiles into one graph too, and matches eager."""
    from torch.distributed.tensor import Shard, distribute_tensor

    x = distribute_tensor(logits((8, 5), gen), cpu_mesh, [Shard(0)]).requires_grad_()
    y = distribute_tensor(targets((8,), 5, gen), cpu_mesh, [Shard(0)])

    def f(x, y):
        return lossforge.stablemax_cross_entropy(x, y, label_smoothing=0.1)

    torch._dynamo.reset()
    got, want = torch.compile(f, backend="aot_eager", fullgraph=True)(x, y), f(x, y)
    torch.testing.assert_close(got.full_tensor(), want.full_tensor())
    (g_got,), (g_want,) = torch.autograd.grad(got, x), torch.autograd.grad(want, x)
    torch.testing.assert_close(g_got.full_tensor(), g_want.full_tensor())
    torch._dynamo.reset()
