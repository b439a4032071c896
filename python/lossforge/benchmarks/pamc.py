"""PamC benchmark cases for `lossforge bench`: forward + backward (gradient w.r.t. z) of

- lossforge.pamc_loss (ours) against the authors' sparse PamC recipe (E×d gathers, n×k×d one-hot), the
  dense all-pairs loss as the authors' code computes it (n×n buffers, dense Γ), and lossforge's tiled
  exact pairwise loss;
- lossforge.pairwise_contrastive_loss (ours, tiled, no n×n buffer) against the same dense n×n loss.

Graphs: a seeded stochastic block model with 10 edges per node, Γ = D̃⁻¹(A + I) (influence_matrix,
order 1: about 11 entries per row). Embeddings float32 [n, d], DEC-style soft assignments [n, k] with
every cluster non-empty (the authors' code needs that), tau = 1.

Default: n = 5000, d = 64, k = 10. --full: n ∈ {5000, 20000} × (d, k) ∈ {(64, 10), (128, 100)} on the
CPU (the dense baseline at n = 20000 only for d = 64, k = 10: ~14 GB and minutes per call); on CUDA
n = 100000 with 2M edges, d = 128, k = 100 (no dense n×n baseline there: 40 GB per buffer). The dense
baseline is skipped, with a note, when the machine does not have the memory it needs.
"""
from __future__ import annotations

import functools
import time

import torch

from ..bench import Case

FAMILY = "pamc"
TAU = 1.0


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _dense_fits(n: int, device: str) -> bool:
    """The authors' dense loss holds about 8 n×n float32 buffers at its peak beyond its inputs (measured:
    8.0 at n = 2500 and 5000), plus the dense Γ it reads: 9 n×n buffers; ask for 8% more than that."""
    need = 9 * 4 * n * n * 1.08
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return free > need
    avail = _mem_available_bytes()
    return avail is None or avail > need


@functools.lru_cache(maxsize=None)
def _rates(device: str) -> tuple[float, float]:
    """(GEMM flop/s, copy bytes/s) measured here, for the floors."""
    a = torch.randn(2048, 128, device=device)
    b = torch.randn(128, 2048, device=device)
    x = torch.empty(32 * 2**20, device=device)
    y = torch.empty_like(x)

    def best(fn, reps=5):
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = min(t, time.perf_counter() - t0)
        return t

    flops = 2 * 2048 * 128 * 2048 / best(lambda: a @ b)
    bandwidth = 2 * x.numel() * 4 / best(lambda: y.copy_(x))
    return flops, bandwidth


def _inputs(n: int, d: int, k: int, avg_degree: float, device: str, dense: bool):
    import lossforge
    from lossforge.reference import pamc as ref

    g = lossforge.stochastic_block_model(n, k, avg_degree=avg_degree, homophily=0.8, seed=0)
    ei, w = lossforge.influence_matrix(g.edge_index, n, order=1)
    ei, w = ei.to(device), w.to(device)
    graph = lossforge.prepare_graph(ei, n, w)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, d, generator=gen).to(device).requires_grad_()
    q = torch.softmax(3 * torch.randn(n, k, generator=gen), 1)
    q[torch.arange(k), torch.arange(k)] += 10.0  # every cluster keeps at least one node under argmax
    q = (q / q.sum(1, keepdim=True)).to(device)
    gamma = ref.gamma_dense(ei, n, w, dtype=torch.float32) if dense else None
    return z, ei, w, graph, q, gamma


def _fwd_bwd(loss_fn):
    def run(z, *args):
        loss = loss_fn(z, *args)
        (grad,) = torch.autograd.grad(loss, z)
        return loss.detach(), grad

    return run


def _pamc(z, ei, w, graph, q, gamma):
    import lossforge

    return lossforge.pamc_loss(z, graph, assignment=q, tau=TAU)


def _pamc_authors(z, ei, w, graph, q, gamma):
    from lossforge.reference import pamc as ref

    return ref.pamc_loss_authors(z, ei, w, q, tau=TAU)


