"""PamC: pamc_loss, pairwise_contrastive_loss, influence_matrix, stochastic_block_model, nn.PamCLoss.

Oracles: numpy + scipy.sparse + scipy.special.logsumexp (independent of torch) for the loss values and Γ;
the dense float64 references written from the spec (reference/pamc.py) and the authors' dense and sparse
recipes for values and gradients (torch autograd through them).
"""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.special import logsumexp

import lossforge
from conftest import compiled, same_error_eager_and_fake
from lossforge import _pamc as pamc
from lossforge.reference import pamc as ref

ops = torch.ops.lossforge
f64 = torch.float64


def random_graph(gen, n, E, self_loops=True, duplicates=True, isolated=(), weight_max=2.0):
    """Random directed edges with self-loops, duplicate edges and isolated nodes, positive weights."""
    row = torch.randint(0, n, (E,), generator=gen)
    col = torch.randint(0, n, (E,), generator=gen)
    if self_loops:
        row[: E // 10] = col[: E // 10]
    if duplicates and E >= 8:
        row[-4:], col[-4:] = row[:4].clone(), col[:4].clone()
    for i in isolated:
        keep = (row != i) & (col != i)
        row, col = row[keep], col[keep]
    w = torch.rand(row.numel(), generator=gen, dtype=f64) * weight_max + 0.01
    return torch.stack([row, col]), w


def oracle_pamc(z, edge_index, w, labels, tau):
    """numpy/scipy: L_PamC for hard labels, empty clusters dropped."""
    z = z.detach().cpu().numpy().astype(np.float64)
    ei = edge_index.cpu().numpy()
    n = z.shape[0]
    gamma = sp.coo_matrix((w.cpu().numpy(), (ei[0], ei[1])), shape=(n, n)).tocsr()  # sums duplicates
    u = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    s = u @ u.T
    np.fill_diagonal(s, 0.0)
    pos = np.log(np.asarray(gamma.multiply(np.exp(tau * s)).sum(1)).ravel() + 1e-10)
    labels = labels.cpu().numpy()
    present = np.unique(labels)
    meta = np.stack([z[labels == a].sum(0) for a in present])
    mu = meta / np.maximum(np.linalg.norm(meta, axis=1, keepdims=True), 1e-12)
    big_s = mu @ mu.T
    np.fill_diagonal(big_s, 0.0)
    neg = np.log(np.exp(logsumexp(tau * big_s, axis=1)) + 1e-10).mean()
    return -pos.mean() + neg


def oracle_pairwise(z, edge_index, w, tau):
    z = z.detach().cpu().numpy().astype(np.float64)
    ei = edge_index.cpu().numpy()
    n = z.shape[0]
    gamma = sp.coo_matrix((w.cpu().numpy(), (ei[0], ei[1])), shape=(n, n)).toarray()
    u = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    s = u @ u.T
    np.fill_diagonal(s, 0.0)
    log_p = logsumexp(tau * s, axis=1, b=gamma)
    log_n = logsumexp(tau * s, axis=1)
    return float(np.mean(-np.log(np.exp(log_p - log_n) + 1e-8)))


def oracle_influence(edge_index, n, order, influence):
    ei = edge_index.cpu().numpy()
    a = sp.coo_matrix((np.ones(ei.shape[1]), (ei[0], ei[1])), shape=(n, n)).tocsr()
    a = ((a + a.T) > 0).astype(np.float64)
    a.setdiag(1.0)
    a_hat = sp.diags(1.0 / np.asarray(a.sum(1)).ravel()) @ a
    power, gamma = a_hat, a_hat.copy()
    for _ in range(order - 1):
        power = power @ a_hat
        gamma = gamma + power if influence else power
    return gamma.toarray()


# ---- values and gradients against the oracles ------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_pamc_hard_matches_oracles(device, gen, tau):
    n, d, k = 53, 6, 7
    ei, w = random_graph(gen, n, 260, isolated=(3, 17))
    z = torch.randn(n, d, generator=gen, dtype=f64)
    labels = torch.randint(0, k - 2, (n,), generator=gen)  # clusters k-2 and k-1 are empty
    labels[labels == 2] = 1  # and cluster 2 too
    expected = oracle_pamc(z, ei, w, labels, tau)
    zz = z.to(device).requires_grad_()
    out = lossforge.pamc_loss(zz, ei.to(device), w.to(device), assignment=labels.to(device), tau=tau,
                              num_clusters=k)
    assert out.dtype == f64 and out.shape == ()
    assert out.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    (g,) = torch.autograd.grad(out, zz)
    zr = z.clone().requires_grad_()
    gamma = ref.gamma_dense(ei, n, w)
    r = ref.pamc_loss_reference(zr, gamma, labels, tau=tau, num_clusters=k)
    assert r.item() == pytest.approx(expected, rel=1e-12)
    (gr,) = torch.autograd.grad(r, zr)
    torch.testing.assert_close(g.cpu(), gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("soft", [False, True])
def test_pamc_soft_assignment_matches_reference(device, gen, soft):
    n, d, k = 41, 5, 4
    ei, w = random_graph(gen, n, 200)
    z = torch.randn(n, d, generator=gen, dtype=f64)
    q = torch.softmax(2 * torch.randn(n, k, generator=gen, dtype=f64), 1)
    zz, qq = z.to(device).requires_grad_(), q.to(device).requires_grad_()
    out = lossforge.pamc_loss(zz, ei.to(device), w.to(device), assignment=qq, tau=1.5, soft=soft)
    grads = torch.autograd.grad(out, (zz, qq), allow_unused=True)
    zr, qr = z.clone().requires_grad_(), q.clone().requires_grad_()
    r = ref.pamc_loss_reference(zr, ref.gamma_dense(ei, n, w), qr, tau=1.5, soft=soft)
    rgrads = torch.autograd.grad(r, (zr, qr), allow_unused=True)
    assert out.item() == pytest.approx(r.item(), rel=1e-12)
    torch.testing.assert_close(grads[0].cpu(), rgrads[0], rtol=1e-10, atol=1e-12)
    if soft:
        torch.testing.assert_close(grads[1].cpu(), rgrads[1], rtol=1e-10, atol=1e-12)
        assert grads[1].abs().sum() > 0
    else:  # no gradient through the argmax
        assert grads[1] is None and rgrads[1] is None
        hard = lossforge.pamc_loss(z, ei, w, assignment=q.argmax(1), tau=1.5, num_clusters=k)
        assert out.item() == pytest.approx(hard.item(), rel=1e-14)


def test_pamc_matches_authors_sparse_recipe(gen):
    n, d, k = 120, 8, 5
    ei, w = random_graph(gen, n, 700)
    z = torch.randn(n, d, generator=gen, dtype=f64, requires_grad=True)
    q = torch.softmax(torch.randn(n, k, generator=gen, dtype=f64), 1)
    q[:k] = F.one_hot(torch.arange(k), k).to(f64)  # every cluster non-empty: the authors' code needs it
    ours = lossforge.pamc_loss(z, ei, w, assignment=q, tau=2.0)
    theirs = ref.pamc_loss_authors(z, ei, w, q, tau=2.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    g1, g2 = torch.autograd.grad(ours, z)[0], torch.autograd.grad(theirs, z)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_ties(gen):
    """Tied maxima of q go to the first cluster (torch.argmax, as the authors' q.argmax(1)); tied
    similarities (duplicated embeddings, equal weights) are plain equal terms of the row sums."""
    n, d = 24, 4
    ei, w = random_graph(gen, n, 90, self_loops=False)
    w[:] = 0.5
    base = torch.randn(3, d, generator=gen, dtype=f64)
    z = base[torch.randint(0, 3, (n,), generator=gen)].clone()  # many identical rows: s_ij = 1 exactly
    q = torch.zeros(n, 4, dtype=f64)
    q[:, 1] = q[:, 2] = 0.4  # a tie between clusters 1 and 2 everywhere ...
    q[:6, 3] = 0.4  # ... and a three-way tie for the first six nodes
    q[:, 0] = 0.2
    expected = oracle_pamc(z, ei, w, torch.ones(n, dtype=torch.long), 1.0)  # everyone in cluster 1
    got = lossforge.pamc_loss(z, ei, w, assignment=q)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    zz, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    g = torch.autograd.grad(lossforge.pamc_loss(zz, ei, w, assignment=q, tau=2.0), zz)[0]
    gr = torch.autograd.grad(ref.pamc_loss_reference(zr, ref.gamma_dense(ei, n, w), q, tau=2.0), zr)[0]
    torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12)
    p = lossforge.pairwise_contrastive_loss(z, ei, w, tau=2.0)
    assert p.item() == pytest.approx(oracle_pairwise(z, ei, w, 2.0), rel=1e-12)


def test_empty_clusters_are_dropped_where_the_authors_get_nan(gen):
    n, d = 30, 4
    ei, w = random_graph(gen, n, 100)
    z = torch.randn(n, d, generator=gen, dtype=f64)
    labels = torch.randint(0, 2, (n,), generator=gen) * 3  # clusters 0 and 3 used, 1, 2, 4 empty
    q = F.one_hot(labels, 5).to(f64)
    assert math.isnan(ref.pamc_loss_authors(z, ei, w, q).item())
    ours = lossforge.pamc_loss(z, ei, w, assignment=q)
    compact = lossforge.pamc_loss(z, ei, w, assignment=labels // 3)  # the same clustering, k = 2
    assert ours.item() == pytest.approx(compact.item(), rel=1e-14)
    assert ours.item() == pytest.approx(oracle_pamc(z, ei, w, labels, 1.0), rel=1e-12)


def test_isolated_nodes_self_loops_duplicates(gen):
    n, d = 6, 3
    z = torch.randn(n, d, generator=gen, dtype=f64, requires_grad=True)
    # node 5 is isolated; (2, 2) is a self-loop; (0, 1) appears twice
    ei = torch.tensor([[0, 0, 1, 2, 2, 3, 4, 0], [1, 2, 0, 2, 3, 4, 3, 1]])
    w = torch.tensor([0.5, 1.0, 2.0, 0.7, 1.5, 1.0, 0.2, 0.25], dtype=f64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    per_node = lossforge.pamc_loss(z, ei, w, assignment=labels, reduction="none")
    u = F.normalize(z.detach(), dim=1)
    cos = lambda i, j: float(u[i] @ u[j])  # noqa: E731
    meta_term = per_node[5].item() - (-math.log(1e-10))  # node 5's positive term is -log(0 + 1e-10)
    p0 = 0.75 * math.exp(cos(0, 1)) + 1.0 * math.exp(cos(0, 2))  # duplicates summed
    p2 = 0.7 * 1.0 + 1.5 * math.exp(cos(2, 3))  # the self-loop adds its weight: e^{tau * 0}
    assert per_node[0].item() == pytest.approx(-math.log(p0 + 1e-10) + meta_term, rel=1e-12)
    assert per_node[2].item() == pytest.approx(-math.log(p2 + 1e-10) + meta_term, rel=1e-12)
    # merged duplicates give the same loss and gradient
    merged = lossforge.pamc_loss(z, ei[:, :7], torch.cat([w[:1] + w[7:], w[1:7]]), assignment=labels)
    mean = per_node.mean()
    assert mean.item() == pytest.approx(merged.item(), rel=1e-14)
    torch.testing.assert_close(torch.autograd.grad(mean, z)[0], torch.autograd.grad(merged, z)[0])
    # the isolated node gets gradient only through its meta-node
    labels_solo = torch.tensor([0, 0, 1, 1, 2, 3])
    loss = lossforge.pamc_loss(z, ei, w, assignment=labels_solo)
    only_meta = lossforge.pamc_loss(z, ei[:, :0], w[:0], assignment=labels_solo)
    g = torch.autograd.grad(loss - only_meta, z)[0]
    assert torch.all(g[5] == 0)


def test_reductions(gen):
    n = 25
    ei, w = random_graph(gen, n, 90)
    z = torch.randn(n, 4, generator=gen, dtype=f64)
    labels = torch.randint(0, 3, (n,), generator=gen)
    none = lossforge.pamc_loss(z, ei, w, assignment=labels, reduction="none")
    assert none.shape == (n,)
    assert lossforge.pamc_loss(z, ei, w, assignment=labels).item() == pytest.approx(none.mean().item(), rel=1e-14)
    assert lossforge.pamc_loss(z, ei, w, assignment=labels, reduction="sum").item() == pytest.approx(
        none.sum().item(), rel=1e-14)
    p_none = lossforge.pairwise_contrastive_loss(z, ei, w, reduction="none")
    assert p_none.shape == (n,)
    assert lossforge.pairwise_contrastive_loss(z, ei, w, reduction="sum").item() == pytest.approx(
        p_none.sum().item(), rel=1e-14)


def test_graph_forms_agree(gen):
    n = 40
    ei, w = random_graph(gen, n, 150)
    z = torch.randn(n, 5, generator=gen, dtype=f64)
    labels = torch.randint(0, 4, (n,), generator=gen)
    base = lossforge.pamc_loss(z, ei, w, assignment=labels)
    order = torch.argsort(ei[0], stable=True)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(ei[0], minlength=n).cumsum(0)])
    csr = lossforge.pamc_loss(z, (rowptr, ei[1, order]), w[order], assignment=labels)
    graph = lossforge.prepare_graph(ei, n, w)
    prepared = lossforge.pamc_loss(z, graph, assignment=labels)
    int32 = lossforge.pamc_loss(z, ei.int(), w, assignment=labels.int())
    assert base.item() == csr.item() == prepared.item() == int32.item()
    p1 = lossforge.pairwise_contrastive_loss(z, ei, w)
    p2 = lossforge.pairwise_contrastive_loss(z, graph)
    assert p1.item() == p2.item()


def test_zero_embedding_rows_follow_normalize(gen):
    n = 12
    ei, w = random_graph(gen, n, 40, self_loops=False)
    z = torch.randn(n, 3, generator=gen, dtype=f64)
    z[4] = 0.0
    z[7] = 1e-14  # below the norm clamp
    labels = torch.randint(0, 3, (n,), generator=gen)
    zz, zr = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = lossforge.pamc_loss(zz, ei, w, assignment=labels, num_clusters=3)
    r = ref.pamc_loss_reference(zr, ref.gamma_dense(ei, n, w), labels, num_clusters=3)
    assert out.item() == pytest.approx(r.item(), rel=1e-12)
    g, gr = torch.autograd.grad(out, zz)[0], torch.autograd.grad(r, zr)[0]
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-9)
    p = lossforge.pairwise_contrastive_loss(zz, ei, w)
    pr = ref.pairwise_contrastive_loss_reference(zr, ref.gamma_dense(ei, n, w))
    torch.testing.assert_close(torch.autograd.grad(p, zz)[0], torch.autograd.grad(pr, zr)[0], rtol=1e-9, atol=1e-9)


def test_large_tau_stays_finite_in_float32(gen):
    """The online log-sum-exp: e^{tau s} overflows float32 from tau ~ 89, the loss must not."""
    n = 60
    ei, w = random_graph(gen, n, 300, self_loops=False)
    z = torch.randn(n, 8, generator=gen, dtype=f64)
    labels = torch.randint(0, 4, (n,), generator=gen)
    for tau in (150.0, -150.0):
        expected = oracle_pamc(z, ei, w, labels, tau)
        got = lossforge.pamc_loss(z.float(), ei, w.float(), assignment=labels, tau=tau)
        assert math.isfinite(got.item())
        assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-3)
        expected = oracle_pairwise(z, ei, w, tau)
        zz = z.float().requires_grad_()
        got = lossforge.pairwise_contrastive_loss(zz, ei, w.float(), tau=tau)
        assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-3)
        assert torch.isfinite(torch.autograd.grad(got, zz)[0]).all()


