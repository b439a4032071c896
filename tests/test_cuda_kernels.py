"""Every CUDA kernel, through its op, against the CPU op on the same inputs.

backend "emulated": the CUDA executor (csrc/common/cuda_emulation.h) runs the .cu files' kernels and host
code on this machine's CPU, in every run of the README's test command. Each case runs under several thread
orders (forward, one warp ahead of the others, reverse, seeded shuffle), which must give the same bits:
a result that depends on the order means a race or a missing barrier. The executor also refuses what a
GPU would refuse (launch limits, shared memory, barriers and shuffles not reached by every thread).
backend "cuda": the same comparisons on a real GPU (tools/gpu_check.sh).

Outputs compare bit for bit where the design promises it on both devices (the sliced Wasserstein
projections and sort order, M-FAC's stored rows), and to the stated tolerance elsewhere (other summation
orders; fused multiply-adds on the GPU). The last test requires every kernel instantiation of csrc/ to
have been launched under two orders at least, and the terminal summary prints the launch table.
"""
import math
import pathlib
import subprocess
import zlib

import pytest
import torch

import cuda_executor
import lossforge  # noqa: F401  (registers torch.ops.lossforge.*)

CPU = torch.ops.lossforge
ORDERS = ("forward", "warp_ahead", "reverse", "shuffle")
BACKENDS = ["emulated", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def uninitialised_memory_is_nan():
    """Every torch.empty is filled with NaN (integers: their maximum), so that an output element a kernel
    forgets to write cannot pass for a right value."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(was)


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.detach().to(device).clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _flat(x):
    """The tensors of an op's outputs and arguments, in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return []


def _same_bits(a, b):
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        both_nan = torch.isnan(a) & torch.isnan(b)
        return bool(torch.equal(torch.where(both_nan, 0, a), torch.where(both_nan, 0, b)) and
                    torch.equal(torch.signbit(a), torch.signbit(b)))
    return torch.equal(a, b)


def run_op(backend, name, args, orders=ORDERS, order_tol=None):
    """The op's outputs and (possibly modified) arguments, flattened, as CPU tensors. Emulated: run once per
    thread order; the orders must agree bit for bit (order_tol: to that relative tolerance, for kernels whose
    float atomics add in thread order)."""
    if backend == "cuda":
        dev_args = _to(args, "cuda")
        out = getattr(CPU, name)(*dev_args)
        return [t.cpu() for t in _flat(out) + _flat(dev_args)]
    results = []
    seed = zlib.crc32(name.encode())
    for order in orders:
        cpu_args = _to(args, "cpu")
        with cuda_executor.order(order, seed):
            out = getattr(cuda_executor.ops(), name)(*cpu_args)
        results.append(_flat(out) + _flat(cpu_args))
    for order, res in zip(orders[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], res)):
            if order_tol is None:
                assert _same_bits(a, b), f"{name}: result {i} differs between thread orders {orders[0]} and {order}"
            else:
                torch.testing.assert_close(b, a, rtol=order_tol, atol=order_tol, equal_nan=True,
                                           msg=lambda m, i=i, o=order: f"{name}: result {i}, orders {orders[0]} and {o}: {m}")
    return results[0]


def check(backend, name, args, rtol=0.0, atol=0.0, exact=(), orders=ORDERS, order_tol=None):
    """Compares the op on the backend with the CPU op: bit for bit for the results listed in `exact`, to
    (rtol, atol) for the others."""
    got = run_op(backend, name, args, orders, order_tol)
    cpu_args = _to(args, "cpu")
    want = _flat(getattr(CPU, name)(*cpu_args)) + _flat(cpu_args)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: result {i}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        if i in exact or (rtol == 0 and atol == 0):
            assert _same_bits(g, w), f"{name}: result {i} is not bit-identical to the CPU op's"
        else:
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m, i=i: f"{name}: result {i}: {m}")
    return got


