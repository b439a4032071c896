"""StableMax rows of `lossforge bench`: forward+backward of StableMax-CE against the paper's eager
float64 formulation, torch.compile of it, and torch's softmax F.cross_entropy on the same logits;
the fused linear loss against materialised logits; one ⊥Grad step against the eager reference.

Floors (memory-bound): the fused forward+backward reads the logits twice and writes the gradient
once, 3 · N · V · element-size bytes; the fused linear loss is compute-bound (3 GEMMs, 6·N·H·V flops).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import lossforge
from lossforge.bench import Case, floor_ms
from lossforge.reference import stablemax as ref
from lossforge._stablemax import _orthograd_

FAMILY = "stablemax"


def _fwd_bwd(loss_fn):
    def run(x, y):
        xg = x.detach().requires_grad_()
        loss = loss_fn(xg, y)
        loss.backward()
        return loss.detach().double(), xg.grad
    return run


def _ours(x, y):
    return lossforge.stablemax_cross_entropy(x, y, dim=-1)


def _reference(x, y):
    return ref.stablemax_cross_entropy(x, y)


def _softmax_ce(x, y):
    return F.cross_entropy(x, y)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(ref.stablemax_cross_entropy, dynamic=False)


def _compiled(x, y):
    return _compiled_reference()(x, y)


def _check_ce(results):
    loss, grad = results["lossforge"]
    assert torch.isfinite(grad).all(), "lossforge gave a non-finite gradient"
    # our loss and both gradients are rounded to the logits' dtype (bfloat16: a relative step of 2^-8)
    eps = torch.finfo(grad.dtype).eps
    for name in ("paper reference (eager float64)", "torch.compile(reference)"):
        if name in results:
            other_loss, other_grad = results[name]
            torch.testing.assert_close(loss, other_loss, rtol=max(1e-4, 2 * eps), atol=1e-6,
                                       msg=f"loss differs from {name}")
            # the reference's gradient is NaN where a logit is exactly 1.0; compare everywhere else
            ok = torch.isfinite(other_grad)
            torch.testing.assert_close(grad[ok].float(), other_grad[ok].float(), rtol=max(1e-3, 2 * eps), atol=1e-7,
                                       msg=f"gradient differs from {name}")


def _ce_case(n: int, v: int, dtype: torch.dtype, device: str, label: str, compiled: bool = True) -> Case:
    def setup(dev):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, v, generator=g) * 3).to(dtype).to(dev)
        y = torch.randint(0, v, (n,), generator=g).to(dev)
        return x, y

    impls = {
        "lossforge": _fwd_bwd(_ours),
        "paper reference (eager float64)": _fwd_bwd(_reference),
        "torch softmax F.cross_entropy": _fwd_bwd(_softmax_ce),
    }
    if compiled:
        impls["torch.compile(reference)"] = _fwd_bwd(_compiled)
    elt = torch.finfo(dtype).bits // 8
    return Case(FAMILY, "stablemax_cross_entropy fwd+bwd", f"{label} [{n}, {v}] {str(dtype)[6:]}".strip(), impls, setup,
                check=_check_ce, floor_ms=floor_ms(3 * n * v * elt, device))


def _fused_case(n: int, h: int, v: int, device: str) -> Case:
    def setup(dev):
        g = torch.Generator().manual_seed(1)
        hidden = (torch.randn(n, h, generator=g) / h ** 0.5).to(dev)
        weight = torch.randn(v, h, generator=g).to(dev)
        y = torch.randint(0, v, (n,), generator=g).to(dev)
        return hidden, weight, y

    def fused(hidden, weight, y):
        hg, wg = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = lossforge.fused_linear_stablemax_cross_entropy(hg, wg, y)
        loss.backward()
        return loss.detach(), hg.grad

    def materialised(loss_fn):
        def run(hidden, weight, y):
            hg, wg = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            loss = loss_fn(hg @ wg.t(), y)
            loss.backward()
            return loss.detach(), hg.grad
        return run

    def check(results):
        loss, gh = results["lossforge"]
        other, ogh = results["logits + lossforge CE (materialised)"]
        torch.testing.assert_close(loss, other, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gh, ogh, rtol=1e-3, atol=1e-6)

    impls = {
        "lossforge": fused,
        "logits + lossforge CE (materialised)": materialised(_ours),
        "logits + paper reference": materialised(_reference),
    }
    return Case(FAMILY, "fused_linear_stablemax_cross_entropy fwd+bwd", f"N={n} H={h} V={v} float32", impls, setup,
                check=check)


def _orthograd_case(numel: int, device: str) -> Case:
    def setup(dev):
        g = torch.Generator().manual_seed(2)
        return torch.randn(numel, generator=g).to(dev), torch.randn(numel, generator=g).to(dev)

    def ours(w, g):
        out = g.clone()
        _orthograd_(out, w)
        return out

    def eager(w, g):
        return ref.orthograd_(w, g.clone())

    def check(results):
        torch.testing.assert_close(results["lossforge"], results["eager reference"], rtol=1e-4, atol=1e-6)

    # clone (r + w) + dots (2 r) + norm of g_perp (2 r) + update (2 r + w): 9 passes of 4 bytes
    return Case(FAMILY, "orthograd step (incl. a clone)", f"{numel / 1e6:.0f}M params float32",
                {"lossforge": ours, "eager reference": eager}, setup, check=check,
                floor_ms=floor_ms(9 * 4 * numel, device))


def cases(device: str, full: bool) -> list[Case]:
    if device.startswith("cuda"):
        return [
            _ce_case(65536, 12, torch.float32, device, "HRM-like"),
            _ce_case(8192, 4096, torch.float32, device, ""),
            _ce_case(4096, 32768, torch.bfloat16, device, "LM-like"),
            _ce_case(8192, 32768, torch.bfloat16, device, "N·V = 2^28"),
            _ce_case(8192, 32768, torch.float32, device, "N·V = 2^28"),
            _fused_case(8192, 2048, 32768, device),
            _orthograd_case(50_000_000, device),
        ]
    out = [
        _ce_case(65536, 12, torch.float32, device, "HRM-like"),
        _ce_case(8192, 4096, torch.float32, device, ""),
        _fused_case(1024, 512, 32768, device),
        _orthograd_case(10_000_000, device),
    ]
    if full:  # the LM-like shape: 134M logits, ~8 GB for the float64 reference
        out.insert(2, _ce_case(4096, 32768, torch.float32, device, "LM-like"))
        out.insert(3, _ce_case(4096, 32768, torch.bfloat16, device, "LM-like", compiled=False))
    return out