def test_nan_propagates(device, gen):
    """NaN in z or Q gives NaN (torch's convention), never a finite or infinite loss: the rows whose
    positive term or denominator sees the NaN node, and every row through the shared meta-node term."""
    n = 40
    ei, w = random_graph(gen, n, 160, self_loops=False, isolated=(7,))
    z = torch.randn(n, 5, generator=gen, dtype=f64)
    z[11, 2] = float("nan")
    labels = torch.randint(0, 3, (n,), generator=gen)
    ei, w, z, labels = ei.to(device), w.to(device), z.to(device), labels.to(device)
    graph = lossforge.prepare_graph(ei, n, w)
    lse = ops.pamc_positive(z, graph.rowptr, graph.col, graph.weight, graph.colptr, graph.trow, graph.tedge, 1.0,
                            1e-10)[0].cpu()
    sees_nan = torch.zeros(n, dtype=torch.bool)
    sees_nan[ei[0][ei[1] == 11].cpu()] = True
    sees_nan[11] = True
    assert torch.equal(lse.isnan(), sees_nan)  # only the rows with an edge to the NaN node (and its own)
    assert torch.isnan(lossforge.pamc_loss(z, graph, assignment=labels, reduction="none")).all()
    assert torch.isnan(lossforge.pairwise_contrastive_loss(z, graph, reduction="none")).all()
    z[11, 2] = 0.0
    q = torch.softmax(torch.randn(n, 3, generator=gen, dtype=f64), 1).to(device)
    q[4, 1] = float("nan")
    assert torch.isnan(lossforge.pamc_loss(z, graph, assignment=q, soft=True)).item()
    # hard assignment from Q (the argmax, which picks a NaN entry as the maximum): NaN too, for every node
    for reduction in ("mean", "sum", "none"):
        assert torch.isnan(lossforge.pamc_loss(z, graph, assignment=q, reduction=reduction)).all(), reduction
    q[4, 1] = 0.5
    assert torch.isfinite(lossforge.pamc_loss(z, graph, assignment=q, reduction="none")).all()