def logits(shape, gen, dtype, scale=3.0):
    """Random logits with exact 0, ±1, ties and large values."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=gen)
    k = max(1, flat.numel() // 10)
    flat[idx[:k]] = 1.0
    flat[idx[k:2 * k]] = 0.0
    flat[idx[2 * k:3 * k]] = -1.0
    flat[idx[3 * k:3 * k + max(1, flat.numel() // 50)]] = 40.0
    return x.to(dtype)


# ---- StableMax -----------------------------------------------------------------------------------------

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (shape, dim): class counts that pick every group size G (V <= 4: 1, <= 8: 2, <= 16: 4, <= 32: 8, <= 64: 16,
# <= 2048: 32, more: the whole block), row counts that leave the last block partial, and strided rows
# (dim not last: G = 1 with neighbouring threads on neighbouring addresses).
STABLEMAX_SHAPES = [((300, 1), 1), ((130, 4), 1), ((67, 7), -1), ((33, 16), 1), ((17, 31), 1), ((9, 64), 1),
                    ((5, 65), 1), ((3, 2048), 1), ((2, 2049), 1), ((1, 3001), 1), ((4, 6, 5), 1), ((3, 70, 2), 1),
                    ((7, 3), 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,dim", STABLEMAX_SHAPES)
def test_stablemax(backend, dtype, shape, dim, gen):
    x = logits(shape, gen, dtype)
    x.view(-1)[0] = -math.inf  # a masked class
    tol = TOL[dtype]
    for log in (False, True):
        out = CPU.stablemax(x, dim, log)
        check(backend, "stablemax", [x, dim, log], rtol=tol, atol=tol)
        grad = torch.randn(shape, generator=gen).to(dtype)
        check(backend, "stablemax_backward", [grad, x, out, dim, log], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,dim", [s for s in STABLEMAX_SHAPES if s[0][-1] > 1 or s[1] == 0])
def test_stablemax_rows_whose_sum_overflows(backend, dtype, shape, dim, gen):
    """Rows of logits near the top of the float range: the sum is taken again, scaled (every group size;
    the other rows of the warp take that branch too, since they share its shuffles)."""
    x = logits(shape, gen, dtype)
    big = torch.finfo(dtype).max
    rows = x.movedim(dim, -1)  # a view, one row per index of the other dimensions
    first, last = rows[(0,) * (rows.dim() - 1)], rows[(-1,) * (rows.dim() - 1)]
    first[0], first[1], first[-1] = big, big, -big  # overflowing sums, and a class far below the others
    last[:] = big / 2
    tol = TOL[dtype] * 4
    for log in (False, True):
        check(backend, "stablemax", [x, dim, log], rtol=tol, atol=tol)
    t_shape = shape[:dim] + shape[dim + 1:] if dim >= 0 else shape[:dim]
    target = torch.randint(0, x.shape[dim], t_shape, generator=gen)
    for eps in (0.0, 0.1):
        loss, stats = CPU.stablemax_cross_entropy(x, target, None, dim, -100, eps)
        check(backend, "stablemax_cross_entropy", [x, target, None, dim, -100, eps], rtol=tol, atol=tol)
        g = torch.rand(t_shape, generator=gen, dtype=dtype)
        check(backend, "stablemax_cross_entropy_backward", [g, x, target, None, stats, dim, -100, eps], rtol=tol,
              atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stablemax_nan_and_inf_rows(backend):
    x = torch.tensor([[1.0, math.nan, 2.0], [1.0, math.inf, 0.0], [-math.inf, -math.inf, 3.0]])
    got = check(backend, "stablemax", [x, 1, False], rtol=1e-6, atol=1e-6)[0]
    assert torch.isnan(got[:2]).all() and got[2].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,dim", STABLEMAX_SHAPES[:-1])
def test_stablemax_cross_entropy(backend, dtype, shape, dim, gen):
    x = logits(shape, gen, dtype)
    V = x.shape[dim]
    t_shape = shape[:dim] + shape[dim + 1:] if dim >= 0 else shape[:dim]
    target = torch.randint(0, V, t_shape, generator=gen)
    target.view(-1)[::3] = -100  # ignored rows
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.rand(V, generator=gen, dtype=acc)
    tol = TOL[dtype] * 4
    for w in (None, weight):
        for eps in (0.0, 0.1):
            loss, stats = CPU.stablemax_cross_entropy(x, target, w, dim, -100, eps)
            check(backend, "stablemax_cross_entropy", [x, target, w, dim, -100, eps], rtol=tol, atol=tol)
            per_row = torch.rand(t_shape, generator=gen, dtype=acc)
            scalar = torch.rand(1, generator=gen, dtype=acc)
            for g in (per_row, scalar):
                check(backend, "stablemax_cross_entropy_backward", [g, x, target, w, stats, dim, -100, eps],
                      rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_out_of_range_target_gives_nan_row(backend):
    """Documented CUDA behaviour: a target outside [0, V) cannot raise without a host sync: its row's loss is
    NaN, its stats and gradient 0, and nothing is read out of bounds (the CPU op raises instead)."""
    x = torch.randn(4, 6)
    target = torch.tensor([1, 6, -3, -100])
    loss, stats, *_ = run_op(backend, "stablemax_cross_entropy", [x, target, None, 1, -100, 0.0])
    assert math.isnan(loss[1]) and math.isnan(loss[2]) and loss[3] == 0 and torch.isfinite(loss[0])
    assert stats[1:3].eq(0).all()
    g, *_ = run_op(backend, "stablemax_cross_entropy_backward",
                   [torch.ones(4), x, target, None, stats, 1, -100, 0.0])
    assert g[1:].eq(0).all() and g[0].ne(0).any()
    with pytest.raises(RuntimeError, match="out of range"):
        CPU.stablemax_cross_entropy(x, target, None, 1, -100, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 257, 70000, 300000])  # one element; partial block; more than 1024 blocks
def test_orthograd(backend, dtype, n, gen):
    w = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen).to(dtype)
    tol = TOL[dtype] * (10 if n > 1 else 1)
    orders = ORDERS if n < 100000 else ORDERS[:2]
    # float64 block sums added with one atomicAdd per block: exact across thread orders, not across block orders
    check(backend, "orthograd_", [g, w], rtol=tol, atol=tol, orders=orders, order_tol=1e-12)


# ---- sliced Wasserstein ----------------------------------------------------------------------------------

def clouds(B, N, M, d, gen, dtype, weights):
    x = torch.randn(B, N, d, generator=gen, dtype=torch.float64).to(dtype)
    y = (torch.randn(B, M, d, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    x[:, -1] = x[:, 0]  # a tie between two points
    wx = torch.rand(B, N, generator=gen, dtype=torch.float64).to(dtype) if weights else None
    wy = torch.rand(B, M, generator=gen, dtype=torch.float64).to(dtype) if weights else None
    if weights and N > 2:
        wx[:, 1] = 0  # zero-weight points: one far away (padding), one among the others
        x[:, 1] *= 1e4
        wx[:, 2] = 0
    if weights and M > 1:
        wy[:, 0] = 0
    return x, y, wx, wy


# (dtype, B, N, M, d, L, weights): equal sizes (the fast path) and general (weights or N != M); one chunk of
# slices (L = 1) and many; shared memory, shared memory past 48 KB (opt-in: 2048 points), and global scratch
# (float64 with weights, 2100 points: 72 B per padded point, over the 227 KB maximum).
SMALL_SW = [(1, 7, 7, 3, 1, False), (3, 33, 33, 4, 9, False), (2, 40, 29, 3, 5, False), (2, 17, 23, 2, 6, True),
            (1, 300, 300, 3, 2, True), (2, 1, 1, 1, 4, False), (1, 1, 5, 2, 3, True),
            (1, 9, 9, 2, 300, False)]  # one point per side; 300 slices: several per chunk
SW_CASES = ([(dt, *c) for dt in (torch.float32, torch.float64) for c in SMALL_SW] +
            [(torch.float32, 1, 2048, 2048, 3, 2, False), (torch.float64, 1, 2100, 1500, 2, 2, True)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,B,N,M,d,L,weights", SW_CASES)
def test_sliced_wasserstein(backend, dtype, B, N, M, d, L, weights, gen):
    x, y, wx, wy = clouds(B, N, M, d, gen, dtype, weights)
    tol = TOL[dtype] * 50
    orders = ORDERS if N * L < 2000 else ORDERS[:2]
    for shared in (True, False):
        theta = torch.randn((d, L) if shared else (B, d, L), generator=gen, dtype=torch.float64).to(dtype)
        for p in (1.0, 2.0, 1.5):
            for grads in [(True, True, True), (False, False, False), (True, False, False), (False, True, True)]:
                check(backend, "sliced_wasserstein", [x, y, wx, wy, theta, p, *grads], rtol=tol, atol=tol,
                      orders=orders)
            if len(orders) == 2:
                break  # the large cases: one p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sliced_wasserstein_sort_order_is_the_cpus(backend, dtype, gen):
    """One slice of one pair (no partial sums): the point gradients are d|u_(i) - v_(i)|^p / du scattered by
    the sort permutations, so they are bit-identical to the CPU's exactly when both devices compute the same
    projections (never fused into an FMA) and sort them the same way (ties by index, -0 == +0)."""
    x, y, _, _ = clouds(1, 50, 50, 3, gen, dtype, False)
    x[0, :10] = x[0, 10:20]  # ties
    theta = torch.randn(3, 1, generator=gen, dtype=torch.float64).to(dtype)
    for p in (1.0, 2.0):
        check(backend, "sliced_wasserstein", [x, y, None, None, theta, p, True, False, False], rtol=1e-5,
              atol=1e-6, exact=(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_wasserstein_nan_point(backend, gen):
    """Documented CUDA behaviour: the value checks are skipped (they would synchronise), so a NaN coordinate
    gives a NaN value; the padding still sorts last (no read or write out of bounds) and the other points'
    gradients stay finite. The CPU op raises instead."""
    x, y, _, _ = clouds(1, 6, 6, 2, gen, torch.float32, False)
    x[0, 2, 0] = math.nan
    theta = torch.randn(2, 3, generator=gen)
    value, gx, *_ = run_op(backend, "sliced_wasserstein", [x, y, None, None, theta, 2.0, True, False, False])
    assert value.isnan().all()
    assert torch.isfinite(gx[0, [0, 1, 3, 4, 5]]).all()
    with pytest.raises(RuntimeError, match="not finite"):
        CPU.sliced_wasserstein(x, y, None, None, theta, 2.0, True, False, False)


# ---- Betti matching --------------------------------------------------------------------------------------

def betti_rows(shape, gen, dtype):
    pred = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    target = (torch.rand(shape, generator=gen) > 0.5).to(dtype)
    rows, _ = CPU.betti_matching_pairs(1 - pred, 1 - target, False, True)
    N = shape[0]
    return pred.reshape(N, -1).contiguous(), target.reshape(N, -1).contiguous(), rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 12, 17), (2, 40, 40), (2, 5, 6, 7)])
def test_betti_matching_loss_rows(backend, dtype, shape, gen):
    pred, target, rows = betti_rows(shape, gen, dtype)
    D = len(shape) - 1
    weights = torch.rand(D, 3, generator=gen, dtype=torch.float64)
    tol = TOL[dtype] * 10
    # per-instance sums by atomicAdd: the order of the additions follows the threads
    check(backend, "betti_matching_loss_rows", [pred, target, rows, weights], rtol=tol, atol=tol, order_tol=tol)
    grad = torch.rand(shape[0], generator=gen, dtype=torch.float64).to(dtype)
    check(backend, "betti_matching_loss_rows_backward", [grad, pred, target, rows, weights], rtol=tol, atol=tol,
          order_tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_betti_matching_rows_out_of_range_are_skipped(backend, gen):
    """A hand-made rows tensor with a segment or pixel out of range: the CUDA kernels skip those rows (they
    cannot raise without a sync) and never read out of bounds; the other rows count as usual."""
    pred, target, rows = betti_rows((2, 9, 9), gen, torch.float64)
    weights = torch.ones(2, 3, dtype=torch.float64)
    bad = rows[:4].clone()
    bad[0, 0] = 2 * 3 * 2  # segment past the last instance
    bad[1, 1] = 81         # pixel past the image
    bad[2, 0] = -1
    bad[3, 3] = -5 if bad[3, 0] % 3 != 1 else 10**9
    mixed = torch.cat([bad, rows])
    got = run_op(backend, "betti_matching_loss_rows", [pred, target, mixed, weights], order_tol=1e-12)[0]
    torch.testing.assert_close(got, CPU.betti_matching_loss_rows(pred, target, rows, weights))
    g = run_op(backend, "betti_matching_loss_rows_backward", [torch.ones(2, dtype=torch.float64), pred, target,
                                                               mixed, weights], order_tol=1e-12)[0]
    torch.testing.assert_close(g, CPU.betti_matching_loss_rows_backward(torch.ones(2, dtype=torch.float64), pred,
                                                                        target, rows, weights))


# ---- M-FAC -----------------------------------------------------------------------------------------------

STORAGE = [torch.float32, torch.float64, torch.bfloat16]


def buffer(m, d, storage, gen, strided=False):
    full = torch.randn(m, d + (5 if strided else 0), generator=gen)
    G = full.to(storage)
    return G[:, :d] if strided else G


# (m, d): one row; tiles of 2048 columns, the last partial; several warps' worth of rows
MFAC_SIZES = [(1, 1), (5, 100), (33, 2049), (8, 4097)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("m,d", MFAC_SIZES)
def test_mfac_passes(backend, storage, m, d, gen):
    compute = torch.float64 if storage == torch.float64 else torch.float32
    tol = 1e-12 if compute == torch.float64 else 1e-5
    eps = torch.finfo(compute).eps
    for strided in (False, True):
        G = buffer(m, d, storage, gen, strided)
        for x in (torch.randn(d, generator=gen, dtype=compute), torch.randn(3, d, generator=gen, dtype=compute)):
            # the two devices add a row's d products in other orders (tiles of 2048 vs chunks of 4096 columns)
            dot_tol = 4 * eps * math.sqrt(d) * (x.abs() @ G.to(compute).abs().T).max().item()
            check(backend, "mfac_gemv", [G, x], rtol=0, atol=dot_tol)
            b = torch.randn(*x.shape[:-1], m, generator=gen, dtype=compute)
            check(backend, "mfac_gemv_t", [G, b, x, -0.5, 2.0], rtol=tol, atol=tol)
            check(backend, "mfac_gemv_t", [G, b, None, 1.0, 0.0], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("sizes", [[1], [100, 3], [2049, 7, 2048]])
def test_mfac_step(backend, storage, sizes, gen):
    """The fused step: the new gradient written into row r of G (bit-identical to the CPU's: the stored row is
    (g + wd p) rounded to the storage dtype on both devices), its dot products with every row, and the update."""
    compute = torch.float64 if storage == torch.float64 else torch.float32
    tol = 1e-12 if compute == torch.float64 else 1e-5
    m, d = 6, sum(sizes)
    G = buffer(m, d, storage, gen)
    grads = [torch.randn(n, generator=gen, dtype=compute) for n in sizes]
    params = [torch.randn(n, generator=gen, dtype=compute) for n in sizes]
    for wd, ps in ((0.0, []), (0.1, params)):
        got = check(backend, "mfac_insert_gemv_", [G, 2, grads, ps, wd], rtol=tol, atol=tol, exact=(1,))
        assert not _same_bits(got[1], G)  # the row was written
    b = torch.randn(m, generator=gen, dtype=compute)
    v = torch.randn(d, generator=gen, dtype=compute)
    for mom, buf in ((0.0, None), (0.9, v)):
        check(backend, "mfac_step_", [G, b, params, grads, buf, -0.3, 2.0, 0.01, 0.1, mom], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 7, 300])  # 300 > 256 threads: each thread takes several columns
def test_mfac_chol_replace_oldest(backend, n, gen):
    A = torch.randn(n + 1, n + 1, generator=gen, dtype=torch.float64)
    K = A @ A.T + (n + 1) * torch.eye(n + 1, dtype=torch.float64)
    U = torch.linalg.cholesky(K[:n, :n]).T.contiguous()
    got = check(backend, "mfac_chol_replace_oldest_", [U, K[n, 1:].clone(), 1e-3], rtol=1e-10, atol=1e-12)
    # U is now the factor of the window without its oldest gradient and with the new one (diagonal + shift)
    K_new = K[1:, 1:].clone()
    K_new[-1, -1] += 1e-3
    torch.testing.assert_close(got[1], torch.linalg.cholesky(K_new).T, rtol=1e-9, atol=1e-9)


# ---- PamC ----------------------------------------------------------------------------------------------

def graph(n, E, gen, dtype):
    """CSR and transposed lists of a random graph with self-loops, duplicate edges, zero weights and
    isolated nodes."""
    row = torch.randint(0, n, (E,), generator=gen)
    col = torch.randint(0, n, (E,), generator=gen)
    if E >= 4:
        row[0], col[0] = 0, 0              # self-loop
        row[1], col[1] = row[2], col[2]    # duplicate
    w = torch.rand(E, generator=gen, dtype=torch.float64).to(dtype)
    if E >= 4:
        w[3] = 0
    rowptr, col_s, perm, colptr, trow, tedge = CPU.pamc_build_csr(row, col, n)
    return [rowptr, col_s, w[perm].contiguous(), colptr, trow, tedge]


def embeddings(n, d, gen, dtype):
    z = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    if n > 2:
        z[1] = 0  # a zero row: the norm clamp
    return z


PAMC_SIZES = [(1, 1, 1), (5, 3, 9), (40, 33, 200), (70, 65, 300)]  # (n, d, E): d past one and two warp widths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d,E", PAMC_SIZES)
def test_pamc_positive(backend, dtype, n, d, E, gen):
    z = embeddings(n, d, gen, dtype)
    g = graph(n, E, gen, dtype)
    tol = TOL[dtype] * 10
    for tau in (0.5, 60.0):
        lse, u, inv = CPU.pamc_positive(z, *g, tau, 1e-10)
        check(backend, "pamc_positive", [z, *g, tau, 1e-10], rtol=tol, atol=tol)
        grad = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        grad[0] = 0
        check(backend, "pamc_positive_backward", [grad, u, inv, *g, lse, tau], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (50, 7, 4), (300, 3, 20), (9, 0, 3)])  # d = 0: the count kernel
def test_pamc_segment_sum(backend, dtype, n, d, k, gen):
    z = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, k, (n,), generator=gen)
    tol = TOL[dtype] * 10
    # sums by atomicAdd: the order of the additions follows the threads (the counts are exact)
    check(backend, "pamc_segment_sum", [z, labels, k], rtol=tol, atol=tol, order_tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pamc_segment_sum_skips_labels_out_of_range(backend, gen):
    """Documented CUDA behaviour: labels are checked in Python only when num_clusters is not given (the check
    needs a host sync); the kernel skips labels outside [0, k) rather than write out of bounds."""
    z = torch.randn(6, 3, generator=gen)
    labels = torch.tensor([0, 5, 1, -1, 1, 2])
    sums, counts = run_op(backend, "pamc_segment_sum", [z, labels, 3], order_tol=1e-6)[:2]
    keep = torch.tensor([0, 2, 4, 5])
    want_sums, want_counts = CPU.pamc_segment_sum(z[keep], labels[keep], 3)
    torch.testing.assert_close(sums, want_sums)
    assert counts.tolist() == want_counts.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d,E", PAMC_SIZES)
def test_pairwise_contrastive(backend, dtype, n, d, E, gen):
    """The tiled pairwise loss in tiles that do not divide n (7 x 5), and in one tile; tau up to 40 uses a fixed
    shift, larger tau the tile's maximum; the backward uses one exp per pair when |tau| + log(n + 1) is small."""
    z = embeddings(n, d, gen, dtype)
    g = graph(n, E, gen, dtype)
    tol = TOL[dtype] * 20
    for tau in (0.5, -2.0, 60.0, 200.0):
        for blocks in ((7, 5), (4096, 4096)):
            loss, stats = CPU.pairwise_contrastive(z, *g, tau, *blocks)
            check(backend, "pairwise_contrastive", [z, *g, tau, *blocks], rtol=tol, atol=tol)
            grad = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
            check(backend, "pairwise_contrastive_backward", [grad, z, *g, stats, tau, *blocks], rtol=tol * 10,
                  atol=tol * 10)


