"""M-FAC: StaticIHVP, BlockIHVP, SlidingWindowIHVP, optim.MFAC and the kernels under them.

Oracles: the dense float64 F = damp I + G^T G / s with torch.linalg.solve / inv (d <= 4096); the
inverse-free residual |damp y + G^T (G y) / s - x| / |x| at large d; a deque of the last m gradients;
the paper's static algorithm (reference.mfac.static_factors) and the official dynamic algorithm
(reference.mfac.OfficialDynamic). Tolerances scale with the condition number of F (the problem's own
sensitivity): err <= C * eps(dtype) * kappa, kappa = 1 + sigma_max(G)^2 / (s damp).
"""
import collections
import copy
import datetime
import math
import os
import tempfile

import pytest
import torch

from lossforge import mfac
from lossforge._ops import ops
from lossforge.optim import MFAC
from lossforge.reference import mfac as ref
from conftest import compiled, same_error_eager_and_fake

F64 = torch.float64
EPS = {torch.float64: 2.2e-16, torch.float32: 1.2e-7}


@pytest.fixture(autouse=True)
def _one_thread():
    """Most cases here are small: one thread avoids thread-pool synchronisation on a busy 2-core
    machine (tens of times slower there). Multi-threaded kernels are covered by
    test_passes_deterministic_across_threads, which sets its own thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kappa(G, damp, s=None):
    s = G.shape[0] if s is None else s
    if G.numel() == 0:
        return 1.0
    G = G.double()
    gram = G @ G.T if G.shape[0] <= G.shape[1] else G.T @ G
    return 1.0 + torch.linalg.eigvalsh(gram)[-1].clamp_min(0).item() / (s * damp)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def randn(*shape, gen, dtype=F64, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=dtype) * scale


# ---- kernels --------------------------------------------------------------------------------------

@pytest.mark.parametrize("storage", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("m,d", [(1, 1), (3, 5), (4, 4096), (5, 4097), (33, 10000)])
def test_passes_match_torch(storage, m, d, gen):
    A = torch.float64 if storage == torch.float64 else torch.float32
    tol = 1e-12 if storage == torch.float64 else 1e-5
    G = randn(m, d, gen=gen).to(storage)
    Gd = G.double()
    x = randn(d, gen=gen).to(A)
    X = randn(3, d, gen=gen).to(A)
    assert rel(ops.mfac_gemv(G, x), Gd @ x.double()) < tol
    assert rel(ops.mfac_gemv(G, X), X.double() @ Gd.T) < tol
    b = randn(m, gen=gen).to(A)
    B = randn(3, m, gen=gen).to(A)
    assert rel(ops.mfac_gemv_t(G, b, x, -0.7, 1.3), 1.3 * x.double() - 0.7 * Gd.T @ b.double()) < tol
    assert rel(ops.mfac_gemv_t(G, B, X, 0.5, 2.0), 2.0 * X.double() + 0.5 * B.double() @ Gd) < tol
    assert rel(ops.mfac_gemv_t(G, b, None, 1.0, 0.0), Gd.T @ b.double()) < tol


@pytest.mark.parametrize("storage", [torch.float32, torch.float64, torch.bfloat16])
def test_insert_writes_row_and_returns_gram_row(storage, gen):
    A = torch.float64 if storage == torch.float64 else torch.float32
    m, d = 6, 9000
    G = randn(m, d, gen=gen).to(storage)
    g = randn(d, gen=gen).to(A)
    p = randn(d, gen=gen).to(A)
    parts = [g[:100], g[100:5000], g[5000:]]  # a parameter list: chunks never cross tensors
    pparts = [p[:100], p[100:5000], p[5000:]]
    out = ops.mfac_insert_gemv_(G, 4, parts, pparts, 0.25)
    x = g + 0.25 * p
    assert torch.equal(G[4], x.to(storage))  # the row holds exactly x.to(storage) (round to nearest even)
    Gd = G.double()
    tol = 1e-12 if storage == torch.float64 else 1e-5
    assert out.shape == (m,) and out.dtype == F64
    assert rel(out, Gd @ Gd[4]) < tol


def test_step_kernel_bfloat16_uses_the_stored_gradient(gen):
    m, d = 3, 5000
    G = randn(m, d, gen=gen).bfloat16()
    b, g, p = randn(m, gen=gen).float(), randn(d, gen=gen).float(), randn(d, gen=gen).float()
    p0 = p.clone()
    ops.mfac_step_(G, b, [p], [g], None, -2.0, 3.0, 0.1, 0.01, 0.0)
    xs = (g + 0.01 * p0).bfloat16().double()
    assert rel(p, p0.double() - 0.1 * (3.0 * xs - 2.0 * G.double().T @ b.double())) < 1e-6


def test_step_kernel_matches_formula(gen):
    m, d = 5, 7000
    G = randn(m, d, gen=gen).float()
    b = randn(m, gen=gen).float()
    g, p, v = randn(d, gen=gen).float(), randn(d, gen=gen).float(), randn(d, gen=gen).float()
    p0, v0 = p.clone(), v.clone()
    ops.mfac_step_(G, b, [p[:3000], p[3000:]], [g[:3000], g[3000:]], v, -2.0, 3.0, 0.1, 0.01, 0.9)
    x = g.double() + 0.01 * p0.double()
    y = 3.0 * x - 2.0 * G.double().T @ b.double()
    v_ref = 0.9 * v0.double() + 0.1 * y
    assert rel(v, v_ref) < 1e-5
    assert rel(p, p0.double() - 0.1 * v_ref) < 1e-5
    p1 = p0.clone()
    ops.mfac_step_(G, b, [p1], [g], None, -2.0, 3.0, 0.1, 0.0, 0.0)
    assert rel(p1, p0.double() - 0.1 * (3.0 * g.double() - 2.0 * G.double().T @ b.double())) < 1e-5


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_passes_deterministic_across_threads(storage, gen):
    """Every pass gives the same bits on 1 and 2 threads, and agrees with float64 torch (the threaded
    path of the kernels)."""
    m, d = 37, 50000
    G0 = randn(m, d, gen=gen).to(storage)
    x, b, p = randn(d, gen=gen).float(), randn(m, gen=gen).float(), randn(d, gen=gen).float()

    def run(threads):
        torch.set_num_threads(threads)
        G, q, v = G0.clone(), p.clone(), torch.zeros(d)
        out = [ops.mfac_gemv(G, x), ops.mfac_gemv_t(G, b, x, -1.0, 2.0),
               ops.mfac_insert_gemv_(G, 3, [x[:7], x[7:]], [q[:7], q[7:]], 0.1)]
        ops.mfac_step_(G, b, [q], [x], v, -1.0, 2.0, 0.1, 0.1, 0.9)
        return out + [G, q, v]

    one, two = run(1), run(2)
    for a, c in zip(one, two):
        assert torch.equal(a, c)
    Gd = one[3].double()
    assert rel(one[0], G0.double() @ x.double()) < 1e-5
    assert rel(one[2], Gd @ Gd[3]) < 1e-5


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float64])
def test_generic_and_vector_kernels_agree(storage, gen, monkeypatch):
    A = torch.float64 if storage == torch.float64 else torch.float32
    G = randn(19, 9001, gen=gen).to(storage)
    x, b = randn(9001, gen=gen).to(A), randn(19, gen=gen).to(A)
    fast_t, fast_y = ops.mfac_gemv(G, x), ops.mfac_gemv_t(G, b, x, 1.0, -1.0)
    monkeypatch.setenv("LOSSFORGE_MFAC_CPU_KERNELS", "generic")
    slow_t, slow_y = ops.mfac_gemv(G, x), ops.mfac_gemv_t(G, b, x, 1.0, -1.0)
    # same lanes, same order, no FMA contraction: the same bits on every x86-64 CPU
    assert torch.equal(fast_t, slow_t) and torch.equal(fast_y, slow_y)


@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_chol_replace_oldest(n, gen):
    shift = 0.3
    G = randn(n + 1, 7, gen=gen)  # rows: oldest first, then the new gradient
    old = G[:n] @ G[:n].T + shift * torch.eye(n, dtype=F64)
    U = torch.linalg.cholesky(old, upper=True).contiguous()
    newG = G[1:]
    k = (newG @ G[n]).contiguous()
    piv = ops.mfac_chol_replace_oldest_(U, k, shift)
    K = newG @ newG.T + shift * torch.eye(n, dtype=F64)
    assert torch.allclose(U.T @ U, K, atol=1e-11 * K.abs().max().item())
    assert torch.equal(U, torch.triu(U))
    assert piv.item() >= shift * (1 - 1e-9)


def test_ops_opcheck(gen):
    G = randn(6, 300, gen=gen).float()
    x = randn(300, gen=gen).float()
    b = randn(6, gen=gen).float()
    torch.library.opcheck(ops.mfac_gemv.default, (G, x))
    torch.library.opcheck(ops.mfac_gemv.default, (G, randn(2, 300, gen=gen).float()))
    torch.library.opcheck(ops.mfac_gemv_t.default, (G, b, x, -1.0, 2.0))
    torch.library.opcheck(ops.mfac_gemv_t.default, (G, b, None, 1.0, 0.0))
    torch.library.opcheck(ops.mfac_insert_gemv_.default, (G.clone(), 2, [x[:100], x[100:]], [], 0.0))
    torch.library.opcheck(ops.mfac_insert_gemv_.default, (G.clone().bfloat16(), 2, [x], [x.clone()], 0.1))
    torch.library.opcheck(ops.mfac_chol_solve.default, (torch.eye(3, dtype=F64) * 2, torch.ones(3, 2, dtype=F64)))
    torch.library.opcheck(ops.mfac_step_.default, (G, b, [x.clone()], [x.clone()], torch.zeros(300), -1.0, 1.0,
                                                   0.1, 0.01, 0.5))
    U = torch.linalg.cholesky(torch.eye(4, dtype=F64) * 2, upper=True).contiguous()
    torch.library.opcheck(ops.mfac_chol_replace_oldest_.default, (U, torch.rand(4, dtype=F64, generator=gen), 1.0))


def test_ops_gradcheck(gen):
    G = randn(3, 11, gen=gen).requires_grad_()
    x = randn(11, gen=gen).requires_grad_()
    X = randn(2, 11, gen=gen).requires_grad_()
    b = randn(3, gen=gen).requires_grad_()
    B = randn(2, 3, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda G, x: ops.mfac_gemv(G, x), (G, x))
    assert torch.autograd.gradcheck(lambda G, x: ops.mfac_gemv(G, x), (G, X))
    assert torch.autograd.gradcheck(lambda G, b, x: ops.mfac_gemv_t(G, b, x, -0.5, 1.5), (G, b, x))
    assert torch.autograd.gradcheck(lambda G, b, x: ops.mfac_gemv_t(G, b, x, -0.5, 1.5), (G, B, X))


def test_kernels_bad_input():
    G = torch.zeros(3, 10)
    with pytest.raises(RuntimeError, match="mfac_gemv: x must have d = 10 columns"):
        ops.mfac_gemv(G, torch.zeros(11))
    with pytest.raises(RuntimeError, match="mfac_gemv: x must be float32"):
        ops.mfac_gemv(G, torch.zeros(10, dtype=F64))
    with pytest.raises(RuntimeError, match="G must be float32, float64 or bfloat16"):
        ops.mfac_gemv(G.half(), torch.zeros(10))
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        ops.mfac_gemv(torch.zeros(10, 3).T, torch.zeros(10))
    with pytest.raises(RuntimeError, match="row 3 is out of range"):
        ops.mfac_insert_gemv_(G, 3, [torch.zeros(10)], [], 0.0)
    with pytest.raises(RuntimeError, match="elements in all, expected d = 10"):
        ops.mfac_insert_gemv_(G, 0, [torch.zeros(4), torch.zeros(5)], [], 0.0)
    with pytest.raises(RuntimeError, match="params must have one tensor per gradient"):
        ops.mfac_insert_gemv_(G, 0, [torch.zeros(10)], [torch.zeros(5), torch.zeros(5)], 0.1)
    with pytest.raises(RuntimeError, match="momentum > 0 needs a momentum_buffer"):
        ops.mfac_step_(G, torch.zeros(3), [torch.zeros(10)], [torch.zeros(10)], None, -1.0, 1.0, 0.1, 0.0, 0.5)
    with pytest.raises(RuntimeError, match="U must be square"):
        ops.mfac_chol_replace_oldest_(torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=F64), 1.0)


def test_fake_kernels_check_like_the_kernels():
    G, F32 = torch.zeros(3, 10), torch.float32
    z10 = torch.zeros(10)
    cases = [
        (ops.mfac_gemv, G, torch.zeros(11)),
        (ops.mfac_gemv, G, torch.zeros(10, dtype=F64)),
        (ops.mfac_gemv, G.half(), z10),
        (ops.mfac_gemv, torch.zeros(10, 3).T, z10),
        (ops.mfac_gemv, torch.zeros(3, 10, 2), z10),
        (ops.mfac_gemv_t, G, torch.zeros(4), None, 1.0, 0.0),
        (ops.mfac_gemv_t, G, torch.zeros(3, dtype=F64), None, 1.0, 0.0),
        (ops.mfac_gemv_t, G, torch.zeros(2, 3), z10, 1.0, 0.0),
        (ops.mfac_insert_gemv_, G, 3, [z10], [], 0.0),
        (ops.mfac_insert_gemv_, G, 0, [torch.zeros(4), torch.zeros(5)], [], 0.0),
        (ops.mfac_insert_gemv_, G, 0, [z10], [torch.zeros(5), torch.zeros(5)], 0.1),
        (ops.mfac_insert_gemv_, G, 0, [z10], [torch.zeros(9)], 0.1),
        (ops.mfac_step_, G, torch.zeros(3), [z10], [z10], None, -1.0, 1.0, 0.1, 0.0, 0.5),
        (ops.mfac_step_, G, torch.zeros(4), [z10], [z10], None, -1.0, 1.0, 0.1, 0.0, 0.0),
        (ops.mfac_step_, G, torch.zeros(3), [z10], [z10], torch.zeros(9), -1.0, 1.0, 0.1, 0.0, 0.5),
        (ops.mfac_step_, G, torch.zeros(3), [z10], [z10], None, -1.0, 1.0, 0.1, 0.0, 1.5),
        (ops.mfac_chol_replace_oldest_, torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=F64), 1.0),
        (ops.mfac_chol_replace_oldest_, torch.zeros(2, 2, dtype=F32), torch.zeros(2, dtype=F64), 1.0),
        (ops.mfac_chol_replace_oldest_, torch.zeros(2, 2, dtype=F64), torch.zeros(3, dtype=F64), 1.0),
        (ops.mfac_chol_solve, torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=F64)),
        (ops.mfac_chol_solve, torch.zeros(2, 2, dtype=F64), torch.zeros(3, dtype=F64)),
        (ops.mfac_chol_solve, torch.zeros(2, 2, dtype=F64), torch.zeros(2, dtype=F32)),
    ]
    for fn, *args in cases:
        same_error_eager_and_fake(fn, *args)


# ---- StaticIHVP / BlockIHVP -----------------------------------------------------------------------

def _dense_check_static(G, damp, gen):
    """StaticIHVP against the dense float64 inverse of F (one O(d^3) inversion per case)."""
    d = G.shape[1]
    Finv = torch.linalg.inv(ref.dense_fisher(G, damp))
    x, X = randn(d, gen=gen), randn(3, d, gen=gen)
    S = mfac.StaticIHVP(G, damp)
    tol = 100 * EPS[F64] * kappa(G, damp)
    assert rel(S.mul(x), Finv @ x) < tol
    assert rel(S.mul(X), X @ Finv) < tol
    D = Finv.diagonal()
    assert ((S.inverse_diagonal() - D).abs().max() / D.abs().max()).item() < tol


@pytest.mark.parametrize("damp", [1e-8, 1e-6, 1e-4, 1e-2, 1e-1])
@pytest.mark.parametrize("m,d", [(1, 50), (31, 400), (32, 300), (33, 257)])
def test_static_dense_oracle(m, d, damp, gen):
    _dense_check_static(randn(m, d, gen=gen, scale=0.3), damp, gen)


def test_static_dense_oracle_d4096(gen):
    _dense_check_static(randn(32, 4096, gen=gen, scale=0.3), 1e-5, gen)


@pytest.mark.parametrize("damp", [1e-6, 1e-3, 1e-1])
def test_static_matches_paper_algorithm(damp, gen):
    G = randn(20, 300, gen=gen)
    x = randn(300, gen=gen)
    V, q = ref.static_factors(G, damp)
    S = mfac.StaticIHVP(G, damp)
    k = kappa(G, damp)
    assert rel(S.mul(x), ref.static_ihvp(V, q, damp, x)) < 100 * EPS[F64] * k
    assert rel(S.inverse_diagonal(), ref.static_inverse_diagonal(V, q, damp)) < 100 * EPS[F64] * k


def test_static_float32(gen):
    G = randn(16, 1500, gen=gen)
    x = randn(1500, gen=gen)
    damp = 1e-3
    S = mfac.StaticIHVP(G.float(), damp)
    k = kappa(G, damp)
    # a random x lies mostly outside the span of the gradients, where F^-1 is x / damp: no cancellation
    # (measured ~0.5 eps); a gradient lies inside it and cancels up to kappa (measured 0.5-1.5 eps kappa)
    assert rel(S.mul(x.float()), ref.dense_ihvp(G, x, damp)) < 30 * EPS[torch.float32]
    assert rel(S.mul(G[3].float()), ref.dense_ihvp(G, G[3], damp)) < 10 * EPS[torch.float32] * k
    assert S.mul(x.float()).dtype == torch.float32


def test_static_symmetry_zero_and_duplicate_gradients(gen):
    g = randn(500, gen=gen)
    G = torch.stack([g, torch.zeros(500, dtype=F64), g, randn(500, gen=gen), g])  # zero + duplicates
    damp = 1e-4
    S = mfac.StaticIHVP(G, damp)
    a, b = randn(500, gen=gen), randn(500, gen=gen)
    k = kappa(G, damp)
    lhs, rhs = a @ S.mul(b), b @ S.mul(a)
    assert abs(lhs - rhs).item() < 100 * EPS[F64] * k * a.norm().item() * b.norm().item() / damp
    assert rel(S.mul(a), ref.dense_ihvp(G, a, damp)) < 100 * EPS[F64] * k
    Z = mfac.StaticIHVP(torch.zeros(4, 30, dtype=F64), 0.5)  # all-zero gradients: F = damp I
    assert torch.allclose(Z.mul(a[:30]), a[:30] / 0.5, rtol=1e-14)
    assert torch.allclose(Z.inverse_diagonal(), torch.full((30,), 2.0, dtype=F64))


def test_static_residual_large_d(gen):
    d, m, damp = 300_000, 8, 1e-3
    G = randn(m, d, gen=gen, scale=1e-2).float()
    x = randn(d, gen=gen).float()
    y = mfac.StaticIHVP(G, damp).mul(x).double()
    Gd = G.double()
    res = (damp * y + Gd.T @ (Gd @ y) / m - x.double()).norm() / x.double().norm()
    assert res.item() < 30 * EPS[torch.float32] * kappa(Gd, damp)


@pytest.mark.parametrize("block_size", [1, 7, 16, 100, 128, 1000])
@pytest.mark.parametrize("damp", [1e-6, 1e-2])
def test_block_dense_oracle(block_size, damp, gen):
    m, d = 16, 300  # blocks <= m: dense block inverses; larger: Woodbury per block; 300 % 7 != 0
    G = randn(m, d, gen=gen)
    x = randn(2, d, gen=gen)
    Bk = mfac.BlockIHVP(G, block_size, damp)
    k = kappa(G, damp)
    assert rel(Bk.mul(x), ref.block_ihvp(G, x, damp, block_size)) < 100 * EPS[F64] * k
    assert rel(Bk.mul(x[0]), ref.block_ihvp(G, x[0], damp, block_size)) < 100 * EPS[F64] * k
    assert rel(Bk.inverse_diagonal(), ref.block_inverse_diagonal(G, damp, block_size)) < 100 * EPS[F64] * k
    if block_size >= d:
        assert rel(Bk.mul(x[0]), mfac.StaticIHVP(G, damp).mul(x[0])) < 100 * EPS[F64] * k


def test_ihvp_autograd(gen):
    G = randn(5, 20, gen=gen)
    x = randn(20, gen=gen).requires_grad_()
    S = mfac.StaticIHVP(G, 0.1)
    assert torch.autograd.gradcheck(S.mul, (x,))
    W = mfac.SlidingWindowIHVP(20, 4, 0.1, F64)
    for i in range(6):
        W.update(randn(20, gen=gen))
    assert torch.autograd.gradcheck(W.mul, (x,))
    Bk = mfac.BlockIHVP(G, 8, 0.1)
    assert torch.autograd.gradcheck(Bk.mul, (x,))


def test_static_block_bad_input():
    with pytest.raises(ValueError, match=r"grads must be 2-D \[m, d\]"):
        mfac.StaticIHVP(torch.zeros(5), 1e-3)
    with pytest.raises(TypeError, match="grads must be float32 or float64"):
        mfac.StaticIHVP(torch.zeros(2, 5, dtype=torch.int64), 1e-3)
    with pytest.raises(TypeError, match="grads must be a torch.Tensor"):
        mfac.StaticIHVP([[1.0, 2.0]], 1e-3)
    with pytest.raises(ValueError, match="damp must be positive"):
        mfac.StaticIHVP(torch.zeros(2, 5), 0.0)
    with pytest.raises(ValueError, match="grads contains inf or NaN"):
        mfac.StaticIHVP(torch.tensor([[1.0, float("nan")]]), 1e-3)
    with pytest.raises(ValueError, match="at least one row"):
        mfac.StaticIHVP(torch.zeros(0, 5), 1e-3)
    with pytest.raises(ValueError, match="grads must be on the CPU or a CUDA device, got meta"):
        mfac.StaticIHVP(torch.zeros(2, 5, device="meta"), 1e-3)
    S = mfac.StaticIHVP(torch.ones(2, 5), 1e-3)
    with pytest.raises(ValueError, match=r"x must have shape \[5\] or \[k, 5\], got \(6,\)"):
        S.mul(torch.zeros(6))
    with pytest.raises(TypeError, match="x must be torch.float32, got torch.float64"):
        S.mul(torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match="x is on meta, expected cpu"):
        S.mul(torch.zeros(5, device="meta"))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        mfac.BlockIHVP(torch.ones(2, 5), 0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        mfac.BlockIHVP(torch.ones(2, 5), 2.5)


# ---- SlidingWindowIHVP ----------------------------------------------------------------------------

def _run_window(W, m, d, steps, damp, gen, warmup, check_every=1, dtype=F64, scale=1.0, pool=None):
    """Feeds `steps` gradients; checks update_mul and mul against the dense solve over a deque."""
    dq = collections.deque(maxlen=m)
    worst = 0.0
    for step in range(steps):
        if pool is not None and step % 3 == 2:
            g = pool[step % len(pool)].clone()  # repeated gradients
        elif step % 7 == 5:
            g = torch.zeros(d, dtype=F64)  # zero gradients
        else:
            g = randn(d, gen=gen, scale=scale)
        dq.append(g)
        y = W.update_mul(g.to(dtype))
        if step % check_every and step != steps - 1:
            continue
        Gd = torch.stack(list(dq))
        s = len(dq) if warmup == "scaled" else m
        if warmup == "zeros" and len(dq) < m:
            Gd = torch.cat([Gd, torch.zeros(m - len(dq), d, dtype=F64)])
        x = randn(d, gen=gen)
        k = kappa(Gd, damp, s)
        e1 = rel(y, ref.dense_ihvp(Gd, g, damp, scale=s)) if g.norm() > 0 else y.abs().max().item()
        e2 = rel(W.mul(x.to(dtype)), ref.dense_ihvp(Gd, x, damp, scale=s))
        worst = max(worst, e1 / k, e2 / k)
    return worst


@pytest.mark.parametrize("warmup", ["scaled", "zeros"])
@pytest.mark.parametrize("m", [1, 2, 31, 32, 33])
def test_window_against_deque(m, warmup, gen):
    d, damp = 64, 1e-3
    W = mfac.SlidingWindowIHVP(d, m, damp, F64, warmup=warmup, refactor_every=16)
    assert _run_window(W, m, d, 2 * m + 7, damp, gen, warmup) < 100 * EPS[F64]


@pytest.mark.slow
@pytest.mark.parametrize("m,warmup,steps", [(1024, "zeros", 2 * 1024 + 3), (1025, "scaled", 300)])
def test_window_large_m(m, warmup, steps, gen):
    # d < m: K = s damp I + G G^T is rank-deficient apart from the shift. The zeros mode runs > 2m steps
    # of O(m^2) updates; the scaled warm-up refactors its n x n K (O(n^3)) at each of its first m steps,
    # so it runs part of its warm-up here (the small-m tests cover > 2m steps in both modes).
    d, damp = 24, 1e-2
    W = mfac.SlidingWindowIHVP(d, m, damp, F64, warmup=warmup)
    assert _run_window(W, m, d, steps, damp, gen, warmup, check_every=97) < 100 * EPS[F64]


@pytest.mark.parametrize("damp", [1e-8, 1e-6, 1e-4, 1e-2, 1e-1])
def test_window_damping_sweep(damp, gen):
    d, m = 200, 9
    W = mfac.SlidingWindowIHVP(d, m, damp, F64, refactor_every=1000)
    pool = [randn(d, gen=gen, scale=0.1) for _ in range(3)]
    assert _run_window(W, m, d, 3 * m, damp, gen, "scaled", scale=0.1, pool=pool) < 100 * EPS[F64]


@pytest.mark.parametrize("warmup", ["scaled", "zeros"])
def test_window_matches_official_algorithm(warmup, gen):
    d, m, damp = 100, 6, 1e-3
    W = mfac.SlidingWindowIHVP(d, m, damp, F64, warmup=warmup)
    off = ref.OfficialDynamic(m, d, damp, F64)
    for step in range(2 * m + 5):
        g = randn(d, gen=gen)
        y = W.update_mul(g)
        y_off = off.update_mul(g)
        if warmup == "zeros" or step >= m - 1:  # the same operator once the scaled window is full
            assert rel(y, y_off) < 1e-10
    x = randn(d, gen=gen)
    assert rel(W.mul(x), off.mul(x)) < 1e-10


def test_window_float32_and_symmetry(gen):
    d, m, damp = 3000, 12, 1e-3
    W = mfac.SlidingWindowIHVP(d, m, damp)
    dq = collections.deque(maxlen=m)
    for step in range(2 * m + 2):
        g = randn(d, gen=gen)
        dq.append(g)
        y = W.update_mul(g.float())
        assert y.dtype == torch.float32
    Gd = torch.stack(list(dq))
    k = kappa(Gd, damp)
    assert rel(y, ref.dense_ihvp(Gd, g, damp)) < 5 * EPS[torch.float32] * k  # measured <= 0.53 eps kappa
    a, b = randn(d, gen=gen).float(), randn(d, gen=gen).float()
    lhs, rhs = (a.double() @ W.mul(b).double()).item(), (b.double() @ W.mul(a).double()).item()
    # measured <= 0.013 eps |a| |b| / damp (the values themselves are ~0.03 |a| |b| / damp)
    assert abs(lhs - rhs) < EPS[torch.float32] * a.norm().item() * b.norm().item() / damp


def test_window_bfloat16_storage(gen):
    d, m, damp = 5000, 8, 1e-2
    W = mfac.SlidingWindowIHVP(d, m, damp, storage_dtype=torch.bfloat16)
    dq = collections.deque(maxlen=m)
    for step in range(2 * m + 1):
        g = randn(d, gen=gen).float()
        y = W.update_mul(g)
        assert torch.equal(W.G[step % m], g.bfloat16())  # the window holds g.bfloat16()
        dq.append(g.bfloat16().double())
    Gd = torch.stack(list(dq))  # F over the stored gradients; update_mul applies it to the stored g
    k = kappa(Gd, damp)
    assert rel(y, ref.woodbury_ihvp(Gd, g.bfloat16().double(), damp)) < 5 * EPS[torch.float32] * k
    x = randn(d, gen=gen).float()  # mostly outside the window's span: no cancellation (see test_static_float32)
    assert rel(W.mul(x), ref.woodbury_ihvp(Gd, x.double(), damp)) < 30 * EPS[torch.float32]


def test_window_residual_large_d(gen):
    d, m, damp = 400_000, 6, 1e-4
    W = mfac.SlidingWindowIHVP(d, m, damp)
    for _ in range(m + 2):
        W.update(randn(d, gen=gen, scale=3e-3).float())
    x = randn(d, gen=gen).float()
    y = W.mul(x).double()
    Gd = W.G.double()
    res = (damp * y + Gd.T @ (Gd @ y) / m - x.double()).norm() / x.double().norm()
    assert res.item() < 30 * EPS[torch.float32] * kappa(Gd, damp)


def test_window_incremental_factor_tracks_refactor(gen):
    d, m, damp = 40, 16, 1e-5
    W = mfac.SlidingWindowIHVP(d, m, damp, F64, refactor_every=0)
    for _ in range(10 * m):
        W.update(randn(d, gen=gen))
    assert W.since_refactor == 9 * m  # no refactor was needed along the way
    U = W.U.clone()
    W._refactor()
    K = W.U.T @ W.U
    assert ((U.T @ U - K).abs().max() / K.abs().max()).item() < 1e-12


def test_window_empty_and_batched_mul(gen):
    W = mfac.SlidingWindowIHVP(30, 4, 0.5, F64)
    x = randn(2, 30, gen=gen)
    assert torch.allclose(W.mul(x), x / 0.5)
    dq = []
    for _ in range(3):
        g = randn(30, gen=gen)
        dq.append(g)
        W.update(g)
    assert rel(W.mul(x), ref.dense_ihvp(torch.stack(dq), x, 0.5)) < 1e-12


def test_window_state_dict_round_trip(gen):
    W = mfac.SlidingWindowIHVP(50, 5, 1e-3, F64)
    for _ in range(7):
        W.update(randn(50, gen=gen))
    sd = copy.deepcopy(W.state_dict())
    W2 = mfac.SlidingWindowIHVP(50, 5, 1e-3, F64)
    W2.load_state_dict(sd)
    g = randn(50, gen=gen)
    assert torch.equal(W.update_mul(g), W2.update_mul(g))
    with pytest.raises(ValueError, match="state_dict has m=5, this window has 6"):
        mfac.SlidingWindowIHVP(50, 6, 1e-3, F64).load_state_dict(sd)
    with pytest.raises(ValueError, match="state_dict has damp=0.001, this window has 0.01"):
        mfac.SlidingWindowIHVP(50, 5, 1e-2, F64).load_state_dict(sd)


def test_window_bad_input():
    with pytest.raises(ValueError, match="m must be >= 1"):
        mfac.SlidingWindowIHVP(10, 0)
    with pytest.raises(TypeError, match="dim must be an int"):
        mfac.SlidingWindowIHVP(10.0, 3)
    with pytest.raises(TypeError, match="storage_dtype must be float32, float64 or bfloat16"):
        mfac.SlidingWindowIHVP(10, 3, storage_dtype=torch.float16)
    with pytest.raises(TypeError, match="storage_dtype torch.bfloat16 needs dtype torch.float32"):
        mfac.SlidingWindowIHVP(10, 3, dtype=F64, storage_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        mfac.SlidingWindowIHVP(10, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="warmup must be 'scaled' or 'zeros'"):
        mfac.SlidingWindowIHVP(10, 3, warmup="ones")
    with pytest.raises(ValueError, match="damp must be positive"):
        mfac.SlidingWindowIHVP(10, 3, damp=-1.0)
    W = mfac.SlidingWindowIHVP(10, 3)
    with pytest.raises(ValueError, match=r"g must have shape \[10\]"):
        W.update(torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"g must have shape \[10\] or \[k, 10\], got \(9,\)"):
        W.update_mul(torch.zeros(9))
    with pytest.raises(TypeError, match="g must be torch.float32, got torch.float64"):
        W.update(torch.zeros(10, dtype=F64))
    with pytest.raises(ValueError, match="SlidingWindowIHVP must be on the CPU or a CUDA device, got meta"):
        mfac.SlidingWindowIHVP(10, 3, device="meta")


def _window_state(W):
    return [t.clone() for t in (W.G, W.gram, W.U)] + [W.count, W.since_refactor]


def _same_state(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


BAD_VALUES = [math.nan, math.inf, -math.inf, 3e20]  # 3e20: finite, but its square overflows float32


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("warmup", ["scaled", "zeros"])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_window_bad_gradient_changes_nothing(m, warmup, storage, gen):
    """A NaN, inf or float32-overflowing gradient raises before the window changes (first step included);
    a loop that skips it goes on exactly as if it had never been passed. It used to be written into G
    (and the Gram matrix), poisoning the next m - 1 steps, or, at the first step or with m = 1, to return
    NaN silently."""
    dim = 50
    good = [randn(dim, gen=gen).float() for _ in range(2 * m + 3)]
    W = mfac.SlidingWindowIHVP(dim, m, 1e-3, storage_dtype=storage, warmup=warmup)
    clean = mfac.SlidingWindowIHVP(dim, m, 1e-3, storage_dtype=storage, warmup=warmup)
    for step, g in enumerate(good):
        for value in BAD_VALUES if step in (0, m + 1) else []:
            bad = g.clone()
            bad[7] = value
            before = _window_state(W)
            for call in (W.update, W.update_mul):
                with pytest.raises(ValueError, match="non-finite entry|too large for the float32"):
                    call(bad)
                assert _same_state(_window_state(W), before)
        assert torch.equal(W.update_mul(g), clean.update_mul(g))
    assert _same_state(_window_state(W), _window_state(clean))


def test_window_bad_gradient_messages(gen):
    W = mfac.SlidingWindowIHVP(6, 2)
    g = torch.ones(6)
    g[3] = math.inf
    with pytest.raises(ValueError, match=r"g has a non-finite entry \(inf at flat index 3\): nothing was changed"):
        W.update(g)
    g[3] = 1e18
    with pytest.raises(ValueError, match=r"magnitude 1e\+18 .* too large for the float32 accumulation .* use float64"):
        W.update(g)
    W64 = mfac.SlidingWindowIHVP(6, 2, dtype=F64)
    W64.update(g.double())  # float64 accumulates it without overflow
    assert torch.isfinite(W64.update_mul(torch.ones(6, dtype=F64))).all()


def test_window_interrupted_insert_restores_everything(gen, monkeypatch):
    """Whatever raises inside an insertion after G has changed (a factor that is not positive definite, an
    interrupt) restores the window to its state before the call."""
    W = mfac.SlidingWindowIHVP(30, 3, 1e-3, F64)
    for _ in range(5):
        W.update(randn(30, gen=gen))
    before = _window_state(W)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mfac.SlidingWindowIHVP, "_solve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        W.update_mul(randn(30, gen=gen))
    assert _same_state(_window_state(W), before)
    monkeypatch.undo()
    monkeypatch.setattr(mfac, "_cholesky_upper", lambda K, what: (_ for _ in ()).throw(RuntimeError("not PD")))
    W.refactor_every = 1  # the next update refactors
    with pytest.raises(RuntimeError, match="not PD"):
        W.update(randn(30, gen=gen))
    assert _same_state(_window_state(W), before)


def test_window_load_state_dict_checks_everything_first(gen):
    W = mfac.SlidingWindowIHVP(20, 3, 1e-3, F64)
    for _ in range(4):
        W.update(randn(20, gen=gen))
    good = copy.deepcopy(W.state_dict())
    target = mfac.SlidingWindowIHVP(20, 3, 1e-3, F64)
    target.update(randn(20, gen=gen))
    before = _window_state(target)
    cases = {
        "gram": (torch.zeros(3, 4, dtype=F64), r"state_dict\['gram'\] must be a torch.float64 tensor of shape \(3, 3\)"),
        "U": (torch.full((3, 3), math.nan, dtype=F64), r"state_dict\['U'\] has NaN or inf"),
        "G": (torch.zeros(3, 20), r"state_dict\['G'\] must be a torch.float64 tensor"),
        "count": (-5, r"state_dict\['count'\] must be an int >= 0, got -5"),
        "since_refactor": (1.5, r"state_dict\['since_refactor'\] must be an int >= 0"),
    }
    for key, (value, match) in cases.items():
        bad = copy.deepcopy(good)
        bad[key] = value
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
        assert _same_state(_window_state(target), before), key
    bad = copy.deepcopy(good)
    del bad["U"]
    with pytest.raises(ValueError, match=r"state_dict lacks \['U'\]"):
        target.load_state_dict(bad)
    target.load_state_dict(good)
    assert _same_state(_window_state(target), _window_state(W))


# ---- optim.MFAC -----------------------------------------------------------------------------------

def _params(gen, dtype=F64):
    shapes = [(5, 7), (7,), (3, 2, 4), (1,)]
    return [randn(*s, gen=gen).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.01)])
def test_optimizer_matches_official_step(momentum, weight_decay, gen):
    params = _params(gen)
    flat = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    m, damp, lr = 4, 1e-3, 0.1
    opt = MFAC(params, lr=lr, ngrads=m, damp=damp, momentum=momentum, weight_decay=weight_decay, warmup="zeros")
    off = ref.OfficialDynamic(m, flat.numel(), damp, F64)
    state = {}
    for step in range(3 * m):
        grads = [randn(*p.shape, gen=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.official_mfac_step(off, flat, torch.cat([g.reshape(-1) for g in grads]), state, lr, momentum,
                               weight_decay)
        ours = torch.cat([p.detach().reshape(-1) for p in params])
        assert torch.allclose(ours, flat, rtol=1e-9, atol=1e-12), step


def test_optimizer_default_is_the_official_algorithm(gen):
    """Without a warmup argument MFAC is the paper's algorithm (a zero-filled window of ngrads gradients,
    s = ngrads from the first step), step by step while the window fills and after. The scaled warm-up
    differs while the window fills, so this fails with it."""
    params = _params(gen)
    flat = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    m, damp, lr, momentum = 6, 1e-2, 0.05, 0.5
    opt = MFAC(params, lr=lr, ngrads=m, damp=damp, momentum=momentum)
    off = ref.OfficialDynamic(m, flat.numel(), damp, F64)
    state = {}
    for step in range(m + 3):
        grads = [randn(*p.shape, gen=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.official_mfac_step(off, flat, torch.cat([g.reshape(-1) for g in grads]), state, lr, momentum)
        ours = torch.cat([p.detach().reshape(-1) for p in params])
        assert torch.allclose(ours, flat, rtol=1e-9, atol=1e-12), step


def test_optimizer_param_groups_and_none_grads(gen):
    a, b = randn(6, gen=gen).requires_grad_(), randn(4, gen=gen).requires_grad_()
    c = randn(3, gen=gen).requires_grad_()  # never gets a gradient: counts as zeros
    m, damp = 3, 1e-2
    opt = MFAC([{"params": [a], "lr": 0.5}, {"params": [b, c], "lr": 0.1}], ngrads=m, damp=damp)
    W = mfac.SlidingWindowIHVP(13, m, damp, F64, warmup="zeros")  # MFAC's default
    for step in range(5):
        ga, gb = randn(6, gen=gen), randn(4, gen=gen)
        a.grad, b.grad = ga.clone(), gb.clone()
        before = torch.cat([a.detach(), b.detach(), c.detach()]).clone()
        opt.step()
        y = W.update_mul(torch.cat([ga, gb, torch.zeros(3, dtype=F64)]))
        after = torch.cat([a.detach(), b.detach(), c.detach()])
        lr = torch.tensor([0.5] * 6 + [0.1] * 7, dtype=F64)
        assert torch.allclose(after, before - lr * y, rtol=1e-12, atol=1e-12)


def test_optimizer_trains_a_model(gen):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    X = torch.randn(256, 8, generator=gen)
    y = X @ torch.randn(8, 1, generator=gen) * 0.5
    opt = MFAC(model.parameters(), lr=1e-2, ngrads=16, damp=1e-4, momentum=0.5)
    loss0 = torch.nn.functional.mse_loss(model(X), y).item()
    for step in range(60):
        idx = torch.randint(0, 256, (32,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
    final = torch.nn.functional.mse_loss(model(X), y).item()
    assert final < 0.2 * loss0


@pytest.mark.parametrize("storage", [None, torch.bfloat16])
def test_optimizer_state_dict_round_trip(storage, gen):
    def make(ps):
        return MFAC(ps, lr=0.05, ngrads=4, damp=1e-3, momentum=0.8, weight_decay=1e-3, storage_dtype=storage)

    dtype = torch.float32
    p1 = _params(gen, dtype)
    opt1 = make(p1)
    grads = [[randn(*p.shape, gen=gen).to(dtype) for p in p1] for _ in range(12)]
    for gs in grads[:6]:
        for p, g in zip(p1, gs):
            p.grad = g.clone()
        opt1.step()
    saved = copy.deepcopy(opt1.state_dict())
    path = os.path.join(tempfile.mkdtemp(), "opt.pt")
    torch.save(saved, path)
    p2 = [p.detach().clone().requires_grad_() for p in p1]
    opt2 = make(p2)
    opt2.load_state_dict(torch.load(path))
    for gs in grads[6:]:
        for p, q, g in zip(p1, p2, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt1.step()
        opt2.step()
    for p, q in zip(p1, p2):
        assert torch.equal(p, q)
    opt3 = MFAC(_params(gen, dtype), ngrads=5)
    with pytest.raises(ValueError, match="state_dict has m=4, this window has 5"):
        opt3.load_state_dict(copy.deepcopy(saved))


def test_optimizer_bfloat16_storage_close_to_float32(gen):
    p32 = _params(gen, torch.float32)
    p16 = [p.detach().clone().requires_grad_() for p in p32]
    p_init = [p.detach().clone() for p in p32]
    o32 = MFAC(p32, lr=0.01, ngrads=4, damp=1e-2)
    o16 = MFAC(p16, lr=0.01, ngrads=4, damp=1e-2, storage_dtype=torch.bfloat16)
    for _ in range(6):
        gs = [randn(*p.shape, gen=gen).float() for p in p32]
        for p, q, g in zip(p32, p16, gs):
            p.grad, q.grad = g.clone(), g.clone()
        o32.step()
        o16.step()
    moved32 = torch.cat([(p - q0).reshape(-1) for p, q0 in zip(p32, p_init)])
    moved16 = torch.cat([(q - q0).reshape(-1) for q, q0 in zip(p16, p_init)])
    assert rel(moved16, moved32) < 2e-2  # bfloat16 keeps ~3 significant digits of each gradient


def test_optimizer_bad_input(gen):
    p = randn(5, gen=gen).float().requires_grad_()
    with pytest.raises(ValueError, match="lr must be a float >= 0"):
        MFAC([p], lr=-1.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        MFAC([p], momentum=1.0)
    with pytest.raises(TypeError, match="all parameters must be float32, or all float64"):
        MFAC([p, randn(3, gen=gen).requires_grad_()])
    with pytest.raises(ValueError, match="is not contiguous"):
        MFAC([randn(4, 3, gen=gen).float().T.requires_grad_()])
    with pytest.raises(ValueError, match="parameters must be on the CPU or a CUDA device, got meta"):
        MFAC([torch.zeros(3, device="meta", requires_grad=True)])
    opt = MFAC([p], ngrads=2)
    p.grad = randn(5, gen=gen).float()
    opt.param_groups[0]["momentum"] = 1.5
    with pytest.raises(ValueError, match=r"param_groups\[0\]: momentum must be in \[0, 1\)"):
        opt.step()
    assert opt._window.count == 0  # checked before the window changed
    opt.param_groups[0]["momentum"] = 0.0
    with pytest.raises(RuntimeError, match="cannot be added after construction"):
        opt.add_param_group({"params": [randn(2, gen=gen).float().requires_grad_()]})
    with pytest.raises(ValueError, match="holds no M-FAC window"):
        sd = opt.state_dict()
        del sd["state"]["mfac"]
        opt.load_state_dict(sd)


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.01)])
def test_optimizer_skips_a_bad_step_like_amp(momentum, weight_decay, gen):
    """An AMP-style loop: a step whose gradient has inf or NaN raises before anything changes (window,
    factor, count, momentum, parameters); the loop skips it and the run continues bit for bit as one that
    never saw that step. It used to poison the window for the next ngrads - 1 steps."""
    def make(ps):
        return MFAC(ps, lr=0.05, ngrads=4, damp=1e-3, momentum=momentum, weight_decay=weight_decay)

    p1 = _params(gen, torch.float32)
    p2 = [p.detach().clone().requires_grad_() for p in p1]
    o1, o2 = make(p1), make(p2)
    for step in range(10):
        gs = [randn(*p.shape, gen=gen).float() for p in p1]
        if step in (0, 3, 7):  # the first step too
            bad = [g.clone() for g in gs]
            bad[step % 4].view(-1)[0] = math.inf if step != 3 else math.nan
            for p, g in zip(p1, bad):
                p.grad = g
            params_before = [p.detach().clone() for p in p1]
            window_before = _window_state(o1._window)
            with pytest.raises(ValueError, match=rf"MFAC: the gradient of param_groups\[0\]\['params'\]\[{step % 4}\] "
                                                 r"has a non-finite entry .*nothing was changed"):
                o1.step()
            assert all(torch.equal(p, q) for p, q in zip(p1, params_before))
            assert _same_state(_window_state(o1._window), window_before)
        for p, q, g in zip(p1, p2, gs):
            p.grad, q.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert all(torch.equal(p, q) for p, q in zip(p1, p2))
    if momentum:
        assert torch.equal(o1._momentum_buffer, o2._momentum_buffer)
    # a non-finite parameter with weight decay: the inserted g + wd p would not be finite
    if weight_decay:
        with torch.no_grad():
            p1[2].view(-1)[1] = math.nan
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\] \(added to its gradient"):
            o1.step()


def test_optimizer_load_state_dict_checks_everything_first(gen):
    """A state_dict whose window does not fit raises before lr, momentum or the window change; step() then
    runs as before. It used to replace lr and momentum first."""
    p = _params(gen, torch.float32)
    opt = MFAC(p, lr=0.05, ngrads=4, damp=1e-3, momentum=0.5)
    for _ in range(3):
        for q in p:
            q.grad = randn(*q.shape, gen=gen).float()
        opt.step()
    other = MFAC([q.detach().clone().requires_grad_() for q in p], lr=0.9, ngrads=5, damp=1e-3, momentum=0.1)
    sd = copy.deepcopy(other.state_dict())
    before = (copy.deepcopy(opt.param_groups[0]["lr"]), opt.param_groups[0]["momentum"], _window_state(opt._window))
    with pytest.raises(ValueError, match="MFAC.load_state_dict: state_dict has m=5, this window has 4"):
        opt.load_state_dict(sd)
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]) == before[:2]
    assert _same_state(_window_state(opt._window), before[2])
    good = copy.deepcopy(opt.state_dict())
    for key, value, match in [("lr", -1.0, "lr must be a float >= 0"), ("momentum", 1.0, r"momentum must be in \[0, 1\)")]:
        bad = copy.deepcopy(good)
        bad["param_groups"][0][key] = value
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        assert (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]) == before[:2]
    bad = copy.deepcopy(good)
    bad["state"]["mfac"]["momentum_buffer"] = torch.full_like(opt._momentum_buffer, math.inf)
    with pytest.raises(ValueError, match="momentum_buffer has NaN or inf"):
        opt.load_state_dict(bad)
    for q in p:
        q.grad = randn(*q.shape, gen=gen).float()
    opt.step()
    assert all(torch.isfinite(q).all() for q in p)


# ---- every device (the same checks run on CUDA on the GPU machine) --------------------------------

@pytest.mark.parametrize("storage", [torch.float32, torch.float64, torch.bfloat16])
def test_device_passes(device, storage, gen):
    A = torch.float64 if storage == torch.float64 else torch.float32
    tol = 1e-12 if storage == torch.float64 else 1e-5
    m, d = 37, 5000
    G = randn(m, d, gen=gen).to(storage).to(device)
    x, X = randn(d, gen=gen).to(A).to(device), randn(2, d, gen=gen).to(A).to(device)
    b, B = randn(m, gen=gen).to(A).to(device), randn(2, m, gen=gen).to(A).to(device)
    Gd = G.double()
    assert rel(ops.mfac_gemv(G, x), Gd @ x.double()) < tol
    assert rel(ops.mfac_gemv(G, X), X.double() @ Gd.T) < tol
    assert rel(ops.mfac_gemv_t(G, b, x, -0.5, 2.0), 2.0 * x.double() - 0.5 * Gd.T @ b.double()) < tol
    assert rel(ops.mfac_gemv_t(G, B, None, 1.0, 0.0), B.double() @ Gd) < tol
    g, p = randn(d, gen=gen).to(A).to(device), randn(d, gen=gen).to(A).to(device)
    t = ops.mfac_insert_gemv_(G, 5, [g[:1000], g[1000:]], [p[:1000], p[1000:]], 0.1)
    assert torch.equal(G[5], (g + 0.1 * p).to(storage))
    Gd = G.double()
    assert rel(t, Gd @ Gd[5]) < tol
    p0, v = p.clone(), torch.zeros(d, dtype=A, device=device)
    ops.mfac_step_(G, b, [p[:1000], p[1000:]], [g[:1000], g[1000:]], v, -0.5, 2.0, 0.1, 0.01, 0.9)
    xs = (g + 0.01 * p0).to(storage).double()
    assert rel(p, p0.double() - 0.1 * 0.1 * (2.0 * xs - 0.5 * Gd.T @ b.double())) < tol


@pytest.mark.parametrize("n", [1, 40, 300])  # 300 > the CUDA kernel's 256 threads: strided columns
def test_device_chol_replace_oldest(device, n, gen):
    shift = 0.5
    rows = randn(n + 1, 9, gen=gen)
    old = rows[:n] @ rows[:n].T + shift * torch.eye(n, dtype=F64)
    U = torch.linalg.cholesky(old, upper=True).contiguous().to(device)
    k = (rows[1:] @ rows[n]).to(device)
    piv = ops.mfac_chol_replace_oldest_(U, k, shift)
    K = rows[1:] @ rows[1:].T + shift * torch.eye(n, dtype=F64)
    assert torch.allclose(U.cpu().T @ U.cpu(), K, atol=1e-11 * K.abs().max().item())
    assert piv.item() >= shift * (1 - 1e-9)


@pytest.mark.parametrize("warmup", ["scaled", "zeros"])
@pytest.mark.parametrize("storage", [torch.float64, torch.float32, torch.bfloat16])
def test_device_window_against_deque(device, warmup, storage, gen):
    d, m, damp = 300, 5, 1e-2
    dtype = torch.float64 if storage == torch.float64 else torch.float32
    W = mfac.SlidingWindowIHVP(d, m, damp, dtype, device, storage, warmup=warmup, refactor_every=4)
    dq = collections.deque(maxlen=m)
    tol = 100 * EPS[F64] if storage == torch.float64 else 30 * EPS[torch.float32]
    for step in range(2 * m + 3):
        g = randn(d, gen=gen)
        dq.append(g.to(storage).double())
        y = W.update_mul(g.to(dtype).to(device))
        assert y.device.type == torch.device(device).type
        Gd = torch.stack(list(dq))
        s = len(dq) if warmup == "scaled" else m
        if warmup == "zeros" and len(dq) < m:
            Gd = torch.cat([Gd, torch.zeros(m - len(dq), d, dtype=F64)])
        x = randn(d, gen=gen)
        k = kappa(Gd, damp, s)
        assert rel(y.cpu(), ref.dense_ihvp(Gd, dq[-1], damp, scale=s)) < tol * k
        assert rel(W.mul(x.to(dtype).to(device)).cpu(), ref.dense_ihvp(Gd, x, damp, scale=s)) < tol * k


def test_device_optimizer_matches_cpu(device, gen):
    shapes = [(6, 5), (5,), (3, 3)]
    init = [randn(*s_, gen=gen) for s_ in shapes]
    p_cpu = [t.clone().requires_grad_() for t in init]
    p_dev = [t.clone().to(device).requires_grad_() for t in init]
    kw = dict(lr=0.05, ngrads=3, damp=1e-2, momentum=0.5, weight_decay=0.01)
    o_cpu, o_dev = MFAC(p_cpu, **kw), MFAC(p_dev, **kw)
    for _ in range(5):
        for p, q in zip(p_cpu, p_dev):
            grad = randn(*p.shape, gen=gen)
            p.grad, q.grad = grad.clone(), grad.clone().to(device)
        o_cpu.step()
        o_dev.step()
    for p, q in zip(p_cpu, p_dev):
        assert torch.allclose(p, q.cpu(), rtol=1e-10, atol=1e-12)


def test_device_static_and_opcheck(device, gen):
    G = randn(6, 700, gen=gen)
    x = randn(700, gen=gen)
    S = mfac.StaticIHVP(G.to(device), 1e-3)
    assert rel(S.mul(x.to(device)).cpu(), ref.dense_ihvp(G, x, 1e-3)) < 100 * EPS[F64] * kappa(G, 1e-3)
    Gf, xf = G.float().to(device), x.float().to(device)
    torch.library.opcheck(ops.mfac_gemv.default, (Gf, xf))
    torch.library.opcheck(ops.mfac_gemv_t.default, (Gf, Gf[:, 0].contiguous(), xf, -1.0, 1.0))
    torch.library.opcheck(ops.mfac_insert_gemv_.default, (Gf.clone(), 1, [xf], [], 0.0))


# ---- torch.distributed (gloo, several CPU processes) -----------------------------------------------

def _distributed_worker(rank, world, init_file, seed):
    import torch.distributed as dist

    # a short timeout: a failed rank must fail the test, not hang CI for gloo's default 30 minutes
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(seed)
        d, m, damp = 103, 5, 1e-3
        bounds = [d * q // world for q in range(world + 1)]
        lo, hi = bounds[rank], bounds[rank + 1]
        full = mfac.SlidingWindowIHVP(d, m, damp, F64)
        shard = mfac.SlidingWindowIHVP(hi - lo, m, damp, F64, process_group=dist.group.WORLD)
        for step in range(2 * m + 3):
            x = torch.randn(d, generator=g, dtype=F64)
            y_full = full.update_mul(x)
            y_shard = shard.update_mul(x[lo:hi].contiguous())
            assert torch.allclose(y_shard, y_full[lo:hi], rtol=1e-10, atol=1e-10), (rank, step)
        z = torch.randn(d, generator=g, dtype=F64)
        assert torch.allclose(shard.mul(z[lo:hi].contiguous()), full.mul(z)[lo:hi], rtol=1e-10, atol=1e-10)
        # the optimizer: every rank holds the whole model and the same gradients, and updates its share
        shapes = [(7, 3), (10,), (2, 2, 2)]
        p_ref = [torch.randn(*s, generator=g, dtype=F64).requires_grad_() for s in shapes]
        p_dist = [p.detach().clone().requires_grad_() for p in p_ref]
        kw = dict(lr=0.1, ngrads=3, damp=1e-3, momentum=0.5, weight_decay=0.01)
        o_ref, o_dist = MFAC(p_ref, **kw), MFAC(p_dist, process_group=dist.group.WORLD, **kw)
        for step in range(7):
            for p, q in zip(p_ref, p_dist):
                grad = torch.randn(p.shape, generator=g, dtype=F64)
                p.grad, q.grad = grad.clone(), grad.clone()
            o_ref.step()
            o_dist.step()
        for p, q in zip(p_ref, p_dist):
            assert torch.allclose(p, q, rtol=1e-10, atol=1e-12), rank
        # every rank has left its last collective before any rank tears gloo down (a rank that
        # exited early once made another abort in its teardown, on the loaded 2-core CI machine)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_gloo_matches_single_process(world):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    init_file = os.path.join(tempfile.mkdtemp(), "init")
    mp.spawn(_distributed_worker, args=(world, init_file, 1234 + world), nprocs=world, join=True)


# ---- torch.compile ---------------------------------------------------------------------------------

# The public entry points the compile tests below cover (the lead's test checks the union over families).
COMPILE_ENTRY_POINTS = (
    "lossforge.mfac.StaticIHVP.mul",
    "lossforge.mfac.StaticIHVP.inverse_diagonal",
    "lossforge.mfac.BlockIHVP.mul",
    "lossforge.mfac.BlockIHVP.inverse_diagonal",
    "lossforge.mfac.SlidingWindowIHVP.mul",
    "lossforge.mfac.SlidingWindowIHVP.update",
    "lossforge.mfac.SlidingWindowIHVP.update_mul",
    "lossforge.optim.MFAC.step",
)


@pytest.mark.slow
def test_compile_fullgraph_ihvp(gen):
    """The IHVPs of a fixed set of gradients and of a window trace as one graph each, values and
    gradients as in eager."""
    G = randn(5, 12, gen=gen)
    x = randn(12, gen=gen).requires_grad_()
    W = mfac.SlidingWindowIHVP(12, 3, 1e-2, F64)
    for g in G[:4]:
        W.update(g)
    for H in (mfac.StaticIHVP(G, 1e-2), mfac.BlockIHVP(G, 4, 1e-2), mfac.BlockIHVP(G, 8, 1e-2), W):
        y = compiled(H.mul, fullgraph=True)(x)
        expected = H.mul(x)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0],
                                   rtol=1e-12, atol=0)
        if not isinstance(H, mfac.SlidingWindowIHVP):
            torch.testing.assert_close(compiled(H.inverse_diagonal, fullgraph=True)(), H.inverse_diagonal(),
                                       rtol=1e-12, atol=0)


def test_compile_window_insertions_with_graph_breaks(gen):
    """update / update_mul make host decisions by design (may g enter the window? must the factor be
    refactored?): they compile with graph breaks and give eager's results while the window fills and
    after, and a NaN gradient still raises without changing the window."""
    m, d = 2, 10
    kw = dict(dtype=F64, refactor_every=2)
    W, W_ref = mfac.SlidingWindowIHVP(d, m, 1e-2, **kw), mfac.SlidingWindowIHVP(d, m, 1e-2, **kw)
    update_mul, update = compiled(W.update_mul, False), torch.compile(W.update, backend="aot_eager")
    for step in range(2 * m + 1):
        g = randn(d, gen=gen)
        if step % 2:
            update(g)
            W_ref.update(g)
        else:
            torch.testing.assert_close(update_mul(g), W_ref.update_mul(g), rtol=1e-12, atol=0)
        assert W.count == W_ref.count and torch.equal(W.G, W_ref.G) and torch.equal(W.U, W_ref.U)
    bad = randn(d, gen=gen)
    bad[3] = math.nan
    with pytest.raises(ValueError, match="non-finite entry"):
        update_mul(bad)
    assert W.count == W_ref.count and torch.equal(W.G, W_ref.G)


@pytest.mark.slow
def test_compile_optimizer_step_with_graph_breaks(gen):
    """MFAC.step (host decisions as in update_mul) compiles with graph breaks and takes eager's steps."""
    params = _params(gen)
    twins = [p.detach().clone().requires_grad_() for p in params]
    kw = dict(lr=0.1, ngrads=2, damp=1e-2, momentum=0.5, weight_decay=0.01)
    opt, opt_ref = MFAC(params, **kw), MFAC(twins, **kw)
    step = compiled(opt.step, False)
    for _ in range(4):
        for p, q in zip(params, twins):
            p.grad = randn(*p.shape, gen=gen)
            q.grad = p.grad.clone()
        step()
        opt_ref.step()
        for p, q in zip(params, twins):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