def test_float32_close_to_float64(device, gen):
    n = 150
    ei, w = random_graph(gen, n, 900)
    z = torch.randn(n, 16, generator=gen, dtype=f64)
    q = torch.softmax(torch.randn(n, 6, generator=gen, dtype=f64), 1)
    for fn in (lambda zz, ww: lossforge.pamc_loss(zz, ei.to(device), ww, assignment=q.to(device).to(zz.dtype)),
               lambda zz, ww: lossforge.pairwise_contrastive_loss(zz, ei.to(device), ww, tau=2.0)):
        z64, z32 = z.to(device).requires_grad_(), z.float().to(device).requires_grad_()
        l64, l32 = fn(z64, w.to(device)), fn(z32, w.float().to(device))
        assert l32.dtype == torch.float32
        assert l32.item() == pytest.approx(l64.item(), rel=1e-5)
        g64, g32 = torch.autograd.grad(l64, z64)[0], torch.autograd.grad(l32, z32)[0]
        torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-6)


# ---- the exact tiled pairwise loss ---------------------------------------------------------------


@pytest.mark.parametrize("blocks", [(1, 1), (3, 5), (7, 2), (64, 64), (512, 2048)])
def test_pairwise_tiles_match_oracles(device, gen, blocks):
    n = 37
    ei, w = random_graph(gen, n, 160, isolated=(5,))
    z = torch.randn(n, 6, generator=gen, dtype=f64)
    zz = z.to(device).requires_grad_()
    graph = lossforge.prepare_graph(ei.to(device), n, w.to(device))
    rows = pamc._pairwise_rows(zz, graph, 1.7, *blocks)
    out = rows.mean()
    assert out.item() == pytest.approx(oracle_pairwise(z, ei, w, 1.7), rel=1e-12)
    gamma = ref.gamma_dense(ei, n, w)
    zr = z.clone().requires_grad_()
    r = ref.pairwise_contrastive_loss_reference(zr, gamma, tau=1.7)
    authors = ref.pairwise_contrastive_loss_authors(z, gamma, tau=1.7)
    assert authors.item() == pytest.approx(out.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out, zz)[0].cpu(), torch.autograd.grad(r, zr)[0],
                               rtol=1e-10, atol=1e-12)
    # a non-uniform upstream gradient exercises every row's weight
    up = torch.rand(n, generator=gen, dtype=f64)
    rows = pamc._pairwise_rows(zz, graph, 1.7, *blocks)
    r_rows = ref.pairwise_contrastive_loss_reference(zr, gamma, tau=1.7, reduction="none")
    torch.testing.assert_close(torch.autograd.grad(rows, zz, up.to(device))[0].cpu(),
                               torch.autograd.grad(r_rows, zr, up)[0], rtol=1e-10, atol=1e-12)