# ---- empty inputs: the host code returns before any launch (a grid of 0 blocks is a CUDA error) -----------

def _empty_graph(dtype):
    e = torch.zeros(0, dtype=torch.long)
    rowptr, col, perm, colptr, trow, tedge = CPU.pamc_build_csr(e, e, 0)
    return [rowptr, col, torch.zeros(0, dtype=dtype), colptr, trow, tedge]


EMPTY = {
    "stablemax": lambda: [torch.zeros(0, 5), 1, False],
    "stablemax_backward": lambda: [torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5), 1, True],
    "stablemax_cross_entropy": lambda: [torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), None, 1, -100, 0.1],
    "stablemax_cross_entropy_backward": lambda: [torch.zeros(0), torch.zeros(0, 5), torch.zeros(0, dtype=torch.long),
                                                 None, torch.zeros(0, 3), 1, -100, 0.0],
    "orthograd_": lambda: [torch.zeros(0), torch.zeros(0)],
    "sliced_wasserstein": lambda: [torch.zeros(0, 4, 3), torch.zeros(0, 5, 3), None, None, torch.ones(3, 2), 2.0,
                                   True, True, True],
    "betti_matching_loss_rows": lambda: [torch.rand(2, 9), torch.rand(2, 9), torch.zeros(0, 5, dtype=torch.long),
                                         torch.ones(2, 3, dtype=torch.float64)],
    "betti_matching_loss_rows_backward": lambda: [torch.ones(0), torch.rand(0, 9), torch.rand(0, 9),
                                                  torch.zeros(0, 5, dtype=torch.long),
                                                  torch.ones(2, 3, dtype=torch.float64)],
    "mfac_gemv": lambda: [torch.ones(3, 0), torch.ones(0)],
    "mfac_gemv_t": lambda: [torch.ones(3, 5), torch.ones(0, 3), torch.ones(0, 5), 1.0, 1.0],
    "mfac_insert_gemv_": lambda: [torch.ones(3, 0), 1, [torch.ones(0)], [], 0.0],
    "mfac_step_": lambda: [torch.ones(3, 0), torch.ones(3), [torch.ones(0)], [torch.ones(0)], None, 1.0, 1.0, 0.1,
                           0.0, 0.0],
    "pamc_positive": lambda: [torch.zeros(0, 3), *_empty_graph(torch.float32), 1.0, 1e-10],
    "pamc_positive_backward": lambda: [torch.zeros(0), torch.zeros(0, 3), torch.zeros(0),
                                       *_empty_graph(torch.float32), torch.zeros(0), 1.0],
    "pamc_segment_sum": lambda: [torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 4],
    "pairwise_contrastive": lambda: [torch.zeros(0, 3), *_empty_graph(torch.float32), 1.0, 8, 8],
    "pairwise_contrastive_backward": lambda: [torch.zeros(0), torch.zeros(0, 3), *_empty_graph(torch.float32),
                                              torch.zeros(0, 2), 1.0, 8, 8],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(EMPTY))
