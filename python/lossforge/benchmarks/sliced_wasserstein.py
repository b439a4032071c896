"""Sliced Wasserstein rows of `lossforge bench`.

Baselines, on the same inputs and the same projections:
- "torch recipe (bmm + sort + pow)": the official code's recipe (project with a batched matmul, torch.sort
  both sides, |difference|^p, mean; autograd for the backward). It keeps about 44 bytes per (b, l, n)
  element alive. The official code sums over the points instead of averaging, without a root (its value is N
  times the unrooted SW_p^p); the recipe here averages so that every implementation computes the same number at the same cost.
- "POT (torch backend)", "POT (numpy)": `ot.sliced_wasserstein_distance` per pair (POT is not batched),
  forward and, with the torch backend, backward.
- v-DSW: our ascent loop (T steps inside lossforge) against the same loop written as in the papers' code
  (recipe per step, torch.optim.Adam on the locations, vMF samples from the same sampler and generator).

Floor: the bytes the fused kernel must move (the points once in, their gradients once out) over the
measured copy bandwidth. The kernel is compute-bound (sorting in cache), so it sits far above this
floor; the README states its sort throughput per slice.
"""
from __future__ import annotations

import torch

import lossforge
from lossforge.bench import Case, MissingBaseline, floor_ms

FAMILY = "sliced_wasserstein"


def _inputs(B: int, N: int, M: int, d: int, L: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g)
    y = 0.8 * torch.randn(B, M, d, generator=g) + 0.3
    theta = torch.randn(d, L, generator=g)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return x.to(device), y.to(device), theta.to(device)


def _recipe_per_pair(x, y, theta, p):
    """The official code's recipe: [B] values of mean_l W_p^p."""
    xp = torch.matmul(x, theta).transpose(1, 2)  # [B, L, N]
    yp = torch.matmul(y, theta).transpose(1, 2)
    diff = torch.sort(xp, dim=-1)[0] - torch.sort(yp, dim=-1)[0]
    return diff.abs().pow(p).mean(dim=-1).mean(dim=-1)


def recipe(x, y, theta, p: float = 2.0):
    return _recipe_per_pair(x, y, theta, p).pow(1.0 / p).mean()


def ours(x, y, theta, p: float = 2.0):
    return lossforge.sliced_wasserstein(x, y, projections=theta, p=p)


def _ot():
    """POT, an optional baseline: without it only the POT rows are left out."""
    try:
        import ot
    except ImportError as e:
        raise MissingBaseline("POT is not installed (pip install pot)") from e
    return ot


def pot_torch(x, y, theta, p: float = 2.0):
    ot = _ot()
    vals = [ot.sliced_wasserstein_distance(x[b], y[b], projections=theta, p=p) for b in range(x.shape[0])]
    return torch.stack(vals).mean()


def pot_numpy(x, y, theta, p: float = 2.0):
    ot = _ot()
    xn, yn, tn = x.detach().cpu().numpy(), y.detach().cpu().numpy(), theta.detach().cpu().numpy()
    vals = [ot.sliced_wasserstein_distance(xn[b], yn[b], projections=tn, p=p) for b in range(xn.shape[0])]
    return torch.tensor(sum(vals) / len(vals), dtype=x.dtype)


def forward(fn):
    def run(x, y, theta):
        with torch.no_grad():
            return fn(x, y, theta).detach()
    return run


def forward_backward(fn):
    def run(x, y, theta):
        xg, yg = x.detach().requires_grad_(), y.detach().requires_grad_()
        loss = fn(xg, yg, theta)
        loss.backward()
        return loss.detach(), xg.grad, yg.grad
    return run


def _check(results):
    mine = results["lossforge"]
    mine = mine if isinstance(mine, tuple) else (mine,)
    for name, other in results.items():
        other = other if isinstance(other, tuple) else (other,)
        for a, b in zip(mine, other):
            torch.testing.assert_close(b.to(a.device, a.dtype), a, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} disagrees with lossforge: {m}")


def _sw_cases(B, N, d, L, device, pot: bool) -> list[Case]:
    setup = lambda dev: _inputs(B, N, N, d, L, dev)  # noqa: E731
    shape = f"B={B} N={N} d={d} L={L} float32"
    out = []
    for label, wrap in (("forward", forward), ("forward+backward", forward_backward)):
        points = B * 2 * N * d * 4
        floor = floor_ms(points * (2 if label == "forward+backward" else 1) + d * L * 4, device)
        impls = {"lossforge": wrap(ours), "torch recipe (bmm + sort + pow)": wrap(recipe)}
        if pot:
            impls["POT (torch backend), per pair"] = wrap(pot_torch)
            if label == "forward" and not device.startswith("cuda"):
                impls["POT (numpy), per pair"] = forward(pot_numpy)
        keys = 2 * B * L * N
        note = (f"{keys / 1e6:.1f} M keys sorted per call (2 B L N): sort throughput = keys / ours ms, to set "
                "against the copy bandwidth / 8 B per (key, index); the floor counts only points in and "
                "gradients out (the kernel is compute-bound). The recipe averages |diff|^p over the points like "
                "POT (the papers' code sums them: same cost).")
        out.append(Case(FAMILY, f"sliced_wasserstein {label}", shape, impls, setup, check=_check, floor_ms=floor,
                        note=note))
    return out