def test_pairwise_rows_without_positives(gen):
    """A node with no positive edge has P_i = 0: its loss is -log(1e-8) and it gets only the
    denominator's gradient, which vanishes with the factor P/(P + 1e-8) = 0."""
    n = 10
    ei = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    z = torch.randn(n, 4, generator=gen, dtype=f64, requires_grad=True)
    rows = lossforge.pairwise_contrastive_loss(z, ei, reduction="none")
    assert rows[5:].detach().tolist() == pytest.approx([-math.log(1e-8)] * 5, rel=1e-12)
    r = ref.pairwise_contrastive_loss_reference(z, ref.gamma_dense(ei, n), reduction="none")
    torch.testing.assert_close(rows, r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(rows.sum(), z)[0], torch.autograd.grad(r.sum(), z)[0])


def _resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_pairwise_tiles_are_released(device, gen):
    """Every call allocates its tile buffers (4 MiB per thread on the CPU, 64 MiB on a GPU): they must be
    freed when it returns (a reference leaked per GEMM once kept them all alive)."""
    n = 2048
    graph = lossforge.prepare_graph(random_graph(gen, n, 8 * n)[0].to(device), n)
    z = torch.randn(n, 16, generator=gen).to(device).requires_grad_()

    def step():
        lossforge.pairwise_contrastive_loss(z, graph).backward()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
    else:
        before = _resident_mb()
        for _ in range(12):
            step()
        assert _resident_mb() - before < 64  # the leak was >= 8 MiB per call, ~200 MB here


# ---- gradcheck and opcheck ---------------------------------------------------------------------


def test_gradcheck(device, gen):
    n = 9
    ei, w = random_graph(gen, n, 30)
    ei, w = ei.to(device), w.to(device)
    z = torch.randn(n, 3, generator=gen, dtype=f64, device="cpu").to(device).requires_grad_()
    q = torch.softmax(torch.randn(n, 3, generator=gen, dtype=f64), 1).to(device).requires_grad_()
    labels = torch.randint(0, 3, (n,), generator=gen).to(device)
    graph = lossforge.prepare_graph(ei, n, w)
    assert torch.autograd.gradcheck(lambda x: lossforge.pamc_loss(x, graph, assignment=labels, tau=1.3,
                                                                   reduction="none"), (z,))
    assert torch.autograd.gradcheck(lambda x, y: lossforge.pamc_loss(x, graph, assignment=y, soft=True), (z, q))
    assert torch.autograd.gradcheck(lambda x: pamc._pairwise_rows(x, graph, 0.8, 2, 4), (z,))


def test_double_backward_is_refused(gen):
    n = 12
    ei, w = random_graph(gen, n, 40)
    z = torch.randn(n, 3, generator=gen, dtype=f64, requires_grad=True)
    labels = torch.randint(0, 3, (n,), generator=gen)
    with pytest.raises(RuntimeError, match="pamc_loss does not support double backward"):
        torch.autograd.grad(lossforge.pamc_loss(z, ei, w, assignment=labels), z, create_graph=True)
    with pytest.raises(RuntimeError, match="pairwise_contrastive_loss does not support double backward"):
        torch.autograd.grad(lossforge.pairwise_contrastive_loss(z, ei, w), z, create_graph=True)


def _opcheck_args(gen, device, dtype=f64):
    n = 11
    ei, w = random_graph(gen, n, 40)
    graph = lossforge.prepare_graph(ei.to(device), n, w.to(device))
    z = torch.randn(n, 4, generator=gen, dtype=dtype).to(device)
    return n, ei.to(device), graph, z, graph.weight.to(dtype)


def test_opcheck(device, gen):
    n, ei, g, z, w = _opcheck_args(gen, device)
    rz = z.clone().requires_grad_()
    csr = (g.rowptr, g.col, w, g.colptr, g.trow, g.tedge)
    if device == "cpu":
        torch.library.opcheck(ops.pamc_build_csr.default, (ei[0].contiguous(), ei[1].contiguous(), n))
    torch.library.opcheck(ops.pamc_positive.default, (rz, *csr, 1.5, 1e-10))
    lse, u, inv = ops.pamc_positive(z, *csr, 1.5, 1e-10)
    torch.testing.assert_close(u, F.normalize(z, dim=1, eps=1e-12))
    torch.testing.assert_close(inv, 1 / z.norm(dim=1))
    grad = torch.randn(n, generator=gen, dtype=f64).to(device)
    torch.library.opcheck(ops.pamc_positive_backward.default, (grad, u, inv, *csr, lse, 1.5))
    labels = torch.randint(0, 3, (n,), generator=gen).to(device)
    torch.library.opcheck(ops.pamc_segment_sum.default, (rz, labels, 4))
    torch.library.opcheck(ops.pairwise_contrastive.default, (rz, *csr, 0.7, 4, 3))
    _, stats = ops.pairwise_contrastive(z, *csr, 0.7, 4, 3)
    torch.library.opcheck(ops.pairwise_contrastive_backward.default, (grad, z, *csr, stats, 0.7, 4, 3))


def test_float32_opcheck(gen):
    n, ei, g, z, w = _opcheck_args(gen, "cpu", torch.float32)
    csr = (g.rowptr, g.col, w, g.colptr, g.trow, g.tedge)
    torch.library.opcheck(ops.pamc_positive.default, (z.requires_grad_(), *csr, 1.0, 1e-10))
    torch.library.opcheck(ops.pairwise_contrastive.default, (z, *csr, 1.0, 5, 5))


def test_build_csr_layout(gen):
    n, E = 30, 200
    row, col = torch.randint(0, n, (E,), generator=gen), torch.randint(0, n, (E,), generator=gen)
    rowptr, col_s, perm, colptr, trow, tedge = ops.pamc_build_csr(row, col, n)
    expected_perm = torch.argsort(row, stable=True)
    assert torch.equal(perm, expected_perm) and torch.equal(col_s, col[expected_perm])
    assert torch.equal(rowptr, torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(row, minlength=n).cumsum(0)]))
    t = torch.argsort(col_s, stable=True)
    assert torch.equal(tedge, t) and torch.equal(trow, row[expected_perm][t])
    assert torch.equal(colptr, torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(col, minlength=n).cumsum(0)]))


def test_torch_csr_builder_matches_the_counting_sort(gen):
    """The CSR layout built from torch's sorts (the path on CUDA) equals the C++ counting sort."""
    n, E = 25, 300
    row, col = torch.randint(0, n, (E,), generator=gen), torch.randint(0, n, (E,), generator=gen)
    row[:30] = 3  # a long row, and rows and columns without entries
    for a, b in zip(pamc._csr_from_edges_torch(row, col, n), ops.pamc_build_csr(row, col, n)):
        assert torch.equal(a, b)
    empty = torch.zeros(0, dtype=torch.long)
    for a, b in zip(pamc._csr_from_edges_torch(empty, empty, 4), ops.pamc_build_csr(empty, empty, 4)):
        assert torch.equal(a, b)