def test_empty_inputs(backend, name):
    check(backend, name, EMPTY[name]())


# ---- the executor itself --------------------------------------------------------------------------------

SELFTEST = {  # case number in tests/cpp/cuda_executor_selftest.cu: the error it must raise
    2: "invalid block: blockDim.x = 1025",
    3: "invalid grid: gridDim.y = 65536",
    4: "invalid grid: gridDim.x = 0",
    5: r"49156 B of dynamic shared memory, over the kernel's limit of 49152 B \(more needs cudaFuncSetAttribute",
    7: "opt-in over the maximum.*invalid argument",
    8: r"shared memory over the limit: 49156 B static .*cuda_executor_selftest.cu:\d+\) \+ 0 B dynamic > 49152 B",
    9: r"32768 B static .* \+ 20480 B dynamic > 49152 B",
    10: r"__syncthreads at tests/cpp/cuda_executor_selftest.cu:\d+ is not reached by every thread of block "
        r"\(0, 0, 0\): threads 128-255 returned, threads 0-127 wait",
    11: r"__syncthreads diverged: thread 0 waits at .*:\d+, thread 64 at .*:\d+",
    12: r"__shfl_xor_sync at .* waits for lane 16 of its mask, which is returned",
    13: "calls it with mask 0x00000001, which does not name its own lane 1",
    14: r"waits for lane 1 of its mask, which is at __shfl_xor_sync at .*:\d+ \(every lane the mask names",
    15: "lane 0 reads lane 16, which is not in the mask",
    16: "its mask names lane 16 of warp 1, which the block does not have",
}
SELFTEST_KERNEL = {2: "empty_kernel", 3: "empty_kernel", 4: "empty_kernel", 5: "dynamic_shared_kernel<5>",
                   8: "big_static_shared_kernel", 9: "static_and_dynamic_kernel", 10: "early_return_kernel",
                   11: "divergent_barrier_kernel", 12: "shuffle_after_exit_kernel",
                   13: "shuffle_without_own_lane_kernel", 14: "shuffle_at_two_sites_kernel",
                   15: "shuffle_outside_mask_kernel", 16: "partial_warp_shuffle_kernel"}


