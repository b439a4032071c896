"""Betti matching rows of `lossforge bench`: our matching core and our loss (forward + backward)
against the Betti-Matching-3D reference build (shipped in the topolosses wheel) on the same
segmentation-like inputs, on one thread and on all threads, 2D and 3D, single images and a batch.

Inputs: the target is a binary mask of a smooth random field (blobs and tubes); the prediction is a
noisy probability map of it (sigmoid of the target's logit plus smooth and pixel noise), as early in
training. The reference gets f = 1 - p as float64 numpy arrays, as topolosses passes them; its loss
baseline is what topolosses computes from the build's coordinates (torch gathers per dimension).

"One thread": torch.set_num_threads(1) for us, and the process pinned to one CPU for the reference
(its std::async workers inherit the affinity). "All threads": torch's default pool; the reference
matches the batch with one task per instance (and its 3D dim-1 tasks) on all CPUs.

Floor: the core must at least read pred and target once (2 * V * 4 bytes) — a loose bound; the work
is latency-bound (union-find and sparse column reduction), not bandwidth-bound.
"""
from __future__ import annotations

import functools
import glob
import importlib
import importlib.util
import os
import sys

import numpy as np
import torch

import lossforge
from lossforge.bench import Case, MissingBaseline, floor_ms

FAMILY = "betti_matching"
_OPS = torch.ops.lossforge


@functools.lru_cache(maxsize=None)
def reference_build():
    """The Betti-Matching-3D C++ build inside the topolosses wheel, imported without topolosses'
    dependencies (its folder on sys.path)."""
    spec = importlib.util.find_spec("topolosses")
    if spec is None:
        raise MissingBaseline("the Betti-Matching-3D build is not installed (pip install --no-deps topolosses)")
    folder = os.path.join(os.path.dirname(spec.origin), "losses", "betti_matching", "src")
    if not glob.glob(os.path.join(folder, "betti_matching*.so")):
        raise MissingBaseline(f"no betti_matching*.so in {folder} (pip install --no-deps topolosses)")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("betti_matching")