def test_thread_count_does_not_change_bits(gen):
    """Our kernels (the positive term and its backward, the segment sums) give the same bits on 1 and 2
    threads. The k x k meta-node term goes through torch's GEMM and reductions, which may round differently
    with the thread count on some CPUs (on an AVX-512 machine the z-gradient moved by 2.3e-10): the loss and
    its gradient agree to rounding, which is all that holds on every x86-64 machine."""
    n = 300
    ei, w = random_graph(gen, n, 3000)
    z = torch.randn(n, 32, generator=gen)
    labels = torch.randint(0, 7, (n,), generator=gen)
    graph = lossforge.prepare_graph(ei, n, w.float())
    csr = (graph.rowptr, graph.col, graph.weight.float(), graph.colptr, graph.trow, graph.tedge)
    grad = torch.randn(n, generator=gen)
    threads = torch.get_num_threads()
    kernels, results = [], []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            lse, u, inv = ops.pamc_positive(z, *csr, 1.0, 1e-10)
            kernels.append([lse, u, inv, ops.pamc_positive_backward(grad, u, inv, *csr, lse, 1.0),
                            *ops.pamc_segment_sum(z, labels, 7)])
            zz = z.clone().requires_grad_()
            loss = lossforge.pamc_loss(zz, graph, assignment=labels)
            results.append((loss.detach(), torch.autograd.grad(loss, zz)[0]))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*kernels):
        assert torch.equal(a, b)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# ---- edge sizes ----------------------------------------------------------------------------------


def test_edge_sizes(gen):
    # one node, no edges, one cluster: positive term -log(1e-10), meta term log(1 + 1e-10)
    z = torch.randn(1, 1, dtype=f64, requires_grad=True)
    empty = torch.zeros(2, 0, dtype=torch.long)
    out = lossforge.pamc_loss(z, empty, assignment=torch.zeros(1, dtype=torch.long))
    assert out.item() == pytest.approx(-math.log(1e-10) + math.log(1 + 1e-10), rel=1e-14)
    assert torch.autograd.grad(out, z)[0].item() == 0.0
    assert lossforge.pairwise_contrastive_loss(z, empty).item() == pytest.approx(-math.log(1e-8), rel=1e-14)
    # a single self-loop: P = w
    out = lossforge.pamc_loss(z, torch.zeros(2, 1, dtype=torch.long), torch.tensor([3.0], dtype=f64),
                              assignment=torch.zeros(1, dtype=torch.long))
    assert out.item() == pytest.approx(-math.log(3.0 + 1e-10) + math.log(1 + 1e-10), rel=1e-14)
    # d = 1, all nodes in one cluster, zero-weight edges are no edges
    n = 8
    z = torch.randn(n, 1, generator=gen, dtype=f64)
    ei, w = random_graph(gen, n, 20)
    w[::2] = 0.0
    keep = w > 0
    a = lossforge.pamc_loss(z, ei, w, assignment=torch.zeros(n, dtype=torch.long))
    b = lossforge.pamc_loss(z, ei[:, keep], w[keep], assignment=torch.zeros(n, dtype=torch.long))
    assert a.item() == b.item()
    assert a.item() == pytest.approx(oracle_pamc(z, ei, w, torch.zeros(n, dtype=torch.long), 1.0), rel=1e-12)


# ---- influence matrix and the generator -------------------------------------------------------------


@pytest.mark.parametrize("order,influence", [(1, True), (2, True), (3, False), (4, True)])
def test_influence_matrix_matches_scipy(gen, order, influence):
    n = 40
    ei, _ = random_graph(gen, n, 70, isolated=(9,))  # self-loops and duplicates in the input are absorbed
    out_ei, out_w = lossforge.influence_matrix(ei, n, order=order, influence=influence, dtype=f64)
    assert out_ei.dtype == torch.long and out_w.dtype == f64
    assert torch.all(out_ei[0, 1:] >= out_ei[0, :-1])  # sorted by row
    dense = ref.gamma_dense(out_ei, n, out_w).numpy()
    np.testing.assert_allclose(dense, oracle_influence(ei, n, order, influence), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dense, ref.influence_matrix_dense(ei, n, order, influence).numpy(), rtol=1e-12,
                               atol=1e-15)
    if not influence:
        np.testing.assert_allclose(dense.sum(1), 1.0, rtol=1e-12)  # powers of a row-stochastic matrix


def test_influence_matrix_float32_default(gen):
    ei, _ = random_graph(gen, 20, 30)
    out_ei, out_w = lossforge.influence_matrix(ei, 20)
    assert out_w.dtype == torch.float32 and out_ei.shape[1] == out_w.shape[0]


def test_stochastic_block_model():
    g = lossforge.stochastic_block_model(3000, 6, avg_degree=12.0, homophily=0.75, num_features=5, seed=3)
    again = lossforge.stochastic_block_model(3000, 6, avg_degree=12.0, homophily=0.75, num_features=5, seed=3)
    other = lossforge.stochastic_block_model(3000, 6, avg_degree=12.0, homophily=0.75, num_features=5, seed=4)
    assert torch.equal(g.edge_index, again.edge_index) and torch.equal(g.labels, again.labels)
    assert torch.equal(g.features, again.features)
    assert not torch.equal(g.labels, other.labels)
    row, col = g.edge_index
    n = 3000
    assert g.labels.shape == (n,) and g.features.shape == (n, 5) and g.features.dtype == torch.float32
    assert torch.bincount(g.labels).tolist() == [500] * 6
    assert bool((row != col).all())  # no self-loops
    code = row * n + col
    assert torch.unique(code).numel() == code.numel()  # no duplicates
    assert torch.all(code[1:] > code[:-1])  # sorted
    assert torch.equal(torch.sort(col * n + row).values, code)  # symmetric
    # mean degree and homophily: Binomial counts, 5 standard deviations of slack
    m = row.numel() / 2
    expected_m = n * 12.0 / 2
    assert abs(m - expected_m) < 5 * math.sqrt(expected_m)
    intra = (g.labels[row] == g.labels[col]).float().mean().item()
    assert abs(intra - 0.75) < 5 * math.sqrt(0.75 * 0.25 / m)
    # blocks are the features' signal: each block's mean feature is its own
    means = torch.stack([g.features[g.labels == a].mean(0) for a in range(6)])
    assert torch.cdist(means, means).fill_diagonal_(1e9).min() > 0.1


