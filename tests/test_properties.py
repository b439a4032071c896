"""Property tests (hypothesis): invariants every family must keep on generated valid inputs, and generated
invalid inputs that must raise a clear error before any state changes.

The example budget is the "ci" profile (a few dozen per property) unless LOSSFORGE_HYPOTHESIS_PROFILE=thorough
(hundreds each; run it before touching a kernel's math). Tensors come from a torch.Generator seeded by the drawn
seed, so a failure's example reproduces exactly."""
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import lossforge
from lossforge import mfac
from lossforge.optim import MFAC
from lossforge.reference import pamc as pamc_ref
from lossforge.reference import sliced_wasserstein as sw_ref
from test_betti_matching import reference_build
from test_mfac import _same_state, _window_state

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("LOSSFORGE_HYPOTHESIS_PROFILE", "ci"))

F64 = torch.float64
seeds = st.integers(0, 2**31 - 1)


def generator(seed):
    return torch.Generator().manual_seed(seed)


# ---- StableMax ---------------------------------------------------------------------------------------------

@given(seed=seeds, n=st.integers(1, 12), V=st.integers(1, 40), weighted=st.booleans(),
       eps=st.sampled_from([0.0, 0.1, 1.0]), scale=st.sampled_from([0.1, 3.0, 1e4]))
def test_stablemax_ce_is_cross_entropy_of_transformed_logits(seed, n, V, weighted, eps, scale):
    """F.cross_entropy(sign(x) log1p|x|) in float64 (the oracle), with ignored rows, ties and -0.0."""
    g = generator(seed)
    x = torch.randn(n, V, generator=g, dtype=F64) * scale
    x[x.abs() < 0.1 * scale] = -0.0
    target = torch.randint(0, V, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.2] = -100
    w = torch.rand(V, generator=g, dtype=F64) + 0.1 if weighted else None
    t = torch.sign(x) * torch.log1p(x.abs())
    for reduction in ("none", "sum"):
        ours = lossforge.stablemax_cross_entropy(x, target, w, reduction=reduction, label_smoothing=eps)
        want = F.cross_entropy(t, target, w, reduction=reduction, label_smoothing=eps)
        torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-12)