# ---------------------------------------------------------------------------------------------------
# v-DSW: T ascent steps on the vMF locations, then the loss with gradients to x and y.


def dsw_ours(x, y, kappa, L, T, lr, seed):
    g = torch.Generator(device=x.device).manual_seed(seed)
    xg, yg = x.detach().requires_grad_(), y.detach().requires_grad_()
    loss = lossforge.distributional_sliced_wasserstein(xg, yg, kappa, n_projections=L, n_iters=T, lr=lr, generator=g)
    loss.backward()
    return loss.detach(), xg.grad


def dsw_recipe(x, y, kappa, L, T, lr, seed):
    """The papers' v-DSW loop: Adam on the locations, the recipe for every step's objective."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    B, _, d = x.shape
    loc = torch.randn(B, d, generator=g, device=x.device, dtype=x.dtype)
    loc = (loc / loc.norm(dim=-1, keepdim=True)).requires_grad_()
    opt = torch.optim.Adam([loc], lr=lr)
    xd, yd = x.detach(), y.detach()
    for _ in range(T):
        theta = lossforge.vmf_sample(loc, kappa, L, generator=g).transpose(1, 2)  # [B, d, L]
        xp = torch.matmul(xd, theta).transpose(1, 2)
        yp = torch.matmul(yd, theta).transpose(1, 2)
        per_pair = (torch.sort(xp, dim=-1)[0] - torch.sort(yp, dim=-1)[0]).abs().pow(2).mean(-1).mean(-1)
        opt.zero_grad()
        (-per_pair.sqrt().sum()).backward()
        opt.step()
        with torch.no_grad():
            loc /= loc.norm(dim=-1, keepdim=True)
    theta = lossforge.vmf_sample(loc.detach(), kappa, L, generator=g).transpose(1, 2)
    xg, yg = x.detach().requires_grad_(), y.detach().requires_grad_()
    xp = torch.matmul(xg, theta).transpose(1, 2)
    yp = torch.matmul(yg, theta).transpose(1, 2)
    loss = (torch.sort(xp, dim=-1)[0] - torch.sort(yp, dim=-1)[0]).abs().pow(2).mean(-1).mean(-1).sqrt().mean()
    loss.backward()
    return loss.detach(), xg.grad


def _dsw_case(B, N, d, L, T, device) -> Case:
    kappa, lr, seed = 10.0, 0.05, 7

    def setup(dev):
        x, y, _ = _inputs(B, N, N, d, 1, dev, seed=1)
        return x, y

    def check(results):
        (a, ga), (b, gb) = results["lossforge"], results["papers' loop (recipe + torch.optim.Adam)"]
        # Same sampler, generator, initialisation and Adam: the two loops follow the same path.
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(gb, ga, rtol=1e-2, atol=1e-5)

    impls = {
        "lossforge": lambda x, y: dsw_ours(x, y, kappa, L, T, lr, seed),
        "papers' loop (recipe + torch.optim.Adam)": lambda x, y: dsw_recipe(x, y, kappa, L, T, lr, seed),
    }
    note = ("both loops use the same vMF sampler, generator, initial locations and Adam (lr 0.05): the values "
            "agree to 1e-3; ours runs the T steps through the fused kernel's direction gradient.")
    return Case(FAMILY, f"v-DSW ascent T={T} + loss fwd+bwd", f"B={B} N={N} d={d} L={L} kappa={kappa} float32",
                impls, setup, check=check, note=note)


def cases(device: str, full: bool) -> list[Case]:
    """The papers' sizes (B = 32 clouds of 2,048 points) with --full, and always on CUDA (fast there); smaller ones by default on a CPU."""
    if full or device.startswith("cuda"):
        out = _sw_cases(32, 2048, 3, 100, device, pot=True)
        out += _sw_cases(32, 2048, 3, 1000, device, pot=True)
        out.append(_dsw_case(32, 2048, 3, 100, 50, device))
        return out
    out = _sw_cases(4, 1024, 3, 100, device, pot=True)
    out.append(_dsw_case(4, 512, 3, 50, 50, device))
    return out