def _blur(x: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        for d in range(2, x.dim()):
            x = (x + x.roll(1, d) + x.roll(-1, d)) / 3
    return x


def segmentation_pair(shape, seed: int = 0, dtype=torch.float32):
    """(pred, target) [B, C, *spatial]: a binary mask of a smooth field and a noisy prediction of it."""
    g = torch.Generator().manual_seed(seed)
    field = _blur(torch.randn(shape, generator=g, dtype=torch.float64), 4)
    target = (field > 0).to(torch.float64)
    noise = _blur(torch.randn(shape, generator=g, dtype=torch.float64), 1)
    logit = 4 * (target - 0.5) + 1.5 * noise / noise.std() + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    return torch.sigmoid(logit).to(dtype), target.to(dtype)


class _Threads:
    """Runs a call on `n` threads: torch's pool size for us, the CPU affinity for the reference."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.old_threads = torch.get_num_threads()
        self.old_aff = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if self.n is not None:
            torch.set_num_threads(self.n)
            if self.old_aff is not None:
                os.sched_setaffinity(0, set(sorted(self.old_aff)[: self.n]))
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.old_threads)
        if self.old_aff is not None:
            os.sched_setaffinity(0, self.old_aff)


def _f_space(pred, target):
    N = pred.shape[0] * pred.shape[1]
    spatial = tuple(pred.shape[2:])
    return (1 - pred).reshape((N,) + spatial).contiguous(), (1 - target).reshape((N,) + spatial).contiguous()


# ---- matching only ----------------------------------------------------------------------------------

def _ours_matching(threads):
    def run(pred, target):
        f, g = _f_space(pred, target)
        with _Threads(threads):
            return _OPS.betti_matching_pairs(f, g, False, True)
    return run


def _ref_matching(threads):
    def run(pred, target):
        f, g = _f_space(pred, target)
        fs = [a.double().numpy() for a in f]
        gs = [a.double().numpy() for a in g]
        with _Threads(threads):
            return reference_build().compute_matching(fs, gs)
    return run


def _sets_ours(rows, counts, spatial):
    rows = rows.numpy()
    out = []
    start = 0
    for per_dim in counts.tolist():
        inst = []
        for nm, nf, ng in per_dim:
            m = rows[start:start + nm, 1:5]
            u = rows[start + nm:start + nm + nf, 1:3]
            v = rows[start + nm + nf:start + nm + nf + ng, 3:5]
            start += nm + nf + ng
            inst.append((sorted(map(tuple, m.tolist())), sorted(map(tuple, u.tolist())), sorted(map(tuple, v.tolist()))))
        out.append(inst)
    return out


def _sets_ref(results, spatial):
    def flat(a):
        a = np.asarray(a).reshape(-1, len(spatial))
        return np.ravel_multi_index(tuple(a.T), spatial).tolist() if len(a) else []
    out = []
    for r in results:
        inst = []
        for k in range(len(spatial)):
            m = sorted(zip(flat(r.input1_matched_birth_coordinates[k]), flat(r.input1_matched_death_coordinates[k]),
                           flat(r.input2_matched_birth_coordinates[k]), flat(r.input2_matched_death_coordinates[k])))
            u = sorted(zip(flat(r.input1_unmatched_birth_coordinates[k]), flat(r.input1_unmatched_death_coordinates[k])))
            v = sorted(zip(flat(r.input2_unmatched_birth_coordinates[k]), flat(r.input2_unmatched_death_coordinates[k])))
            inst.append((m, u, v))
        out.append(inst)
    return out


def _check_matching(spatial):
    def check(results):
        ours = _sets_ours(*results["lossforge"], spatial)
        for name, res in results.items():
            if name == "lossforge":
                continue
            if _sets_ref(res, spatial) != ours:
                raise AssertionError(f"{name}: the matching differs from lossforge's")
    return check


# ---- loss forward + backward ---------------------------------------------------------------------------

def _ours_loss(threads):
    def run(pred, target):
        with _Threads(threads):
            x = pred.detach().requires_grad_()
            loss = lossforge.betti_matching_loss(x, target)
            loss.backward()
        return loss.detach().double(), x.grad
    return run


def _ref_loss(threads):
    """What topolosses computes: the build's matching of f = 1 - p (float64 numpy), then per instance and
    dimension the values of f and g gathered at the build's coordinates, the squared differences summed,
    the mean over instances, and autograd."""
    def run(pred, target):
        x = pred.detach().requires_grad_()
        f = 1 - x.reshape((-1,) + tuple(x.shape[2:]))
        g = 1 - target.reshape((-1,) + tuple(x.shape[2:]))
        fs = [a.detach().double().cpu().numpy() for a in f]  # the build takes host arrays (CUDA cases too)
        gs = [a.double().cpu().numpy() for a in g]
        with _Threads(threads):
            results = reference_build().compute_matching(fs, gs)
        D = x.dim() - 2
        losses = []
        for n, r in enumerate(results):
            total = f.new_zeros(())
            for k in range(D):
                at = lambda img, c: img[tuple(torch.as_tensor(np.asarray(c).reshape(-1, D)).T)]
                mb = at(f[n], r.input1_matched_birth_coordinates[k]) - at(g[n], r.input2_matched_birth_coordinates[k])
                md = at(f[n], r.input1_matched_death_coordinates[k]) - at(g[n], r.input2_matched_death_coordinates[k])
                up = at(f[n], r.input1_unmatched_birth_coordinates[k]) - at(f[n], r.input1_unmatched_death_coordinates[k])
                ut = at(g[n], r.input2_unmatched_birth_coordinates[k]) - at(g[n], r.input2_unmatched_death_coordinates[k])
                total = total + 2 * ((mb ** 2).sum() + (md ** 2).sum()) + (up ** 2).sum() + (ut ** 2).sum()
            losses.append(total)
        loss = torch.stack(losses).mean()
        loss.backward()
        return loss.detach().double(), x.grad
    return run


def _torch_loss(pred, target):
    """Our pairs, then the loss as torch indexing on the device (what a user would write around the
    core): the baseline of the fused loss kernel on CUDA."""
    x = pred.detach().requires_grad_()
    N = x.shape[0] * x.shape[1]
    f = (1 - x.detach()).reshape((N,) + tuple(x.shape[2:]))
    g = (1 - target).reshape((N,) + tuple(x.shape[2:]))
    fg = torch.stack([f, g]).cpu()
    rows, _ = _OPS.betti_matching_pairs(fg[0].contiguous(), fg[1].contiguous(), False, True)
    rows = rows.to(x.device)
    V = f[0].numel()
    p, t = x.reshape(-1), target.reshape(-1).to(x.dtype)
    n, kind = rows[:, 0] // (3 * (x.dim() - 2)), rows[:, 0] % 3
    at = lambda v, c: v[n * V + rows[:, c].clamp(min=0)]
    m = 2 * ((at(p, 1) - at(t, 3)) ** 2 + (at(p, 2) - at(t, 4)) ** 2)
    u = (at(p, 1) - at(p, 2)) ** 2
    v = (at(t, 3) - at(t, 4)) ** 2
    term = torch.where(kind == 0, m, torch.where(kind == 1, u, v))
    loss = torch.zeros(N, dtype=x.dtype, device=x.device).index_add(0, n, term).mean()
    loss.backward()
    return loss.detach().double(), x.grad


def _check_loss(results):
    loss, grad = results["lossforge"]
    for name, (other, ograd) in results.items():
        if name == "lossforge":
            continue
        torch.testing.assert_close(loss, other, rtol=1e-4, atol=1e-6, msg=f"loss differs from {name}")
        torch.testing.assert_close(grad, ograd, rtol=1e-4, atol=1e-6, msg=f"gradient differs from {name}")


# ---- cases ------------------------------------------------------------------------------------------

def _label(shape, threads):
    B, C = shape[:2]
    sp = "x".join(map(str, shape[2:]))
    batch = f"{B * C} x " if B * C > 1 else ""
    return f"{batch}{sp} {'1 thread' if threads == 1 else 'all threads'}"


def _matching_case(shape, threads, device) -> Case:
    def setup(dev):
        return segmentation_pair(shape)

    spatial = tuple(shape[2:])
    impls = {"lossforge": _ours_matching(threads), "Betti-Matching-3D build": _ref_matching(threads)}
    n = int(np.prod(shape))
    return Case(FAMILY, "betti_matching", _label(shape, threads), impls, setup, check=_check_matching(spatial),
                floor_ms=floor_ms(2 * n * 4, device))


def _loss_case(shape, threads, device) -> Case:
    def setup(dev):
        p, t = segmentation_pair(shape)
        return p.to(dev), t.to(dev)

    impls = {"lossforge": _ours_loss(threads)}
    if device.startswith("cuda"):
        impls["core + torch indexing loss"] = _torch_loss
    impls["build + topolosses loss"] = _ref_loss(threads)  # without the build, `lossforge bench` drops its rows
    n = int(np.prod(shape))
    return Case(FAMILY, "betti_matching_loss fwd+bwd", _label(shape, threads), impls, setup, check=_check_loss,
                floor_ms=floor_ms(2 * n * 4, device))


def cases(device: str, full: bool) -> list[Case]:
    if device.startswith("cuda"):
        # the core runs on the CPU either way; on a GPU box only the loss step (one transfer each way)
        shapes = [(1, 1, 256, 256), (16, 1, 128, 128), (1, 1, 48, 48, 48)]
        return [_loss_case(s, None, device) for s in shapes]
    if full:
        singles = [(1, 1, n, n) for n in (64, 128, 256, 512, 1024)] + [(1, 1, n, n, n) for n in (32, 48, 64, 96)]
    else:
        singles = [(1, 1, 64, 64), (1, 1, 256, 256), (1, 1, 512, 512), (1, 1, 32, 32, 32), (1, 1, 48, 48, 48)]
    out = []
    for s in singles:
        out.append(_matching_case(s, 1, device))
    batch = (16, 1, 128, 128)
    out.append(_matching_case(batch, 1, device))
    out.append(_matching_case(batch, None, device))
    for s in (singles if full else [(1, 1, 48, 48, 48)]):
        out.append(_matching_case(s, None, device))
    out.append(_loss_case((1, 1, 256, 256), 1, device))
    out.append(_loss_case(batch, None, device))
    return out