@pytest.mark.parametrize("case", sorted(SELFTEST))
@pytest.mark.parametrize("order", ["forward", "warp_ahead"])
def test_executor_refuses_what_a_gpu_would(case, order):
    with cuda_executor.order(order), pytest.raises(RuntimeError, match=SELFTEST[case]) as err:
        cuda_executor.ops().executor_selftest(torch.zeros(256), case)
    if case in SELFTEST_KERNEL:  # the message names the kernel and the launch
        assert f"kernel executor_selftest::{SELFTEST_KERNEL[case]}, grid (" in str(err.value)
        assert f"order {order}]" in str(err.value)


@pytest.mark.parametrize("order", ORDERS)
def test_executor_runs_a_correct_kernel(order):
    out = torch.zeros(256)
    with cuda_executor.order(order, seed=5):
        cuda_executor.ops().executor_selftest(out, 0)
    lane = torch.arange(32, dtype=torch.float32)
    assert out[0] == 255 * 256 / 2 and out[1] == 256
    assert out[2:34].tolist() == torch.cat([lane[1:], lane[31:]]).tolist()        # __shfl_down_sync by 1
    assert out[34:66].tolist() == torch.cat([lane[:2], lane[:30]]).tolist()       # __shfl_up_sync by 2
    assert out[66:98].tolist() == (lane // 8 * 8 + 3).tolist()                     # __shfl_sync lane 3 of 8
    assert out[98:130].tolist() == (lane.long() ^ 1).float().tolist()              # __syncwarp on half warps
    # opt-in dynamic shared memory over 48 KB is allowed
    cuda_executor.ops().executor_selftest(out, 6)
    assert out[0] == 1


def test_executor_finds_a_missing_barrier():
    """Two block sums that share their shared array, without the barrier that keeps the second sum's writes
    after the first sum's reads: right in forward order, wrong when one warp runs ahead."""
    results = {}
    for order in ("forward", "warp_ahead"):
        out = torch.zeros(256)
        with cuda_executor.order(order):
            cuda_executor.ops().executor_selftest(out, 1)
        results[order] = out[0].item()
    assert results["forward"] == 255 * 256 / 2
    assert results["warp_ahead"] != results["forward"]


def test_executor_poisons_shared_memory():
    """Shared memory a block has not written reads as NaN (0xff bytes), not as zeros or an older block's data."""
    out = torch.zeros(256)
    cuda_executor.ops().executor_selftest(out, 17)
    assert out[:128].eq(1).all() and out[128:].isnan().all()


def test_executor_has_no_atomic_add_cuda_lacks(tmp_path):
    """atomicAdd on a type CUDA has no atomicAdd for (here int64) does not compile, as with nvcc."""
    src = tmp_path / "bad_atomic.cpp"
    src.write_text('#include "common/cuda_utils.cuh"\n'
                   "void f(long* p) { atomicAdd(p, 1L); }\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    inc = pathlib.Path(torch.__file__).parent / "include"
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DLF_CUDA_EMULATION", "-DTORCH_TARGET_VERSION=0x020a000000000000",
           f"-I{root / 'csrc'}", f"-I{inc}", str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0 and "CUDA has no atomicAdd for this type" in res.stderr, res.stderr[-2000:]


# ---- coverage: keep last -------------------------------------------------------------------------------------

def test_every_kernel_was_launched_under_two_orders():
    """Every __global__ kernel of csrc/ is launched by this file, each template instantiation under the forward
    order and with one warp ahead at least (run the whole file: a subset leaves kernels unlaunched)."""
    counts = {k: v for k, v in cuda_executor.launch_counts().items() if not k.startswith("executor_selftest::")}
    in_sources = cuda_executor.kernels_in_sources()
    registered = {cuda_executor.base_name(k) for k in counts}
    assert in_sources - registered == set(), "kernels the host code never launches"
    missing = [k for k, c in counts.items() if c["forward"] == 0 or c["warp_ahead"] == 0]
    assert not missing, f"kernel instantiations not launched under both orders: {missing}"