def test_stochastic_block_model_edge_cases():
    g = lossforge.stochastic_block_model(5, 5, avg_degree=2.0, homophily=0.0, seed=1)  # blocks of one node
    assert bool((g.labels[g.edge_index[0]] != g.labels[g.edge_index[1]]).all())
    g = lossforge.stochastic_block_model(10, 1, avg_degree=9.0, homophily=1.0, seed=1)  # a complete graph
    assert g.edge_index.shape[1] == 90
    empty = lossforge.stochastic_block_model(0, 1, seed=0)
    assert empty.edge_index.shape == (2, 0) and empty.labels.shape == (0,)
    with pytest.raises(ValueError, match="avg_degree=50"):
        lossforge.stochastic_block_model(20, 2, avg_degree=50.0)
    with pytest.raises(ValueError, match="num_blocks"):
        lossforge.stochastic_block_model(20, 0)
    with pytest.raises(ValueError, match="homophily"):
        lossforge.stochastic_block_model(20, 2, homophily=1.5)


# ---- the module --------------------------------------------------------------------------------


def test_module_matches_functional_and_caches_the_graph(gen):
    n = 50
    ei, w = random_graph(gen, n, 200)
    z = torch.randn(n, 6, generator=gen, dtype=f64, requires_grad=True)
    q = torch.softmax(torch.randn(n, 4, generator=gen, dtype=f64), 1)
    loss_fn = lossforge.nn.PamCLoss(tau=0.7)
    assert "tau=0.7" in repr(loss_fn)
    a = loss_fn(z, ei, w, assignment=q)
    b = lossforge.pamc_loss(z, ei, w, assignment=q, tau=0.7)
    assert a.item() == b.item()
    cached = loss_fn._graphs._graph
    loss_fn(z, ei, w, assignment=q)
    assert loss_fn._graphs._graph is cached  # same tensors: reused
    w.mul_(2.0)  # changed in place: prepared again
    c = loss_fn(z, ei, w, assignment=q)
    assert loss_fn._graphs._graph is not cached
    assert c.item() == lossforge.pamc_loss(z, ei, w, assignment=q, tau=0.7).item()
    soft = lossforge.nn.PamCLoss(soft=True, reduction="sum")
    qq = q.clone().requires_grad_()
    soft(z, ei, w, assignment=qq).backward()
    assert qq.grad is not None and qq.grad.abs().sum() > 0


# ---- bad input ---------------------------------------------------------------------------------


def _bad_setup(gen):
    n = 10
    ei, w = random_graph(gen, n, 30)
    z = torch.randn(n, 3, generator=gen, dtype=f64)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return n, ei, w, z, labels


def test_bad_edges(gen):
    n, ei, w, z, labels = _bad_setup(gen)
    bad = ei.clone()
    bad[1, 7] = n
    with pytest.raises(ValueError, match=f"pamc_loss: edge_index has node index {n} at edge 7, out of range for {n}"):
        lossforge.pamc_loss(z, bad, w, assignment=labels)
    bad[1, 7] = -1
    with pytest.raises(ValueError, match="node index -1 at edge 7"):
        lossforge.pairwise_contrastive_loss(z, bad, w)
    with pytest.raises(ValueError, match="out of range"):
        lossforge.influence_matrix(bad, n)
    with pytest.raises(ValueError, match=r"edge_index must have shape \[2, E\], got \[3, 10\]"):
        lossforge.pamc_loss(z, torch.zeros(3, 10, dtype=torch.long), assignment=labels)
    with pytest.raises(TypeError, match="edge_index must hold int64 node indices, got torch.float32"):
        lossforge.pamc_loss(z, ei.float(), assignment=labels)
    with pytest.raises(TypeError, match="a \\(rowptr, col\\) tuple or a PamCGraph, got dict"):
        lossforge.pamc_loss(z, {"edges": ei}, assignment=labels)
    with pytest.raises(TypeError, match="read as a CSR graph \\(rowptr, col\\) of int64 tensors, but rowptr is list"):
        lossforge.pamc_loss(z, ei.tolist(), assignment=labels)
    with pytest.raises(ValueError, match="CSR rowptr must have num_nodes \\+ 1 = 11 entries, got 10"):
        lossforge.pamc_loss(z, (torch.zeros(10, dtype=torch.long), ei[1]), assignment=labels)
    rowptr = torch.zeros(n + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="CSR rowptr must start at 0, never decrease and end at len"):
        lossforge.pamc_loss(z, (rowptr, ei[1]), assignment=labels)
    graph = lossforge.prepare_graph(ei, n + 1, w)
    with pytest.raises(ValueError, match="the graph has 11 nodes but z has 10 rows"):
        lossforge.pamc_loss(z, graph, assignment=labels)
    with pytest.raises(ValueError, match="a PamCGraph carries its weights"):
        lossforge.pamc_loss(z, lossforge.prepare_graph(ei, n), w, assignment=labels)


def test_bad_weights(gen):
    n, ei, w, z, labels = _bad_setup(gen)
    neg = w.clone()
    neg[4] = -0.5
    with pytest.raises(ValueError, match="edge_weight must be finite and non-negative, got -0.5 at edge 4"):
        lossforge.pamc_loss(z, ei, neg, assignment=labels)
    neg[4] = float("nan")
    with pytest.raises(ValueError, match="finite and non-negative, got nan at edge 4"):
        lossforge.pairwise_contrastive_loss(z, ei, neg)
    with pytest.raises(ValueError, match=r"edge_weight must have shape \[30\] \(one weight per edge\), got \[29\]"):
        lossforge.pamc_loss(z, ei, w[:-1], assignment=labels)
    with pytest.raises(TypeError, match="edge_weight must be a floating-point tensor, got torch.int64"):
        lossforge.pamc_loss(z, ei, torch.ones(30, dtype=torch.long), assignment=labels)
    with pytest.raises(ValueError, match="edge_weight must not require grad"):
        lossforge.pamc_loss(z, ei, w.clone().requires_grad_(), assignment=labels)


def test_bad_embeddings_and_options(gen):
    n, ei, w, z, labels = _bad_setup(gen)
    with pytest.raises(TypeError, match="z must be float32 or float64, got torch.bfloat16"):
        lossforge.pamc_loss(z.bfloat16(), ei, w, assignment=labels)
    with pytest.raises(TypeError, match="z must be a torch.Tensor, got list"):
        lossforge.pairwise_contrastive_loss(z.tolist(), ei, w)
    with pytest.raises(ValueError, match=r"z must have shape \[num_nodes, dim\], got \[10\]"):
        lossforge.pamc_loss(z[:, 0], ei, w, assignment=labels)
    with pytest.raises(ValueError, match="z has no rows"):
        lossforge.pamc_loss(z[:0], ei[:, :0], w[:0], assignment=labels[:0])
    with pytest.raises(ValueError, match="tau must be finite, got nan"):
        lossforge.pamc_loss(z, ei, w, assignment=labels, tau=float("nan"))
    with pytest.raises(TypeError, match="tau must be a float, got str"):
        lossforge.pairwise_contrastive_loss(z, ei, w, tau="1")
    with pytest.raises(ValueError, match="reduction must be one of"):
        lossforge.pamc_loss(z, ei, w, assignment=labels, reduction="max")
    with pytest.raises(ValueError, match="reduction must be one of"):
        lossforge.nn.PamCLoss(reduction="avg")
    with pytest.raises(TypeError, match="assignment is required"):
        lossforge.pamc_loss(z, ei, w)


