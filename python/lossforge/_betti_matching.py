"""Persistence barcodes and Betti matching of 2D and 3D images, and the Betti matching loss.

Stucki et al., "Topologically faithful image segmentation via induced matching of persistence
barcodes" (ICML 2023) and "Efficient Betti matching enables topology-aware 3D segmentation via
persistent homology" (arXiv 2407.04683).

Semantics (parity with the Betti-Matching-3D reference build):

- V-construction cubical complex: pixels / voxels are vertices, a cube's value is the max of its
  vertices (4-connected foreground in 2D, 6-connected in 3D).
- The superlevel filtration of probabilities p is the sublevel filtration of f = 1 - p (computed in
  p's dtype, float32 for half precision); the sublevel filtration uses f = p. The comparison image of
  a pair is c = min(f, g).
- Cells are ordered by (value, packed index); the critical pixel of a cell is the vertex attaining
  its value (ties: the largest linear index, except for 3D cubes: the smallest).
- Bars of zero persistence are dropped; the essential H0 bar is left out unless asked for.
- Induced matching: an f-bar maps to the image bar with the same birth cell, which maps to the c-bar
  with the same death cell; an f-bar and a g-bar match when they reach the same c-bar.
  ``strict=True`` matches only through non-empty image bars (birth_f < death_c and birth_g < death_c),
  so that every matched pair overlaps.
- Loss per instance: sum over dimensions k of w_k * [ sum_matched 2 ||(b, d) - (b', d')||^2 +
  sum_unmatched pred (b - d)^2 + sum_unmatched target (b' - d')^2 ], differentiable in pred through
  the values at the critical pixels (the pairing is fixed).

The combinatorial core runs on the CPU (all instances in parallel on torch's thread pool, GIL
released); for CUDA inputs the filtration values make one trip to the host and the pairs one trip
back, and the loss and its backward run on the device.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from ._ops import cuda_kernels_loaded, ops, register_fake

__all__ = [
    "BettiMatchingResult",
    "PersistenceBarcode",
    "persistence_barcode",
    "betti_matching",
    "betti_matching_loss",
    "betti_matching_error",
    "betti_number_error",
]

FILTRATIONS = ("superlevel", "sublevel", "bothlevel")
REDUCTIONS = ("mean", "sum", "none")

# ---------------------------------------------------------------------------------------------
# fake (meta) implementations and autograd


@register_fake("lossforge::betti_matching_pairs")
def _pairs_fake(f, g, strict, include_target_unmatched):
    ctx = torch.library.get_ctx()
    n = ctx.new_dynamic_size()
    rows = f.new_empty((n, 5), dtype=torch.int64)
    counts = f.new_empty((f.shape[0], f.dim() - 1, 3), dtype=torch.int64)
    return rows, counts


@register_fake("lossforge::persistence_pairs")
def _barcode_fake(x, include_essential):
    ctx = torch.library.get_ctx()
    n = ctx.new_dynamic_size()
    return x.new_empty((n, 3), dtype=torch.int64), x.new_empty((x.shape[0], x.dim() - 1), dtype=torch.int64)


@register_fake("lossforge::betti_matching_loss_rows")
def _loss_rows_fake(pred, target, rows, weights):
    return pred.new_empty((pred.shape[0],))


@register_fake("lossforge::betti_matching_loss_rows_backward")
def _loss_rows_backward_fake(grad, pred, target, rows, weights):
    return pred.new_empty(pred.shape)


def _loss_rows_setup(ctx, inputs, output):
    pred, target, rows, weights = inputs
    ctx.save_for_backward(pred, target, rows, weights)


def _loss_rows_backward(ctx, grad):
    pred, target, rows, weights = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0]:
        grad_pred = ops.betti_matching_loss_rows_backward(grad.contiguous(), pred, target, rows, weights)
    return grad_pred, None, None, None


torch.library.register_autograd(
    "lossforge::betti_matching_loss_rows", _loss_rows_backward, setup_context=_loss_rows_setup
)

# ---------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class BettiMatchingResult:
    """The Betti matching of one (prediction, target) pair.

    Each attribute is a list over homology dimensions 0..D-1 of int64 ``[n, D]`` tensors of critical
    pixel coordinates in C order (``(row, col)`` / ``(z, row, col)``); row i of the four ``*_matched_*``
    tensors of a dimension is one matched pair. With ``relative=True`` the coordinates index the
    padded image (one pixel of frame on each side).
    """

    pred_matched_birth: list
    pred_matched_death: list
    target_matched_birth: list
    target_matched_death: list
    pred_unmatched_birth: list
    pred_unmatched_death: list
    target_unmatched_birth: list
    target_unmatched_death: list
    filtration: str = "superlevel"

    @property
    def num_matched(self) -> list[int]:
        return [int(t.shape[0]) for t in self.pred_matched_birth]

    @property
    def num_unmatched_pred(self) -> list[int]:
        return [int(t.shape[0]) for t in self.pred_unmatched_birth]

    @property
    def num_unmatched_target(self) -> list[int]:
        return [int(t.shape[0]) for t in self.target_unmatched_birth]


@dataclasses.dataclass
class PersistenceBarcode:
    """The barcode of one image: lists over homology dimensions of births, deaths (the image's values
    at the critical pixels, so superlevel bars have birth >= death) and int64 ``[n, D]`` critical
    pixel coordinates. The essential H0 bar, when included, is the last bar of dimension 0, with death
    -inf (superlevel) / +inf (sublevel) and death coordinates -1."""

    births: list
    deaths: list
    birth_coords: list
    death_coords: list
    filtration: str = "superlevel"


# ---------------------------------------------------------------------------------------------
# validation


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} must be real, got {x.dtype}")


def _check_images(x, name, batched: bool | None):
    """Shape check. batched=True: [B, C, H, W] or [B, C, D, H, W]; False: [H, W] or [D, H, W];
    None: either. Returns the number of spatial dimensions."""
    nd = x.dim()
    if batched is True:
        if nd not in (4, 5):
            raise ValueError(
                f"{name} must have shape [B, C, H, W] (2D) or [B, C, D, H, W] (3D), got {tuple(x.shape)} "
                f"({nd} dimensions)"
            )
        D = nd - 2
    else:
        if nd in (2, 3):
            D = nd
        elif nd in (4, 5) and batched is None:
            D = nd - 2
        else:
            want = "[H, W] or [D, H, W]" + (", or a batch [B, C, H, W] / [B, C, D, H, W]" if batched is None else "")
            raise ValueError(f"{name} must have shape {want} (2D or 3D images), got {tuple(x.shape)} ({nd} dimensions)")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    return D


def _check_pair(pred, target):
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    if target.device != pred.device:
        raise ValueError(f"target must be on pred's device {pred.device}, got {target.device}")


def _check_no_nan(x, name):
    if x.is_floating_point() and bool(torch.isnan(x).any()):  # host sync: validation needs the answer
        raise ValueError(f"{name} contains NaN")


def _check_device(x, name, needs_kernels=False):
    """CPU or CUDA. Only the loss runs kernels on the device; the rest returns device tensors
    computed from the CPU core."""
    if x.device.type == "cpu":
        return
    if x.device.type == "cuda":
        if needs_kernels and not cuda_kernels_loaded():
            raise RuntimeError(
                f"{name} is a CUDA tensor but lossforge was built without its CUDA kernels "
                "(rebuild with FORCE_CUDA=1, or move the inputs to the CPU)"
            )
        return
    raise ValueError(f"{name} must be a CPU or CUDA tensor, got device {x.device}")


def _weights(dims, D, device):
    if dims is None:
        w = [1.0] * D
    else:
        try:
            w = [float(v) for v in dims]
        except TypeError:
            raise TypeError(f"dims must be a sequence of {D} per-dimension weights, got {type(dims).__name__}") from None
        if len(w) != D:
            raise ValueError(f"dims must have one weight per homology dimension 0..{D - 1} ({D} values), got {len(w)}")
        if any(not math.isfinite(v) or v < 0 for v in w):
            raise ValueError(f"dims weights must be finite and non-negative, got {w}")
    return torch.tensor(w, dtype=torch.float64, device=device)


def _float(x):
    """The dtype the core works in: float32, or float64 for float64 inputs."""
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# filtrations


def _frame(x, superlevel):
    """relative=True: a one-pixel frame per image at the value that enters the filtration first."""
    D = x.dim() - 1
    flat = x.detach().reshape(x.shape[0], -1)
    val = flat.amax(1) if superlevel else flat.amin(1)
    out = val.reshape((-1,) + (1,) * D).expand(tuple(x.shape[:1]) + tuple(s + 2 for s in x.shape[1:])).clone()
    out[(slice(None),) + (slice(1, -1),) * D] = x
    return out


def _prepare(x, y, filtration, relative):
    """The instances to match, as (p-space values, sublevel f-space values) for pred and target;
    bothlevel stacks the superlevel instances on top of the sublevel ones."""
    passes = ["superlevel", "sublevel"] if filtration == "bothlevel" else [filtration]
    ps, ts, fs, gs = [], [], [], []
    for flt in passes:
        sup = flt == "superlevel"
        xp = _frame(x, sup) if relative else x
        yp = _frame(y, sup) if relative else y
        ps.append(xp)
        ts.append(yp)
        fs.append((1 - xp.detach()) if sup else xp.detach())
        gs.append((1 - yp) if sup else yp)
    cat = (lambda l: l[0]) if len(passes) == 1 else (lambda l: torch.cat(l))
    return cat(ps), cat(ts), cat(fs), cat(gs), len(passes)


def _to_host(*ts):
    """One device-to-host copy for all tensors (a no-op on the CPU)."""
    if ts[0].device.type == "cpu":
        return [t.contiguous() for t in ts]
    return list(torch.stack(ts).cpu().unbind(0))


def _core_pairs(f, g, strict, include_target_unmatched):
    f, g = _to_host(f, g)
    return ops.betti_matching_pairs(f.contiguous(), g.contiguous(), strict, include_target_unmatched)


# ---------------------------------------------------------------------------------------------
# public API


def _unravel(idx, shape):
    """Flat pixel indices [n] -> coordinates [n, D] (C order)."""
    coords = []
    for s in reversed(shape):
        coords.append(idx % s)
        idx = idx // s
    return torch.stack(coords[::-1], dim=1) if coords else idx[:, None]


def persistence_barcode(image, filtration: str = "superlevel", include_essential: bool = False):
    """Persistence barcode of the V-construction cubical complex of a 2D or 3D image.

    Args:
        image: ``[H, W]`` or ``[D, H, W]`` (one image, returns one :class:`PersistenceBarcode`) or a
            batch ``[B, C, H, W]`` / ``[B, C, D, H, W]`` (returns a flat list of B*C barcodes in
            row-major (b, c) order). Any real dtype; on the CPU or CUDA (the core runs on the CPU, the
            results live on the image's device).
        filtration: "superlevel" (features appear as the value decreases: the usual choice for
            probabilities) or "sublevel".
        include_essential: also report the essential H0 bar (death at -inf / +inf).
    """
    _check_tensor(image, "image")
    _check_choice(filtration, "filtration", ("superlevel", "sublevel"))
    D = _check_images(image, "image", None)
    _check_device(image, "image")
    _check_no_nan(image, "image")
    batched = image.dim() == D + 2
    spatial = tuple(image.shape[-D:])
    x = image.detach()
    x = x.to(torch.float32) if not x.is_floating_point() else _float(x)
    x = x.reshape((-1,) + spatial)
    f = (1 - x) if filtration == "superlevel" else x
    (f,) = _to_host(f)
    rows, counts = ops.persistence_pairs(f, include_essential)
    rows = rows.to(image.device)
    counts = counts.tolist()
    vals = x.reshape(x.shape[0], -1)
    inf = float("-inf") if filtration == "superlevel" else float("inf")
    out = []
    start = 0
    for n, per_dim in enumerate(counts):
        births, deaths, bc, dc = [], [], [], []
        for k, cnt in enumerate(per_dim):
            r = rows[start : start + cnt]
            start += cnt
            b_idx, d_idx = r[:, 1], r[:, 2]
            ess = d_idx < 0
            births.append(vals[n][b_idx])
            deaths.append(torch.where(ess, torch.full_like(births[-1], inf), vals[n][d_idx.clamp(min=0)]))
            bc.append(_unravel(b_idx, spatial))
            dcoords = _unravel(d_idx.clamp(min=0), spatial)
            dc.append(torch.where(ess[:, None], torch.full_like(dcoords, -1), dcoords))
        out.append(PersistenceBarcode(births, deaths, bc, dc, filtration))
    return out if batched else out[0]


def _results_from_rows(rows, counts, spatial, filtration):
    """Split the core's rows into BettiMatchingResults (rows on the device the results should live on)."""
    out = []
    start = 0
    for per_dim in counts.tolist():
        fields = [[] for _ in range(8)]
        for nm, nf, ng in per_dim:
            m = rows[start : start + nm]
            u = rows[start + nm : start + nm + nf]
            v = rows[start + nm + nf : start + nm + nf + ng]
            start += nm + nf + ng
            for i, t in enumerate((m[:, 1], m[:, 2], m[:, 3], m[:, 4], u[:, 1], u[:, 2], v[:, 3], v[:, 4])):
                fields[i].append(_unravel(t, spatial))
        out.append(BettiMatchingResult(*fields, filtration=filtration))
    return out


def betti_matching(pred, target, filtration: str = "superlevel", relative: bool = False, strict: bool = False):
    """Betti matching between a prediction and a target (2D or 3D).

    Args:
        pred, target: ``[H, W]`` / ``[D, H, W]`` (one pair: returns one :class:`BettiMatchingResult`)
            or batches ``[B, C, H, W]`` / ``[B, C, D, H, W]`` (a flat list of B*C results in row-major
            (b, c) order), probabilities (any real dtype; the target may be bool / integer).
        filtration: "superlevel" (f = 1 - p), "sublevel" (f = p) or "bothlevel" (each result becomes a
            tuple (superlevel result, sublevel result)).
        relative: pad each image with a one-pixel frame at the value that enters first (homology
            relative to the image border); coordinates then index the padded image.
        strict: match only through non-empty image bars.
    """
    _check_tensor(pred, "pred")
    _check_tensor(target, "target")
    _check_choice(filtration, "filtration", FILTRATIONS)
    D = _check_images(pred, "pred", None)
    _check_pair(pred, target)
    _check_device(pred, "pred")
    _check_no_nan(pred, "pred")
    _check_no_nan(target, "target")
    batched = pred.dim() == D + 2
    spatial = tuple(pred.shape[-D:])
    x = pred.detach()
    x = _float(x) if x.is_floating_point() else x.to(torch.float32)
    y = target.detach().to(x.dtype)
    x = x.reshape((-1,) + spatial)
    y = y.reshape((-1,) + spatial)
    N = x.shape[0]
    _, _, f, g, npasses = _prepare(x, y, filtration, relative)
    rows, counts = _core_pairs(f, g, bool(strict), True)
    rows = rows.to(pred.device)
    pshape = tuple(s + 2 for s in spatial) if relative else spatial
    if filtration == "bothlevel":
        sup = _results_from_rows(rows, counts[:N], pshape, "superlevel")
        nsup = int(counts[:N].sum())
        sub = _results_from_rows(rows[nsup:], counts[N:], pshape, "sublevel")
        res = list(zip(sup, sub))
    else:
        res = _results_from_rows(rows, counts, pshape, filtration)
    return res if batched else res[0]


def _reduce(per_instance, reduction, B, C):
    if reduction == "mean":
        return per_instance.mean()
    if reduction == "sum":
        return per_instance.sum()
    return per_instance.reshape(B, C)


def betti_matching_loss(
    pred,
    target,
    filtration: str = "superlevel",
    relative: bool = False,
    strict: bool = False,
    dims: Sequence[float] | None = None,
    include_target_unmatched: bool = True,
    reduction: str = "mean",
):
    """Betti matching loss of probabilities ``[B, C, H, W]`` or ``[B, C, D, H, W]``, differentiable in pred.

    Every (b, c) channel is one instance. Per instance: sum over homology dimensions k of
    ``dims[k] * (sum_matched 2 ||(b, d) - (b', d')||^2 + sum_unmatched_pred (b - d)^2 +
    sum_unmatched_target (b' - d')^2)``; the last term (constant in pred) only with
    ``include_target_unmatched``. ``reduction``: "mean" over the B*C instances, "sum", or "none"
    (a [B, C] tensor). ``bothlevel`` adds the superlevel and sublevel losses.
    """
    _check_tensor(pred, "pred")
    _check_tensor(target, "target")
    _check_choice(filtration, "filtration", FILTRATIONS)
    _check_choice(reduction, "reduction", REDUCTIONS)
    if not pred.is_floating_point():
        raise TypeError(f"pred must be a floating-point tensor of probabilities, got {pred.dtype}")
    D = _check_images(pred, "pred", True)
    _check_pair(pred, target)
    _check_device(pred, "pred", needs_kernels=True)
    _check_no_nan(pred, "pred")
    _check_no_nan(target, "target")
    B, C = pred.shape[:2]
    spatial = tuple(pred.shape[2:])
    weights = _weights(dims, D, pred.device)
    x = _float(pred).reshape((-1,) + spatial)
    y = target.detach().to(x.dtype).reshape((-1,) + spatial)
    N = x.shape[0]
    xp, yp, f, g, npasses = _prepare(x, y, filtration, relative)
    rows, _ = _core_pairs(f, g, bool(strict), bool(include_target_unmatched))
    rows = rows.to(pred.device)
    w3 = weights[:, None].expand(D, 3).contiguous()
    loss = ops.betti_matching_loss_rows(
        xp.reshape(xp.shape[0], -1).contiguous(), yp.reshape(yp.shape[0], -1).contiguous(), rows, w3
    )
    if npasses == 2:
        loss = loss[:N] + loss[N:]
    return _reduce(loss.to(pred.dtype), reduction, B, C)


def _binarize(x, threshold, filtration):
    """{0, 1} in float32 whatever x's dtype (bool, int or float targets beside any pred: the core matches
    two images of one dtype)."""
    x = x.detach()
    x = x.to(torch.float32) if not x.is_floating_point() else _float(x)
    if filtration == "sublevel":
        return (x <= threshold).to(torch.float32)
    return (x >= threshold).to(torch.float32)


def _metric_inputs(pred, target, threshold, filtration, reduction, allowed):
    _check_tensor(pred, "pred")
    _check_tensor(target, "target")
    _check_choice(filtration, "filtration", allowed)
    _check_choice(reduction, "reduction", REDUCTIONS)
    D = _check_images(pred, "pred", True)
    _check_pair(pred, target)
    _check_device(pred, "pred")
    _check_no_nan(pred, "pred")
    _check_no_nan(target, "target")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return D


def betti_matching_error(
    pred,
    target,
    threshold: float = 0.5,
    filtration: str = "superlevel",
    relative: bool = False,
    dims: Sequence[float] | None = None,
    reduction: str = "none",
):
    """Betti matching error: the number of unmatched bars between the binarised prediction and target
    (the Betti matching loss of the binarised inputs), per (b, c) instance ([B, C] with reduction
    "none"). Binarisation: p >= threshold is foreground (p <= threshold for "sublevel"); "bothlevel"
    adds both. ``dims`` weights the homology dimensions."""
    D = _metric_inputs(pred, target, threshold, filtration, reduction, FILTRATIONS)
    B, C = pred.shape[:2]
    spatial = tuple(pred.shape[2:])
    weights = _weights(dims, D, "cpu")
    total = 0
    for flt in (["superlevel", "sublevel"] if filtration == "bothlevel" else [filtration]):
        # binarised in the filtration's own sense, then matched as a superlevel filtration of {0, 1}
        x = _binarize(pred, threshold, flt).reshape((-1,) + spatial)
        y = _binarize(target, threshold, flt).reshape((-1,) + spatial)
        _, _, f, g, _ = _prepare(x, y, "superlevel", relative)
        _, counts = _core_pairs(f, g, False, True)
        unmatched = counts[:, :, 1] + counts[:, :, 2]  # [N, D]
        total = total + (unmatched.to(torch.float64) * weights).sum(1)
    out = total.to(pred.device, torch.float32 if not pred.is_floating_point() else _float(pred).dtype)
    return _reduce(out, reduction, B, C)


def betti_number_error(
    pred,
    target,
    threshold: float = 0.5,
    filtration: str = "superlevel",
    relative: bool = False,
    dims: Sequence[float] | None = None,
    reduction: str = "none",
):
    """Betti number error: sum over homology dimensions of |beta_k(pred) - beta_k(target)| of the
    binarised images (p >= threshold is foreground; p <= threshold for "sublevel"), per (b, c)
    instance ([B, C] with reduction "none"). ``dims`` weights the dimensions."""
    D = _metric_inputs(pred, target, threshold, filtration, reduction, ("superlevel", "sublevel"))
    B, C = pred.shape[:2]
    spatial = tuple(pred.shape[2:])
    weights = _weights(dims, D, "cpu")

    def betti(x):
        xb = _binarize(x, threshold, filtration).reshape((-1,) + spatial)
        if relative:
            xb = _frame(xb, True)
        (f,) = _to_host(1 - xb)
        _, counts = ops.persistence_pairs(f.contiguous(), False)
        betti = counts.to(torch.float64)
        # every finite bar of a binary image is born in the foreground; the essential class counts
        # when the foreground is not empty
        betti[:, 0] += (f.reshape(f.shape[0], -1) == 0).any(1).to(torch.float64)
        return betti

    err = ((betti(pred) - betti(target)).abs() * weights).sum(1)
    out = err.to(pred.device, torch.float32 if not pred.is_floating_point() else _float(pred).dtype)
    return _reduce(out, reduction, B, C)