def _pairwise_tiled(z, ei, w, graph, q, gamma):
    import lossforge

    return lossforge.pairwise_contrastive_loss(z, graph, tau=TAU)


def _pairwise_dense(z, ei, w, graph, q, gamma):
    from lossforge.reference import pamc as ref

    return ref.pairwise_contrastive_loss_authors(z, gamma, tau=TAU)


def _close(a, b, what, rtol=2e-4, atol=1e-6):
    la, ga = a
    lb, gb = b
    if not torch.allclose(la.double(), lb.double(), rtol=rtol, atol=atol):
        raise AssertionError(f"pamc bench: {what}: losses differ ({la.item()} vs {lb.item()})")
    scale = ga.abs().max().clamp_min(1e-30)
    err = (ga.double() - gb.double()).abs().max() / scale
    if err > 1e-3:
        raise AssertionError(f"pamc bench: {what}: gradients differ (max error {err:.3g} of the largest entry)")


def _check_pamc(results):
    ours = results["lossforge"]
    _close(results["authors PamC (torch, E×d gather)"], ours, "authors' PamC vs lossforge")
    tiled = results.get("tiled pairwise (lossforge)")
    dense = results.get("dense pairwise n×n (authors)")
    if tiled is not None and dense is not None:
        _close(dense, tiled, "dense vs tiled pairwise")


def _check_pairwise(results):
    _close(results["dense pairwise n×n (authors)"], results["lossforge"], "dense vs tiled pairwise")


def _shape(n, d, k, deg):
    return f"n={n // 1000}k deg={deg:g} d={d} k={k}"


def cases(device: str, full: bool) -> list[Case]:
    if device.startswith("cuda"):
        sizes = [(100_000, 128, 100, 20.0)] if full else [(20_000, 64, 10, 10.0)]
    else:
        sizes = [(5000, 64, 10, 10.0)]
        if full:
            sizes += [(5000, 128, 100, 10.0), (20_000, 64, 10, 10.0), (20_000, 128, 100, 10.0)]
    flops, bandwidth = _rates(device)
    out = []
    for n, d, k, deg in sizes:
        # the dense baseline at n = 20k only at the headline shape (d = 64, k = 10): ~14 GB and minutes per call
        wanted = n < 20_000 or (n == 20_000 and d == 64)
        dense = wanted and _dense_fits(n, device)
        E = int(n * (deg + 1))  # Γ's entries: the edges and one self-loop per node (about)
        setup = functools.partial(_inputs, n, d, k, deg, dense=dense)
        # PamC floor: the edge work (a d-long dot per edge forward, a dot and two axpys backward) at the
        # GEMM rate, or its traffic (one d-row of z per edge per pass, 3 passes) at the copy bandwidth.
        pamc_floor = max(2 * 4 * E * d / flops, 3 * 4 * E * d / bandwidth) * 1e3
        impls = {
            "lossforge": _fwd_bwd(_pamc),
            "authors PamC (torch, E×d gather)": _fwd_bwd(_pamc_authors),
            "tiled pairwise (lossforge)": _fwd_bwd(_pairwise_tiled),
        }
        if dense:
            impls["dense pairwise n×n (authors)"] = _fwd_bwd(_pairwise_dense)
        note = ""
        if wanted and not dense:
            note = f"dense n×n baseline skipped: not enough free memory for n={n}"
        out.append(Case(FAMILY, "pamc_loss fwd+bwd", _shape(n, d, k, deg), impls, setup, check=_check_pamc,
                        floor_ms=pamc_floor, note=note))
        if dense and d == 64:
            # Tiled pairwise floor: three n×n×d GEMMs (forward similarities; backward similarities and
            # the weighted sum) at the GEMM rate.
            out.append(Case(FAMILY, "pairwise_contrastive_loss fwd+bwd", _shape(n, d, k, deg),
                            {"lossforge": _fwd_bwd(_pairwise_tiled),
                             "dense pairwise n×n (authors)": _fwd_bwd(_pairwise_dense)},
                            setup, check=_check_pairwise, floor_ms=3 * 2 * n * n * d / flops * 1e3))
    return out