def test_bad_assignments(gen):
    n, ei, w, z, labels = _bad_setup(gen)
    with pytest.raises(ValueError, match=r"hard assignment must have shape \[10\] \(one label per node\), got \[9\]"):
        lossforge.pamc_loss(z, ei, w, assignment=labels[:-1])
    with pytest.raises(ValueError, match=r"soft assignment must have shape \[10, k\], got \[10\]"):
        lossforge.pamc_loss(z, ei, w, assignment=labels.double())
    with pytest.raises(ValueError, match="soft=True needs soft assignments"):
        lossforge.pamc_loss(z, ei, w, assignment=labels, soft=True)
    bad = labels.clone()
    bad[2] = 5
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\), got 5"):
        lossforge.pamc_loss(z, ei, w, assignment=bad, num_clusters=4)
    bad[2] = -1
    with pytest.raises(ValueError, match="got -1"):
        lossforge.pamc_loss(z, ei, w, assignment=bad)
    with pytest.raises(ValueError, match="num_clusters=3 but assignment has 4 columns"):
        lossforge.pamc_loss(z, ei, w, assignment=torch.rand(n, 4, dtype=f64), num_clusters=3)
    with pytest.raises(TypeError, match="hard assignment must be int64 labels, got torch.bool"):
        lossforge.pamc_loss(z, ei, w, assignment=labels > 0)


@pytest.mark.cuda
def test_cuda_labels_out_of_range_with_num_clusters_never_index_out_of_bounds(gen):
    """On CUDA with num_clusters given, labels are not checked (that would synchronise): a label out of
    range leaves its node out of the meta-nodes, forward and backward, instead of a device-side assert."""
    n, ei, w, z, labels = _bad_setup(gen)
    labels[3], labels[8] = 9, -2
    zz = z.cuda().requires_grad_()
    loss = lossforge.pamc_loss(zz, ei.cuda(), w.cuda(), assignment=labels.cuda(), num_clusters=3)
    (g,) = torch.autograd.grad(loss, zz)
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_cpp_checks_reject_what_python_would(gen):
    """Called directly, the ops refuse bad indices instead of reading out of bounds."""
    n, ei, w, z, labels = _bad_setup(gen)
    g = lossforge.prepare_graph(ei, n, w)
    csr = [g.rowptr, g.col.clone(), g.weight, g.colptr, g.trow, g.tedge]
    csr[1][3] = n + 5
    with pytest.raises(RuntimeError, match=f"pamc_positive: edge 3 points at node {n + 5}, out of range"):
        ops.pamc_positive(z, *csr, 1.0, 1e-10)
    csr[1] = g.col
    neg = g.weight.clone()
    neg[0] = -1.0
    with pytest.raises(RuntimeError, match="edge weights must be non-negative, got -1 at edge 0"):
        ops.pairwise_contrastive(z, g.rowptr, g.col, neg, g.colptr, g.trow, g.tedge, 1.0, 4, 4)
    with pytest.raises(RuntimeError, match="rowptr must start at 0 and end at the number of edges"):
        ops.pamc_positive(z, g.rowptr, g.col[:-1].contiguous(), g.weight[:-1].contiguous(),
                          g.colptr, g.trow, g.tedge, 1.0, 1e-10)
    with pytest.raises(RuntimeError, match="rowptr must have 11 entries, got 10"):
        ops.pamc_positive(z, g.rowptr[:-1].contiguous(), g.col, g.weight, g.colptr, g.trow, g.tedge, 1.0, 1e-10)
    with pytest.raises(RuntimeError, match="edge 2 has target node -3"):
        ops.pamc_build_csr(ei[0].contiguous(), torch.tensor([0, 1, -3] + [0] * 27), n)
    with pytest.raises(RuntimeError, match=r"label 7 of node 0 is out of range \[0, 3\)"):
        ops.pamc_segment_sum(z, torch.full((n,), 7), 3)
    with pytest.raises(RuntimeError, match="block_rows and block_cols must be positive"):
        ops.pairwise_contrastive(z, g.rowptr, g.col, g.weight, g.colptr, g.trow, g.tedge, 1.0, 0, 4)
    with pytest.raises(RuntimeError, match="z must be float32 or float64, got float16"):
        ops.pamc_positive(z.half(), *[g.rowptr, g.col, g.weight, g.colptr, g.trow, g.tedge], 1.0, 1e-10)


def test_fake_kernels_check_like_the_kernels(gen):
    """Shape and dtype errors of a direct op call are the same in eager and under the fake kernels (what
    torch.compile traces with)."""
    n, ei, w, z, labels = _bad_setup(gen)
    g = lossforge.prepare_graph(ei, n, w)
    csr = [g.rowptr, g.col, g.weight, g.colptr, g.trow, g.tedge]
    lse, u, inv = ops.pamc_positive(z, *csr, 1.0, 1e-10)
    loss, stats = ops.pairwise_contrastive(z, *csr, 1.0, 4, 4)
    cases = [
        (ops.pamc_positive, z.half(), *csr, 1.0, 1e-10),
        (ops.pamc_positive, z[None], *csr, 1.0, 1e-10),
        (ops.pamc_positive, z.t(), *csr, 1.0, 1e-10),
        (ops.pamc_positive, z, *csr, math.inf, 1e-10),
        (ops.pamc_positive, z, *csr, 1.0, -1.0),
        (ops.pamc_positive, z, g.rowptr[:-1].contiguous(), *csr[1:], 1.0, 1e-10),
        (ops.pamc_positive, z, g.rowptr, g.col.int(), *csr[2:], 1.0, 1e-10),
        (ops.pamc_positive, z, *csr[:2], g.weight.float(), *csr[3:], 1.0, 1e-10),
        (ops.pamc_positive, z, *csr[:5], g.tedge[:-1].contiguous(), 1.0, 1e-10),
        (ops.pamc_positive_backward, lse[:-1].contiguous(), u, inv, *csr, lse, 1.0),
        (ops.pamc_positive_backward, lse, u, inv.float(), *csr, lse, 1.0),
        (ops.pamc_segment_sum, z, labels[:-1].contiguous(), 3),
        (ops.pamc_segment_sum, z, labels.int(), 3),
        (ops.pamc_segment_sum, z, labels, -1),
        (ops.pamc_build_csr, ei[0].contiguous(), ei[1, :-1].contiguous(), n),
        (ops.pamc_build_csr, ei[0].contiguous(), ei[1].contiguous(), -1),
        (ops.pairwise_contrastive, z, *csr, 1.0, 0, 4),
        (ops.pairwise_contrastive, z, *csr[:2], g.weight[:-1].contiguous(), *csr[3:], 1.0, 4, 4),
        (ops.pairwise_contrastive_backward, loss, z, *csr, stats[:, :1].contiguous(), 1.0, 4, 4),
        (ops.pairwise_contrastive_backward, loss[:-1].contiguous(), z, *csr, stats, 1.0, 4, 4),
    ]
    for fn, *args in cases:
        same_error_eager_and_fake(fn, *args)


