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

import torch

from lossforge import mfac
from lossforge.bench import Case, floor_ms
from lossforge.optim import MFAC
from lossforge.reference import mfac as ref

FAMILY = "mfac"
DAMP = 1e-6  # the paper's BERT fine-tuning setting
_CPU_MEMORY_CAP = 9e9  # bytes of buffers one case may allocate (the CPU machine has 23 GB, shared): --full
# skips d = 4M at m = 1024 (34 GB for our buffer and the baseline's)


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
    """G G^T in float64, in column blocks (no float64 copy of G)."""
    m, d = G.shape
    out = torch.zeros(m, m, dtype=torch.float64, device=G.device)
    step = max(1, (1 << 24) // m)
    for s in range(0, d, step):
        B = G[:, s: s + step].double()
        out.addmm_(B, B.T)
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
        r = W.count % W.m
        W.gram[r] = t  # the Gram row a pass 1 would have produced (the values do not matter here)
        W.gram[:, r] = t
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
    else:  # ~1 minute on 2 cores: the goal shape, then larger m at smaller d
        sizes = [(2 * 2**20, 64), (2**20, 256), (2**18, 1024)]
    out = []
    for d, m in sizes:
        for storage in (torch.float32, torch.bfloat16):
            out += [_ihvp_case(d, m, storage, device), _step_case(d, m, storage, device)]
    out += [_small_algebra_case(m, device) for m in ((64, 256, 1024) if full else (1024,))]
    return [c for c in out if c is not None]
