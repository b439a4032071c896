"""M-FAC rows of `lossforge bench`: one IHVP (`SlidingWindowIHVP.update_mul`) and one optimizer step
(`optim.MFAC.step`) on a full window of m gradients of dimension d, against

- "official algorithm (torch)": a faithful torch re-implementation of the official dynamic algorithm
  (lossforge.reference.mfac.OfficialDynamic: the Gram matrix G G^T kept by replacing one row and
  column per step, the m x m coefficient matrices refactored from scratch, O(m^3), at every step, float32);
- "one torch GEMV": torch.mv over the same float32 buffer, the unit of the floor (a step is two passes);
- the m x m part alone: our O(m^2) factor update + solve against the official full refactor.

Floors (memory-bound, ~0.5 flop/byte): update_mul reads G twice and writes one row of it, and moves
g and y: (2m + 1) d s + 8 d bytes (s = 4 for float32, 2 for bfloat16 storage); the optimizer step
also reads the gradient again and reads/writes the parameters and the momentum buffer: (2m + 1) d s +
24 d bytes. The bytes moved are printed in each shape; achieved bandwidth = bytes / our time.
"""
from __future__ import annotations

import os

import torch

from lossforge import mfac
from lossforge.bench import Case, floor_ms
from lossforge.optim import MFAC
from lossforge.reference import mfac as ref

FAMILY = "mfac"
DAMP = 1e-6  # the paper's BERT fine-tuning setting
# Bytes of buffers one CPU case may allocate (ours + the baseline's). The development machine has 23 GB,
# shared: the default 9 GB makes --full skip d = 4M at m = 1024 (34 GB / 25 GB); LOSSFORGE_MFAC_BENCH_GB
# changes it.
_CPU_MEMORY_CAP = float(os.environ.get("LOSSFORGE_MFAC_BENCH_GB", "9")) * 1e9


def _fits(nbytes: float, device: str) -> bool:
    """Whether our buffer plus the baseline's fit: 85% of the GPU's memory (an H100 cannot hold two
    float32 buffers of d = 10M, m = 1024, 80 GB; an H200 can), or the CPU cap."""
    if device.startswith("cuda"):
        return nbytes < 0.85 * torch.cuda.get_device_properties(torch.device(device)).total_memory
    return nbytes < _CPU_MEMORY_CAP


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def _name(d: int) -> str:
    return f"{d // 2**20}M" if d % 2**20 == 0 else f"{d // 2**10}K"