# ---- torch.compile -------------------------------------------------------------------------------

# The public entry points the compile tests below cover (the lead's test checks the union over families).
COMPILE_ENTRY_POINTS = (
    "lossforge.pamc_loss",
    "lossforge.pairwise_contrastive_loss",
    "lossforge.prepare_graph",
    "lossforge.influence_matrix",
    "lossforge.stochastic_block_model",
    "lossforge.nn.PamCLoss",
)


def _same_value_and_grad(fn, z, *args):
    """fn(z, *args) compiled and eager: the same loss and the same gradient in z."""
    a, b = fn[0](z, *args), fn[1](z, *args)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a.sum(), z)[0], torch.autograd.grad(b.sum(), z)[0])


@pytest.mark.slow
def test_compile_fullgraph_with_a_prepared_graph(gen):
    """With a PamCGraph both losses trace as one graph: soft Q, the argmax of Q, hard labels with
    num_clusters, and the module."""
    n, k = 24, 3
    ei, w = random_graph(gen, n, 80)
    graph = lossforge.prepare_graph(ei, n, w.float())
    z = torch.randn(n, 5, generator=gen, requires_grad=True)
    q = torch.softmax(torch.randn(n, k, generator=gen), 1)
    labels = torch.randint(0, k, (n,), generator=gen)
    module = lossforge.nn.PamCLoss(tau=0.5, reduction="sum", num_clusters=k)
    cases = [
        (lambda z, q: lossforge.pamc_loss(z, graph, assignment=q, soft=True), q),
        (lambda z, q: lossforge.pamc_loss(z, graph, assignment=q, reduction="none"), q),
        (lambda z, y: lossforge.pamc_loss(z, graph, assignment=y, num_clusters=k, tau=2.0), labels),
        (lambda z: lossforge.pairwise_contrastive_loss(z, graph, tau=0.7),),
        (lambda z, y: module(z, graph, assignment=y), labels),
    ]
    for fn, *args in cases:
        _same_value_and_grad((compiled(fn, fullgraph=True), fn), z, *args)
    # the kernel checks the labels' range inside the graph
    bad = labels.clone()
    bad[5] = k
    with pytest.raises(RuntimeError, match=rf"label {k} of node 5 is out of range \[0, {k}\)"):
        compiled(cases[2][0], fullgraph=True)(z, bad)
    # NaN in Q propagates through the argmax in the graph too
    q_nan = q.clone()
    q_nan[2, 1] = math.nan
    assert torch.isnan(compiled(cases[1][0], fullgraph=True)(z, q_nan)).all()


@pytest.mark.slow
def test_compile_host_decisions_with_graph_breaks(gen):
    """Validating raw edges (pamc_loss, pairwise_contrastive_loss, PamCLoss's graph cache, prepare_graph),
    k = max label + 1, building Γ (data-dependent nnz) and the seeded host generator of the stochastic
    block model are host decisions: they compile with graph breaks and give eager's results."""
    n, k = 24, 3
    ei, w = random_graph(gen, n, 80)
    w = w.float()
    z = torch.randn(n, 5, generator=gen, requires_grad=True)
    q = torch.softmax(torch.randn(n, k, generator=gen), 1)
    labels = torch.randint(0, k, (n,), generator=gen)
    module = lossforge.nn.PamCLoss()
    for fn, *args in [
        (lambda z, q: lossforge.pamc_loss(z, ei, w, assignment=q), q),
        (lambda z, y: lossforge.pamc_loss(z, ei, w, assignment=y), labels),
        (lambda z: lossforge.pairwise_contrastive_loss(z, ei, w),),
        (lambda z, q: module(z, ei, w, assignment=q), q),
    ]:
        _same_value_and_grad((compiled(fn, fullgraph=False), fn), z, *args)
    a, b = compiled(lossforge.prepare_graph, False)(ei, n, w), lossforge.prepare_graph(ei, n, w)
    assert a.num_nodes == b.num_nodes and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    bad = ei.clone()
    bad[1, 4] = n
    with pytest.raises(ValueError, match=f"node index {n} at edge 4"):
        compiled(lossforge.prepare_graph, False)(bad, n, w)
    a, b = compiled(lossforge.influence_matrix, False)(ei, n, 2), lossforge.influence_matrix(ei, n, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    a = compiled(lambda: lossforge.stochastic_block_model(40, 2, avg_degree=3.0, num_features=2, seed=3), False)()
    b = lossforge.stochastic_block_model(40, 2, avg_degree=3.0, num_features=2, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_booleans_are_keyword_only(gen):
    n, ei, w, z, labels = _bad_setup(gen)
    q = torch.softmax(z, 1)
    with pytest.raises(TypeError, match="positional argument"):
        lossforge.pamc_loss(z, ei, w, q, 1.0, True)
    with pytest.raises(TypeError, match="positional argument"):
        lossforge.pairwise_contrastive_loss(z, ei, w, 1.0)
    with pytest.raises(TypeError, match="positional argument"):
        lossforge.influence_matrix(ei, n, 2, False)
    with pytest.raises(TypeError, match="positional argument"):
        lossforge.nn.PamCLoss(1.0, True)
    with pytest.raises(TypeError, match="soft must be a bool, got str"):
        lossforge.nn.PamCLoss(soft="yes")


def test_errors_name_the_problem(gen):
    z = torch.randn(6, 3, generator=gen)
    ei = torch.tensor([[0, 1], [1, 2]])
    labels = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"pamc_loss: the meta-nodes of 1099511627776 clusters .* do not fit in "
                                         r"memory: is num_clusters=1099511627776 right\?"):
        lossforge.pamc_loss(z, ei, assignment=labels, num_clusters=2**40)
    for fn in (lambda tau: lossforge.pamc_loss(z, ei, assignment=labels, tau=tau),
               lambda tau: lossforge.pairwise_contrastive_loss(z, ei, tau=tau)):
        with pytest.raises(ValueError, match=r"\|tau\| must be at most 8.389e\+06 for float32 z, got 1e\+300"):
            fn(1e300)  # was a NaN loss
        assert torch.isfinite(fn(8e6))
    assert torch.isfinite(lossforge.pamc_loss(z.double(), ei, assignment=labels, tau=1e15))