@given(seed=seeds, n=st.integers(2, 12), V=st.integers(2, 20))
def test_stablemax_ce_class_permutation_and_batch_split(seed, n, V):
    g = generator(seed)
    x = torch.randn(n, V, generator=g, dtype=F64) * 4
    target = torch.randint(0, V, (n,), generator=g)
    w = torch.rand(V, generator=g, dtype=F64) + 0.1
    perm = torch.randperm(V, generator=g)
    inv = torch.argsort(perm)
    a = lossforge.stablemax_cross_entropy(x, target, w, reduction="none")
    b = lossforge.stablemax_cross_entropy(x[:, perm], inv[target], w[perm], reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    k = n // 2
    parts = torch.cat([lossforge.stablemax_cross_entropy(x[:k], target[:k], w, reduction="none"),
                       lossforge.stablemax_cross_entropy(x[k:], target[k:], w, reduction="none")])
    assert torch.equal(parts, a)


@given(seed=seeds, n=st.integers(1, 8), V=st.integers(1, 10), bad=st.integers(-10**6, 10**6))
def test_stablemax_ce_bad_target_raises(seed, n, V, bad):
    assume(bad != -100 and not 0 <= bad < V)
    g = generator(seed)
    x = torch.randn(n, V, generator=g)
    target = torch.randint(0, V, (n,), generator=g)
    i = int(torch.randint(0, n, (1,), generator=g))
    target[i] = bad
    with pytest.raises((ValueError, RuntimeError), match=rf"target value {bad} at flat index {i} is out of range"):
        lossforge.stablemax_cross_entropy(x, target)


# ---- sliced Wasserstein ------------------------------------------------------------------------------------

def sw(x, y, wx, wy, P, p):
    return lossforge.sliced_wasserstein(x, y, wx, wy, projections=P, p=p, root=False, reduction="none")


@given(seed=seeds, N=st.integers(1, 15), M=st.integers(1, 15), d=st.integers(1, 4), L=st.integers(1, 6),
       weighted=st.booleans(), p=st.sampled_from([1.0, 2.0, 1.5, 3.0]))
def test_sliced_wasserstein_invariants(seed, N, M, d, L, weighted, p):
    """Agreement with the float64 reference; permutation of points, translation, symmetry, scaling by c
    (W_p^p scales by c^p), zero-weight padding anywhere and batch splitting change nothing else."""
    g = generator(seed)
    x = torch.randn(2, N, d, generator=g, dtype=F64)
    y = torch.randn(2, M, d, generator=g, dtype=F64) + 0.3
    wx = torch.rand(2, N, generator=g, dtype=F64) + 0.05 if weighted else None
    wy = torch.rand(2, M, generator=g, dtype=F64) + 0.05 if weighted else None
    P = torch.randn(d, L, generator=g, dtype=F64)
    P = P / P.norm(dim=0, keepdim=True)
    v = sw(x, y, wx, wy, P, p)
    torch.testing.assert_close(v, sw_ref.sliced_wasserstein(x, y, wx, wy, projections=P, p=p, root=False,
                                                            reduction="none"), rtol=1e-9, atol=1e-12)
    tol = dict(rtol=1e-9, atol=1e-12)
    px, py = torch.randperm(N, generator=g), torch.randperm(M, generator=g)
    torch.testing.assert_close(sw(x[:, px], y[:, py], None if wx is None else wx[:, px],
                                  None if wy is None else wy[:, py], P, p), v, **tol)
    shift = torch.randn(d, generator=g, dtype=F64) * 10
    torch.testing.assert_close(sw(x + shift, y + shift, wx, wy, P, p), v, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sw(y, x, wy, wx, P, p), v, **tol)
    c = 2.5
    torch.testing.assert_close(sw(c * x, c * y, wx, wy, P, p), c**p * v, **tol)
    torch.testing.assert_close(torch.cat([sw(x[:1], y[:1], None if wx is None else wx[:1],
                                             None if wy is None else wy[:1], P, p),
                                          sw(x[1:], y[1:], None if wx is None else wx[1:],
                                             None if wy is None else wy[1:], P, p)]), v, rtol=0, atol=0)
    # zero-weight padding points, far away, at random places of both clouds
    k = int(torch.randint(0, N + 1, (1,), generator=g))
    far = torch.randn(2, 1, d, generator=g, dtype=F64) * 1e6
    xp = torch.cat([x[:, :k], far, x[:, k:]], 1)
    wxp = torch.cat([(torch.ones(2, N, dtype=F64) if wx is None else wx)[:, :k], torch.zeros(2, 1, dtype=F64),
                     (torch.ones(2, N, dtype=F64) if wx is None else wx)[:, k:]], 1)
    torch.testing.assert_close(sw(xp, y, wxp, torch.ones(2, M, dtype=F64) if wy is None else wy, P, p), v, **tol)


@given(seed=seeds, bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_sliced_wasserstein_non_finite_points_raise(seed, bad):
    g = generator(seed)
    x, y = torch.randn(1, 6, 2, generator=g), torch.randn(1, 5, 2, generator=g)
    x[0, int(torch.randint(0, 6, (1,), generator=g)), int(torch.randint(0, 2, (1,), generator=g))] = bad
    with pytest.raises((ValueError, RuntimeError), match="finite"):
        lossforge.sliced_wasserstein(x, y, projections=torch.randn(2, 3, generator=g))


# ---- Betti matching ----------------------------------------------------------------------------------------

def build_loss(p, t):
    """The topolosses loss from the build's matching of f = 1 - p, g = 1 - t."""
    f, g = 1 - p, 1 - t
    r = reference_build().compute_matching(f.copy(), g.copy())

    def val(img, coords):
        c = np.asarray(coords).reshape(-1, img.ndim)
        return img[tuple(c.T)] if len(c) else np.zeros(0)

    total = 0.0
    for k in range(f.ndim):
        total += 2 * (((val(f, r.input1_matched_birth_coordinates[k]) - val(g, r.input2_matched_birth_coordinates[k]))
                       ** 2).sum() + ((val(f, r.input1_matched_death_coordinates[k]) -
                                       val(g, r.input2_matched_death_coordinates[k])) ** 2).sum())
        total += ((val(f, r.input1_unmatched_birth_coordinates[k]) - val(f, r.input1_unmatched_death_coordinates[k]))
                  ** 2).sum()
        total += ((val(g, r.input2_unmatched_birth_coordinates[k]) - val(g, r.input2_unmatched_death_coordinates[k]))
                  ** 2).sum()
    return float(total)


@given(seed=seeds, H=st.integers(1, 12), W=st.integers(1, 12), levels=st.sampled_from([2, 4, 256]))
def test_betti_matching_invariants(seed, H, W, levels):
    """The loss of the Betti-Matching-3D build (the oracle, ties included); zero against itself; the
    per-instance losses do not depend on the batch they are in. (Not a grid symmetry: with the cells of
    equal value in the V-construction ordered by index, a flip may match other bars; the build does the
    same, in 42 of 200 random 4 x 4 pairs.)"""
    g = generator(seed)
    p = torch.randint(0, levels, (3, 1, H, W), generator=g).to(F64) / (levels - 1)
    t = (torch.rand(3, 1, H, W, generator=g, dtype=F64) > 0.5).to(F64)
    loss = lossforge.betti_matching_loss(p, t, reduction="none")
    for i in range(3):
        want = build_loss(p[i, 0].numpy(), t[i, 0].numpy())
        assert abs(loss[i, 0].item() - want) <= 1e-9 * max(1.0, want)
    assert lossforge.betti_matching_loss(p, p, reduction="sum").item() == 0.0
    torch.testing.assert_close(lossforge.betti_matching_loss(p[1:2], t[1:2], reduction="none"), loss[1:2],
                               rtol=0, atol=0)


@given(seed=seeds, where=st.sampled_from(["pred", "target"]))
def test_betti_matching_nan_raises(seed, where):
    g = generator(seed)
    p, t = torch.rand(1, 1, 6, 7, generator=g), torch.rand(1, 1, 6, 7, generator=g)
    (p if where == "pred" else t)[0, 0, int(torch.randint(0, 6, (1,), generator=g)), 3] = math.nan
    with pytest.raises(ValueError, match=f"{where} contains NaN"):
        lossforge.betti_matching_loss(p, t)


# ---- M-FAC -------------------------------------------------------------------------------------------------

@given(seed=seeds, m=st.integers(1, 6), dim=st.integers(1, 40), steps=st.integers(1, 14),
       warmup=st.sampled_from(["scaled", "zeros"]), damp=st.sampled_from([1e-1, 1e-3]))
def test_mfac_window_against_dense_solve_and_bad_steps(seed, m, dim, steps, warmup, damp):
    """F^-1 x from the window equals a dense float64 solve with the last m gradients; a step with a NaN or
    inf anywhere raises and leaves the window bit for bit as it was; a state_dict round trip continues
    bit for bit."""
    g = generator(seed)
    W = mfac.SlidingWindowIHVP(dim, m, damp, F64, warmup=warmup)
    grads = []
    for s in range(steps):
        if s % 3 == 1:
            bad = torch.randn(dim, generator=g, dtype=F64)
            bad[int(torch.randint(0, dim, (1,), generator=g))] = [math.nan, math.inf, -math.inf][s % 3]
            before = _window_state(W)
            with pytest.raises(ValueError, match="non-finite entry"):
                W.update_mul(bad)
            assert _same_state(_window_state(W), before)
        gr = torch.randn(dim, generator=g, dtype=F64)
        W.update(gr)
        grads.append(gr)
    window = torch.stack(grads[-m:])
    s = m if warmup == "zeros" else min(len(grads), m)
    F_ = damp * torch.eye(dim, dtype=F64) + window.T @ window / s
    x = torch.randn(dim, generator=g, dtype=F64)
    torch.testing.assert_close(W.mul(x), torch.linalg.solve(F_, x), rtol=1e-7, atol=1e-9)
    W2 = mfac.SlidingWindowIHVP(dim, m, damp, F64, warmup=warmup)
    W2.load_state_dict(copy.deepcopy(W.state_dict()))
    gr = torch.randn(dim, generator=g, dtype=F64)
    assert torch.equal(W.update_mul(gr), W2.update_mul(gr))


@given(seed=seeds, key=st.sampled_from(["G", "gram", "U", "count", "since_refactor", "m", "damp"]),
       value=st.sampled_from(["nan", "shape", "negative", "type"]))
def test_mfac_bad_state_dict_changes_nothing(seed, key, value):
    g = generator(seed)
    W = mfac.SlidingWindowIHVP(10, 3, 1e-2, F64)
    for _ in range(4):
        W.update(torch.randn(10, generator=g, dtype=F64))
    sd = copy.deepcopy(W.state_dict())
    target = mfac.SlidingWindowIHVP(10, 3, 1e-2, F64)
    target.update(torch.randn(10, generator=g, dtype=F64))
    before = _window_state(target)
    v = sd[key]
    if isinstance(v, torch.Tensor):
        sd[key] = {"nan": v.clone().fill_(math.nan), "shape": v[:-1], "negative": -v, "type": v.tolist()}[value]
        assume(value != "negative")  # a negated G or gram is a valid state
    else:
        sd[key] = {"nan": math.nan, "shape": [v], "negative": -abs(v) - 1, "type": str(v)}[value]
    with pytest.raises((ValueError, TypeError)):
        target.load_state_dict(sd)
    assert _same_state(_window_state(target), before)


@given(seed=seeds, momentum=st.sampled_from([0.0, 0.9]), wd=st.sampled_from([0.0, 0.01]),
       bad_step=st.integers(0, 6))
def test_mfac_optimizer_skipped_bad_step_is_as_if_never_taken(seed, momentum, wd, bad_step):
    g = generator(seed)
    shapes = [(3, 4), (5,)]
    p1 = [torch.randn(*s, generator=g, dtype=F64).requires_grad_() for s in shapes]
    p2 = [p.detach().clone().requires_grad_() for p in p1]
    o1 = MFAC(p1, lr=0.1, ngrads=3, damp=1e-2, momentum=momentum, weight_decay=wd)
    o2 = MFAC(p2, lr=0.1, ngrads=3, damp=1e-2, momentum=momentum, weight_decay=wd)
    for step in range(7):
        gs = [torch.randn(*s, generator=g, dtype=F64) for s in shapes]
        if step == bad_step:
            bad = [t.clone() for t in gs]
            bad[step % 2].view(-1)[0] = math.nan
            for p, b in zip(p1, bad):
                p.grad = b
            with pytest.raises(ValueError, match="non-finite entry"):
                o1.step()
        for p, q, gr in zip(p1, p2, gs):
            p.grad, q.grad = gr.clone(), gr.clone()
        o1.step()
        o2.step()
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


# ---- PamC --------------------------------------------------------------------------------------------------

@given(seed=seeds, n=st.integers(1, 25), d=st.integers(1, 8), E=st.integers(0, 60), k=st.integers(1, 5),
       tau=st.sampled_from([0.5, 1.0, 3.0]))
def test_pamc_invariants(seed, n, d, E, k, tau):
    """Agreement with the dense float64 reference; relabelling the nodes and scaling z by a positive constant
    (cosine similarities) change neither the mean loss nor (up to the relabelling) its gradient."""
    g = generator(seed)
    z = torch.randn(n, d, generator=g, dtype=F64)
    ei = torch.randint(0, n, (2, E), generator=g)
    w = torch.rand(E, generator=g, dtype=F64) + 0.1
    labels = torch.randint(0, k, (n,), generator=g)
    zz = z.clone().requires_grad_()
    loss = lossforge.pamc_loss(zz, ei, w, assignment=labels, tau=tau, num_clusters=k)
    (gz,) = torch.autograd.grad(loss, zz)
    want = pamc_ref.pamc_loss_reference(z, pamc_ref.gamma_dense(ei, n, w), labels, tau=tau, num_clusters=k)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-10)
    perm = torch.randperm(n, generator=g)
    inv = torch.argsort(perm)
    zp = z[perm].clone().requires_grad_()
    lp = lossforge.pamc_loss(zp, inv[ei], w, assignment=labels[perm], tau=tau, num_clusters=k)
    (gp,) = torch.autograd.grad(lp, zp)
    torch.testing.assert_close(lp, loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gp, gz[perm], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(lossforge.pamc_loss(3.7 * z, ei, w, assignment=labels, tau=tau, num_clusters=k), loss,
                               rtol=1e-10, atol=1e-12)


@given(seed=seeds, n=st.integers(1, 10), bad=st.integers(-5, 20), side=st.integers(0, 1))
def test_pamc_bad_edges_raise(seed, n, bad, side):
    assume(not 0 <= bad < n)
    g = generator(seed)
    ei = torch.randint(0, n, (2, 4), generator=g)
    ei[side, 2] = bad
    with pytest.raises(ValueError, match=f"node index {bad} at edge 2, out of range for {n} nodes"):
        lossforge.pamc_loss(torch.randn(n, 3, generator=g), ei, assignment=torch.zeros(n, dtype=torch.long))