def _buffer(m: int, d: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(m, d, generator=g, device=device) * 1e-3


def _gram(G: torch.Tensor) -> torch.Tensor:
    """G G^T for the set-up of a full window: float32 GEMMs over column blocks, summed in float64 (fast
    enough for m = 1024, d = 4M; accurate enough for random rows next to the damping)."""
    m, d = G.shape
    out = torch.zeros(m, m, dtype=torch.float64, device=G.device)
    step = max(1, (1 << 26) // m)
    for s in range(0, d, step):
        B = G[:, s: s + step].float()
        out += (B @ B.T).double()
    return out


def _fill_window(W: mfac.SlidingWindowIHVP, G: torch.Tensor):
    """A full window holding the rows of G (as if m updates had been made)."""
    W.G.copy_(G)
    W.gram.copy_(_gram(W.G))
    W.count = W.m
    W._refactor()


def _official(G: torch.Tensor) -> ref.OfficialDynamic:
    """The official-style window over G itself (it takes G as its buffer: no copy)."""
    m, d = G.shape
    off = ref.OfficialDynamic(m, 1, DAMP, torch.float32, G.device)
    off.d, off.G = d, G
    off.dots.copy_(_gram(G).float())
    off._setup()
    return off


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _check_close(ours_name="lossforge", other="official algorithm (torch)", rtol=2e-2):
    def check(results):
        ours = results[ours_name].double()
        ref_ = results[other].double()
        err = ((ours - ref_).norm() / ref_.norm()).item()
        assert err < rtol, f"{ours_name} and {other} differ: relative error {err:.2e}"
    return check


def _ihvp_case(d: int, m: int, storage: torch.dtype, device: str) -> Case | None:
    s = 2 if storage == torch.bfloat16 else 4
    if not _fits(m * d * (s + 4), device):  # ours + the float32 baseline's buffer
        return None
    bytes_moved = (2 * m + 1) * d * s + 8 * d

    def setup(dev):
        G = _buffer(m, d, dev, seed=m)
        W = mfac.SlidingWindowIHVP(d, m, DAMP, torch.float32, dev, storage)
        _fill_window(W, G)
        off = _official(G)  # owns G from here
        g = torch.randn(d, generator=torch.Generator(device=dev).manual_seed(7), device=dev) * 1e-3
        if storage == torch.bfloat16:
            g = g.bfloat16().float()  # both sides precondition the same (stored) gradient
        return W, off, G, g

    impls = {
        "lossforge": lambda W, off, G, g: W.update_mul(g),
        "official algorithm (torch)": lambda W, off, G, g: off.update_mul(g),
        "one torch GEMV (G g, float32)": lambda W, off, G, g: torch.mv(off.G, g),
    }
    label = "bfloat16 storage" if storage == torch.bfloat16 else "float32"
    # bfloat16: the window holds rounded copies of the official window's rows, hence the looser check
    rtol = 5e-2 if storage == torch.bfloat16 else 1e-2
    return Case(FAMILY, "IHVP update_mul", f"d={_name(d)} m={m} {label}, {_gb(bytes_moved)}", impls, setup,
                check=_check_close(rtol=rtol), floor_ms=floor_ms(bytes_moved, device))


def _step_case(d: int, m: int, storage: torch.dtype, device: str) -> Case | None:
    s = 2 if storage == torch.bfloat16 else 4
    if not _fits(m * d * (s + 4), device):
        return None
    bytes_moved = (2 * m + 1) * d * s + 24 * d
    lr, momentum, wd = 1e-4, 0.9, 1e-5

    def setup(dev):
        G = _buffer(m, d, dev, seed=m + 1)
        p_ours = torch.zeros(d, device=dev, requires_grad=True)
        opt = MFAC([p_ours], lr=lr, ngrads=m, damp=DAMP, momentum=momentum, weight_decay=wd, storage_dtype=storage)
        _fill_window(opt._window, G)
        off = _official(G)  # owns G from here
        p_off = torch.zeros(d, device=dev)
        grad = torch.randn(d, generator=torch.Generator(device=dev).manual_seed(8), device=dev) * 1e-3
        if storage == torch.bfloat16:
            grad = grad.bfloat16().float()
        p_ours.grad = grad.clone()
        return opt, p_ours, off, p_off, grad, {}

    def ours(opt, p_ours, off, p_off, grad, state):
        before = p_ours.detach().clone()
        opt.step()
        return p_ours.detach() - before

    def official(opt, p_ours, off, p_off, grad, state):
        before = p_off.clone()
        ref.official_mfac_step(off, p_off, grad, state, lr, momentum, wd)
        return p_off - before

    impls = {
        "lossforge": ours,
        "official algorithm (torch)": official,
        "one torch GEMV (G g, float32)": lambda opt, p, off, p_off, grad, state: torch.mv(off.G, grad),
    }
    label = "bfloat16 storage" if storage == torch.bfloat16 else "float32"
    rtol = 5e-2 if storage == torch.bfloat16 else 1e-2
    return Case(FAMILY, "optimizer step (momentum, weight decay)", f"d={_name(d)} m={m} {label}, {_gb(bytes_moved)}",
                impls, setup, check=_check_close(rtol=rtol), floor_ms=floor_ms(bytes_moved, device))


def _small_algebra_case(m: int, device: str) -> Case:
    """The m x m part of one step alone: our O(m^2) factor update + solve vs the official O(m^3) setup."""
    d = 64

    def setup(dev):
        G = _buffer(m, d, dev, seed=3)
        W = mfac.SlidingWindowIHVP(d, m, DAMP, torch.float32, dev)
        _fill_window(W, G)
        t = W.gram[0].clone()
        return W, _official(G), t

    def ours(W, off, t):
        # what a step does after pass 1, here for "replace the oldest gradient by itself" (its Gram row
        # is unchanged, so the window stays a valid one; the factor update does its full work)
        r = W.count % W.m
        W.count += 1
        W._update_factor(r)
        return W._solve(t)

    def official(W, off, t):
        off._setup()
        z = torch.linalg.solve_triangular(off.L, t.float()[:, None] / DAMP, upper=False, unitriangular=True)
        return (z[:, 0] / off.q) @ off.coef

    return Case(FAMILY, "m x m part of a step (factor update + solve)", f"m={m}",
                {"lossforge": ours, "official algorithm (torch)": official}, setup)


def cases(device: str, full: bool) -> list[Case]:
    if device.startswith("cuda"):
        sizes = [(10 * 2**20, m) for m in (64, 256, 1024)]
        out = []
        for d, m in sizes:
            for storage in (torch.float32, torch.bfloat16):
                out += [_ihvp_case(d, m, storage, device), _step_case(d, m, storage, device)]
        out.append(_small_algebra_case(1024, device))
        return [c for c in out if c is not None]
    if full:
        sizes = [(d, m) for d in (2**20, 4 * 2**20) for m in (64, 256, 1024)]
    else:  # ~1-2 minutes on 2 cores: the headline shape (d = 2M, m = 64), and m = 1024 at a smaller d
        sizes = [(2 * 2**20, 64), (2**18, 1024)]
    out = []
    for d, m in sizes:
        for storage in (torch.float32, torch.bfloat16):
            out += [_ihvp_case(d, m, storage, device), _step_case(d, m, storage, device)]
    out += [_small_algebra_case(m, device) for m in ((64, 256, 1024) if full else (1024,))]
    return [c for c in out if c is not None]


# ---- the headline ratios, measured robustly on a shared machine -----------------------------------------

def _interleaved_min(fns: dict, reps: int) -> dict:
    """Best time (ms) of each callable over `reps` interleaved rounds: on a busy machine the minimum of
    interleaved runs estimates each one's unloaded time, and the same load hits every contender."""
    import time

    best = {k: float("inf") for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], (time.perf_counter() - t0) * 1e3)
    return best


def ratios(reps: int = 15, d_large: int = 2**20) -> str:
    """The CPU ratios that matter for M-FAC: update_mul at d = 2M, m = 64 (float32) against one torch GEMV
    over the same buffer (the floor is 2: update_mul reads G twice); bfloat16 storage against the float32
    official step; the m x m part of a step at m = 1024 as a share of the step."""
    from lossforge.bench import measured_bandwidth_gbs

    lines = [f"copy bandwidth (bench.measured_bandwidth_gbs): {measured_bandwidth_gbs('cpu'):.1f} GB/s"]
    m, d = 64, 2 * 2**20
    G = _buffer(m, d, "cpu", seed=1)
    W32 = mfac.SlidingWindowIHVP(d, m, DAMP)
    _fill_window(W32, G)
    W16 = mfac.SlidingWindowIHVP(d, m, DAMP, storage_dtype=torch.bfloat16)
    _fill_window(W16, G)
    off = _official(G)
    g = torch.randn(d, generator=torch.Generator().manual_seed(2)) * 1e-3
    p32, p16, p_off = (torch.zeros(d, requires_grad=True) for _ in range(3))
    o32 = MFAC([p32], lr=1e-4, ngrads=m, damp=DAMP, momentum=0.9)
    o16 = MFAC([p16], lr=1e-4, ngrads=m, damp=DAMP, momentum=0.9, storage_dtype=torch.bfloat16)
    _fill_window(o32._window, G)
    _fill_window(o16._window, G)
    p32.grad, p16.grad = g.clone(), g.clone()
    state: dict = {}
    t = _interleaved_min({
        "torch GEMV": lambda: torch.mv(off.G, g),
        "update_mul fp32": lambda: W32.update_mul(g),
        "update_mul bf16": lambda: W16.update_mul(g),
        "official update_mul fp32": lambda: off.update_mul(g),
        "MFAC.step fp32": lambda: o32.step(),
        "MFAC.step bf16": lambda: o16.step(),
        "official step fp32": lambda: ref.official_mfac_step(off, p_off.detach(), g, state, 1e-4, 0.9),
    }, reps)
    bytes32, bytes16 = (2 * m + 1) * d * 4 + 8 * d, (2 * m + 1) * d * 2 + 8 * d
    lines.append(f"d=2M m=64, best of {reps} interleaved rounds (ms): " +
                 ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    lines.append(f"  GEMV bandwidth {m * d * 4 / t['torch GEMV'] / 1e6:.1f} GB/s; update_mul fp32 "
                 f"{bytes32 / t['update_mul fp32'] / 1e6:.1f} GB/s; update_mul bf16 {bytes16 / t['update_mul bf16'] / 1e6:.1f} GB/s")
    lines.append(f"  update_mul fp32 / GEMV = {t['update_mul fp32'] / t['torch GEMV']:.2f} (floor 2); "
                 f"official fp32 / GEMV = {t['official update_mul fp32'] / t['torch GEMV']:.2f}")
    lines.append(f"  official fp32 update_mul / ours bf16 = {t['official update_mul fp32'] / t['update_mul bf16']:.2f}; "
                 f"official fp32 step / MFAC.step bf16 = {t['official step fp32'] / t['MFAC.step bf16']:.2f}")
    del G, W32, W16, off, o32, o16, p32, p16, p_off, g, state
    # m = 1024: the m x m part (factor update + solve) against a whole update_mul at d = d_large
    m = 1024
    W = mfac.SlidingWindowIHVP(d_large, m, DAMP)
    _fill_window(W, _buffer(m, d_large, "cpu", seed=3))
    g = torch.randn(d_large, generator=torch.Generator().manual_seed(4)) * 1e-3
    tvec = W.gram[0].clone()

    def small():  # the step's m x m work, replacing the oldest gradient by itself (see _small_algebra_case)
        r = W.count % W.m
        W.count += 1
        W._update_factor(r)
        return W._solve(tvec)

    t = _interleaved_min({"update_mul": lambda: W.update_mul(g), "m x m part": small}, max(3, reps // 3))
    # the refactor every `refactor_every` updates, amortised
    import time

    t0 = time.perf_counter()
    W._refactor()
    refactor = (time.perf_counter() - t0) * 1e3
    share = (t["m x m part"] + refactor / W.refactor_every) / t["update_mul"]
    lines.append(f"d={_name(d_large)} m=1024: update_mul {t['update_mul']:.1f} ms, m x m part {t['m x m part']:.2f} ms "
                 f"+ refactor {refactor:.1f} ms / {W.refactor_every} steps")
    lines.append(f"  m x m share of the step = {100 * share:.1f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="M-FAC: the headline CPU ratios (python -m lossforge.benchmarks.mfac)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--d-large", type=int, default=2**20, help="d for the m = 1024 share (default 1M)")
    args = parser.parse_args()
    print(ratios(args.reps, args.d_large))
