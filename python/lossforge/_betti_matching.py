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
  the values at the critical pixels (the pairing is fixed). The options of topolosses'
  BettiMatchingLoss (include_background, activation, topology_weights, push_unmatched_to_1_0,
  barcode_length_threshold, sphere, "bothlevels") follow its definitions (docs/switching-betti.md).
- Data checks (NaN, and for the loss values outside [0, 1]) run inside the ops, on the host copy the
  core needs anyway: the losses and metrics compile with torch.compile(fullgraph=True).

The combinatorial core runs on the CPU (all instances in parallel on torch's thread pool, GIL
released); for CUDA inputs the filtration values make one trip to the host and the pairs one trip
back, and the loss and its backward run on the device.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import Tensor

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
ACTIVATIONS = (None, "sigmoid", "softmax")

# ---------------------------------------------------------------------------------------------
# fake (meta) implementations and autograd


def _check_images_fake(x, op, arg):
    torch._check(x.dtype in (torch.float32, torch.float64),
                 lambda: f"{op}: {arg} must be float32 or float64, got {x.dtype}")
    torch._check(x.dim() in (3, 4), lambda: f"{op}: {arg} must have shape [N, H, W] or [N, D, H, W], got a "
                                            f"{x.dim()}-d tensor")


@register_fake("lossforge::betti_matching_pairs")
def _pairs_fake(f, g, strict, include_target_unmatched):
    op = "betti_matching_pairs"
    _check_images_fake(f, op, "f")
    _check_images_fake(g, op, "g")
    torch._check(f.dtype == g.dtype, lambda: f"{op}: f and g must have the same dtype")
    torch._check(f.shape == g.shape, lambda: f"{op}: f and g must have the same shape")
    ctx = torch.library.get_ctx()
    n = ctx.new_dynamic_size()
    rows = f.new_empty((n, 5), dtype=torch.int64)
    counts = f.new_empty((f.shape[0], f.dim() - 1, 3), dtype=torch.int64)
    return rows, counts


@register_fake("lossforge::persistence_pairs")
def _barcode_fake(x, include_essential):
    _check_images_fake(x, "persistence_pairs", "x")
    ctx = torch.library.get_ctx()
    n = ctx.new_dynamic_size()
    return x.new_empty((n, 3), dtype=torch.int64), x.new_empty((x.shape[0], x.dim() - 1), dtype=torch.int64)


def _check_loss_args_fake(pred, target, rows, weights, op):
    torch._check(pred.dtype in (torch.float32, torch.float64),
                 lambda: f"{op}: pred must be float32 or float64, got {pred.dtype}")
    torch._check(target.dtype == pred.dtype, lambda: f"{op}: target must be {pred.dtype}, got {target.dtype}")
    torch._check(rows.dtype == torch.int64, lambda: f"{op}: rows must be int64, got {rows.dtype}")
    torch._check(weights.dtype == torch.float64, lambda: f"{op}: weights must be float64, got {weights.dtype}")
    torch._check(pred.dim() == 2, lambda: f"{op}: pred must have shape [N, V]")
    torch._check(target.shape == pred.shape, lambda: f"{op}: target must have pred's shape [N, V]")
    torch._check(rows.dim() == 2 and rows.shape[1] == 5, lambda: f"{op}: rows must have shape [P, 5]")
    torch._check(weights.dim() == 2 and weights.shape[1] == 3 and weights.shape[0] >= 1,
                 lambda: f"{op}: weights must have shape [D, 3]")


@register_fake("lossforge::betti_matching_loss_rows")
def _loss_rows_fake(pred, target, rows, weights):
    _check_loss_args_fake(pred, target, rows, weights, "betti_matching_loss_rows")
    return pred.new_empty((pred.shape[0],))


@register_fake("lossforge::betti_matching_loss_rows_backward")
def _loss_rows_backward_fake(grad, pred, target, rows, weights):
    op = "betti_matching_loss_rows_backward"
    _check_loss_args_fake(pred, target, rows, weights, op)
    torch._check(grad.dtype == pred.dtype, lambda: f"{op}: grad must be {pred.dtype}, got {grad.dtype}")
    torch._check(grad.numel() == pred.shape[0], lambda: f"{op}: grad must have one element per instance")
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
    tensors of a dimension is one matched pair. With ``relative=True`` or ``sphere=True`` the
    coordinates index the padded image (one pixel of frame on each side).
    """

    pred_matched_birth: list[Tensor]
    pred_matched_death: list[Tensor]
    target_matched_birth: list[Tensor]
    target_matched_death: list[Tensor]
    pred_unmatched_birth: list[Tensor]
    pred_unmatched_death: list[Tensor]
    target_unmatched_birth: list[Tensor]
    target_unmatched_death: list[Tensor]
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

    births: list[Tensor]
    deaths: list[Tensor]
    birth_coords: list[Tensor]
    death_coords: list[Tensor]
    filtration: str = "superlevel"


# ---------------------------------------------------------------------------------------------
# validation


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _filtration(value: Any, allowed: Sequence[str] = FILTRATIONS) -> str:
    """The filtration's name: also topolosses' spelling "bothlevels" and its FiltrationType members."""
    value = getattr(value, "value", value)
    if value == "bothlevels" and "bothlevel" in allowed:
        value = "bothlevel"
    _check_choice(value, "filtration", allowed)
    return value


def _check_flag(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


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


def _check_number(value, name, minimum=0.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def _weights(dims, D, device, topology_weights=(1.0, 1.0)):
    """[D, 3] float64: per homology dimension (rows) the weights of the matched, unmatched pred and
    unmatched target terms."""
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
    tw = _topology_weights(topology_weights)
    return torch.tensor([[wk * tw[0], wk * tw[1], wk] for wk in w], dtype=torch.float64, device=device)


def _topology_weights(tw):
    try:
        tw = tuple(float(v) for v in tw)
    except TypeError:
        raise TypeError(f"topology_weights must be a pair (matched, unmatched) of weights, got {tw!r}") from None
    if len(tw) != 2 or any(not math.isfinite(v) or v < 0 for v in tw):
        raise ValueError(f"topology_weights must be two finite non-negative weights (matched, unmatched), got {tw}")
    return tw


def _float(x):
    """The dtype the core works in: float32, or float64 for float64 inputs."""
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def _values_error(x: Tensor, name: str, probabilities: bool) -> str | None:
    """Why x (a host tensor) cannot be matched, or None. NaN always; with ``probabilities`` also
    +-inf and values outside [0, 1]."""
    lo, hi = (float(v) for v in torch.aminmax(x))  # one pass; NaN propagates into both
    if math.isnan(lo) or math.isnan(hi):
        return f"{name} contains NaN"
    if not probabilities or (0.0 <= lo and hi <= 1.0):
        return None
    if name == "pred":
        return (f"pred has values outside [0, 1] (min {lo:.4g}, max {hi:.4g}): the Betti matching loss takes "
                "probabilities; for logits pass activation='sigmoid' (or activation='softmax' over the channels)")
    return (f"{name} has values outside [0, 1] (min {lo:.4g}, max {hi:.4g}): pass a {{0, 1}} mask or probabilities "
            "(a {0, 255} mask: (target > 0).float())")


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


def _pad(x, superlevel, relative, sphere):
    if relative:
        return _frame(x, superlevel)
    if sphere:  # topolosses' sphere: a frame of background (probability 0) around every image
        return torch.nn.functional.pad(x, (1, 1) * (x.dim() - 1), value=0.0)
    return x


def _prepare(x, y, filtration, relative, sphere=False):
    """The instances to match, as (p-space values, sublevel f-space values) for pred and target;
    bothlevel stacks the superlevel instances on top of the sublevel ones. The f-space pred values
    keep x's autograd graph."""
    passes = ["superlevel", "sublevel"] if filtration == "bothlevel" else [filtration]
    ps, ts, fs, gs = [], [], [], []
    for flt in passes:
        sup = flt == "superlevel"
        xp = _pad(x, sup, relative, sphere)
        yp = _pad(y, sup, relative, sphere)
        ps.append(xp)
        ts.append(yp)
        fs.append((1 - xp) if sup else xp)
        gs.append((1 - yp) if sup else yp)
    cat = (lambda l: l[0]) if len(passes) == 1 else (lambda l: torch.cat(l))
    return cat(ps), cat(ts), cat(fs), cat(gs), len(passes)


def _to_host(*ts):
    """One device-to-host copy for all tensors (a no-op on the CPU)."""
    if ts[0].device.type == "cpu":
        return [t.contiguous() for t in ts]
    return list(torch.stack(ts).cpu().unbind(0))


# The host part of every entry point, as ops: the copy to the host, the data checks (which need the
# values, so they cannot be traced) and the combinatorial core. torch.compile keeps them opaque, so
# the losses and metrics compile with fullgraph=True; their checks raise the same ValueError there.


@torch.library.custom_op("lossforge::_betti_matching_rows", mutates_args=())
def _matching_rows(pred: Tensor, target: Tensor, filtration: str, relative: bool, sphere: bool, strict: bool,
                   include_target_unmatched: bool, probabilities: bool) -> tuple[Tensor, Tensor]:
    """betti_matching_pairs of the prepared instances of pred, target ([N, *spatial], one float dtype,
    p-space), after the data checks; rows and counts on pred's device."""
    x, y = _to_host(pred, target)
    for t, name in ((x, "pred"), (y, "target")):
        msg = _values_error(t, name, probabilities)
        if msg is not None:
            raise ValueError(msg)
    _, _, f, g, _ = _prepare(x, y, filtration, relative, sphere)
    rows, counts = ops.betti_matching_pairs(f.contiguous(), g.contiguous(), strict, include_target_unmatched)
    return rows.to(pred.device), counts.to(pred.device)


@_matching_rows.register_fake
def _matching_rows_fake(pred, target, filtration, relative, sphere, strict, include_target_unmatched, probabilities):
    n = torch.library.get_ctx().new_dynamic_size()
    N = pred.shape[0] * (2 if filtration == "bothlevel" else 1)
    return pred.new_empty((n, 5), dtype=torch.int64), pred.new_empty((N, pred.dim() - 1, 3), dtype=torch.int64)


@torch.library.custom_op("lossforge::_persistence_rows", mutates_args=())
def _persistence_rows(image: Tensor, superlevel: bool, include_essential: bool, name: str) -> tuple[Tensor, Tensor]:
    """persistence_pairs of image ([N, *spatial] float) in the given filtration, after the NaN check."""
    (x,) = _to_host(image)
    msg = _values_error(x, name, False)
    if msg is not None:
        raise ValueError(msg)
    f = (1 - x) if superlevel else x
    rows, counts = ops.persistence_pairs(f.contiguous(), include_essential)
    return rows.to(image.device), counts.to(image.device)


@_persistence_rows.register_fake
def _persistence_rows_fake(image, superlevel, include_essential, name):
    n = torch.library.get_ctx().new_dynamic_size()
    return image.new_empty((n, 3), dtype=torch.int64), image.new_empty((image.shape[0], image.dim() - 1),
                                                                      dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# public API


def _unravel(idx, shape):
    """Flat pixel indices [n] -> coordinates [n, D] (C order)."""
    coords = []
    for s in reversed(shape):
        coords.append(idx % s)
        idx = idx // s
    return torch.stack(coords[::-1], dim=1) if coords else idx[:, None]


def persistence_barcode(image: Tensor, filtration: str = "superlevel", *,
                        include_essential: bool = False) -> PersistenceBarcode | list[PersistenceBarcode]:
    """Persistence barcode of the V-construction cubical complex of a 2D or 3D image.

    Args:
        image: ``[H, W]`` or ``[D, H, W]`` (one image, returns one :class:`PersistenceBarcode`) or a
            batch ``[B, C, H, W]`` / ``[B, C, D, H, W]`` (returns a flat list of B*C barcodes in
            row-major (b, c) order). Any real dtype and range (NaN raises ``ValueError``); on the CPU or
            CUDA (the core runs on the CPU, the results live on the image's device).
        filtration: "superlevel" (features appear as the value decreases: the usual choice for
            probabilities) or "sublevel".
        include_essential: also report the essential H0 bar (death at -inf / +inf).

    Bars come in the order of the Betti-Matching-3D reference's ``compute_barcode`` (tested), in
    every dimension.

    Under ``torch.compile`` the result's variable number of bars per dimension is Python data: the
    function compiles with graph breaks (``fullgraph=False``), and gives the eager result.

    >>> import torch, lossforge
    >>> img = torch.tensor([[0.9, 0.1, 0.8], [0.1, 0.1, 0.1], [0.7, 0.1, 0.6]])
    >>> bc = lossforge.persistence_barcode(img)
    >>> [len(b) for b in bc.births]  # four components (one essential, left out), no loop
    [3, 0]
    >>> [round(v, 2) for v in bc.births[0].tolist()], [round(v, 2) for v in bc.deaths[0].tolist()]
    ([0.8, 0.7, 0.6], [0.1, 0.1, 0.1])
    """
    _check_tensor(image, "image")
    filtration = _filtration(filtration, ("superlevel", "sublevel"))
    _check_flag(include_essential, "include_essential")
    D = _check_images(image, "image", None)
    _check_device(image, "image")
    batched = image.dim() == D + 2
    spatial = tuple(image.shape[-D:])
    x = image.detach()
    x = x.to(torch.float32) if not x.is_floating_point() else _float(x)
    x = x.reshape((-1,) + spatial)
    rows, counts = _persistence_rows(x, filtration == "superlevel", include_essential, "image")
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


def _check_frame_options(relative, sphere):
    _check_flag(relative, "relative")
    _check_flag(sphere, "sphere")
    if relative and sphere:
        raise ValueError("relative=True and sphere=True both pad a frame: choose one")


def betti_matching(pred: Tensor, target: Tensor, filtration: str = "superlevel", *, relative: bool = False,
                   sphere: bool = False, strict: bool = False) -> (
        BettiMatchingResult | tuple[BettiMatchingResult, BettiMatchingResult]
        | list[BettiMatchingResult] | list[tuple[BettiMatchingResult, BettiMatchingResult]]):
    """Betti matching between a prediction and a target (2D or 3D).

    Args:
        pred, target: ``[H, W]`` / ``[D, H, W]`` (one pair: returns one :class:`BettiMatchingResult`)
            or batches ``[B, C, H, W]`` / ``[B, C, D, H, W]`` (a flat list of B*C results in row-major
            (b, c) order), probabilities (any real dtype; the target may be bool / integer). Any range
            (NaN raises ``ValueError``).
        filtration: "superlevel" (f = 1 - p), "sublevel" (f = p) or "bothlevel" (also spelled
            "bothlevels"; each result becomes a tuple (superlevel result, sublevel result)).
        relative: pad each image with a one-pixel frame at the value that enters first (homology
            relative to the image border); coordinates then index the padded image.
        sphere: pad each image with a one-pixel frame of 0 (topolosses' ``sphere``); coordinates then
            index the padded image.
        strict: match only through non-empty image bars.

    Order: the same pairs as the Betti-Matching-3D reference's ``compute_matching`` in its order, per
    dimension and list (tested in 2D and 3D; in 3D dimension 1 the matched pairs follow the death
    faces of the comparison image's bars, the unmatched bars their own death faces, in filtration
    order).

    Under ``torch.compile`` the result (a variable number of pairs per dimension, as Python data)
    needs graph breaks: it compiles with ``fullgraph=False`` and gives the eager result.

    >>> import torch, lossforge
    >>> pred = torch.tensor([[0.9, 0.2, 0.8], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]])
    >>> target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> res = lossforge.betti_matching(pred, target)
    >>> res.num_matched, res.num_unmatched_pred, res.num_unmatched_target
    ([0, 0], [1, 0], [0, 0])
    >>> res.pred_unmatched_birth[0].tolist()  # the extra component, born at (0, 2)
    [[0, 2]]
    """
    _check_tensor(pred, "pred")
    _check_tensor(target, "target")
    filtration = _filtration(filtration)
    _check_frame_options(relative, sphere)
    _check_flag(strict, "strict")
    D = _check_images(pred, "pred", None)
    _check_pair(pred, target)
    _check_device(pred, "pred")
    batched = pred.dim() == D + 2
    spatial = tuple(pred.shape[-D:])
    x = pred.detach()
    x = _float(x) if x.is_floating_point() else x.to(torch.float32)
    y = target.detach().to(x.dtype)
    x = x.reshape((-1,) + spatial)
    y = y.reshape((-1,) + spatial)
    N = x.shape[0]
    rows, counts = _matching_rows(x, y, filtration, relative, sphere, strict, True, False)
    pshape = tuple(s + 2 for s in spatial) if (relative or sphere) else spatial
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


def _activate(pred: Tensor, activation: str | None) -> Tensor:
    """topolosses' sigmoid / softmax (over the channels) options, on [B, C, ...] inputs."""
    _check_choice(activation, "activation", ACTIVATIONS)
    if activation == "sigmoid":
        return torch.sigmoid(pred)
    if activation == "softmax":
        if pred.shape[1] == 1:
            raise ValueError("activation='softmax' needs several channels (pred has 1): use 'sigmoid' for one "
                             "foreground channel")
        return torch.softmax(pred, 1)
    return pred


def _loss_rows_torch(fx, fy, rows, w, D, push, threshold):
    """The per-instance loss over the rows in plain torch, on filtration values (f = 1 - p for
    superlevel instances): the options the kernel does not have. push: unmatched bars pushed to
    (birth, death) = (1, 0), 2 ((b - 1)^2 + d^2); threshold: unmatched prediction bars with
    |b - d| <= threshold left out (topolosses' definitions)."""
    seg = rows[:, 0]
    n, kind, k = seg // (3 * D), seg % 3, (seg % (3 * D)) // 3
    V = fx.shape[1]
    px, py = fx.reshape(-1), fy.reshape(-1)
    a, b = px[n * V + rows[:, 1].clamp(min=0)], px[n * V + rows[:, 2].clamp(min=0)]
    c, d = py[n * V + rows[:, 3].clamp(min=0)], py[n * V + rows[:, 4].clamp(min=0)]
    matched = 2 * ((a - c) ** 2 + (b - d) ** 2)
    if push:
        up, ut = 2 * ((a - 1) ** 2 + b ** 2), 2 * ((c - 1) ** 2 + d ** 2)
    else:
        up, ut = (a - b) ** 2, (c - d) ** 2
    if threshold > 0:
        up = torch.where((a - b).abs() > threshold, up, torch.zeros_like(up))
    term = torch.where(kind == 0, matched, torch.where(kind == 1, up, ut)) * w.to(fx.dtype).reshape(-1)[3 * k + kind]
    return torch.zeros(fx.shape[0], dtype=fx.dtype, device=fx.device).index_add(0, n, term)


def betti_matching_loss(
    pred: Tensor,
    target: Tensor,
    filtration: str = "superlevel",
    *,
    activation: str | None = None,
    include_background: bool = False,
    topology_weights: tuple[float, float] = (1.0, 1.0),
    push_unmatched_to_1_0: bool = False,
    barcode_length_threshold: float = 0.0,
    sphere: bool = False,
    relative: bool = False,
    strict: bool = False,
    dims: Sequence[float] | None = None,
    include_target_unmatched: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """Betti matching loss of probabilities ``[B, C, H, W]`` or ``[B, C, D, H, W]``, differentiable in pred.

    Every (b, c) channel is one instance. Per instance: sum over homology dimensions k of
    ``dims[k] * (sum_matched 2 ||(b, d) - (b', d')||^2 + sum_unmatched_pred (b - d)^2 +
    sum_unmatched_target (b' - d')^2)``. The defaults and options are topolosses' ``BettiMatchingLoss``
    (with ``use_base_loss=False``; :class:`lossforge.nn.DiceBettiMatchingLoss` is its default):

    Args:
        pred: probabilities in [0, 1] (values outside, +-inf and NaN raise ``ValueError``), or
            logits with ``activation``. Any floating dtype (half precision computes in float32).
        target: pred's shape, values in [0, 1] (a {0, 1} mask, bool, integer or float; a {0, 255}
            mask raises ``ValueError``).
        filtration: "superlevel" (f = 1 - p), "sublevel" (f = p) or "bothlevel" (also spelled
            "bothlevels"): the mean of the two per instance, as topolosses averages them.
        activation: None, "sigmoid", or "softmax" over the channels, applied to pred first.
        include_background: keep channel 0; by default it is left out when C > 1 (a single channel
            is always used), and reduction "none" returns ``[B, C - 1]``.
        topology_weights: (matched, unmatched) weights of the matched pairs' terms and of the
            prediction's unmatched bars' terms (the target's unmatched bars keep weight 1).
        push_unmatched_to_1_0: unmatched bars cost 2 ((b - 1)^2 + d^2) instead of (b - d)^2, b and d
            their values in the filtration image f (topolosses' definition).
        barcode_length_threshold: leave out the prediction's unmatched bars with |b - d| <= this.
        sphere: pad each image with a one-pixel frame of 0 (background) on every side.
        relative: pad each image with a frame at the value that enters the filtration first.
        strict: match only through non-empty image bars.
        dims: per-homology-dimension weights (D values).
        include_target_unmatched: keep the target's unmatched bars' terms (constant in pred).
        reduction: "mean" over the instances, "sum", or "none" (a ``[B, C]`` tensor).

    >>> import torch, lossforge
    >>> pred = torch.tensor([[[[0.9, 0.2, 0.8], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]]]])
    >>> target = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])
    >>> lossforge.betti_matching_loss(pred, target)  # (0.8 - 0.2)^2 for the extra component
    tensor(0.3600)
    """
    _check_tensor(pred, "pred")
    _check_tensor(target, "target")
    filtration = _filtration(filtration)
    _check_choice(reduction, "reduction", REDUCTIONS)
    _check_flag(include_background, "include_background")
    _check_flag(push_unmatched_to_1_0, "push_unmatched_to_1_0")
    _check_flag(strict, "strict")
    _check_flag(include_target_unmatched, "include_target_unmatched")
    _check_frame_options(relative, sphere)
    threshold = _check_number(barcode_length_threshold, "barcode_length_threshold")
    if not pred.is_floating_point():
        raise TypeError(f"pred must be a floating-point tensor of probabilities, got {pred.dtype}")
    D = _check_images(pred, "pred", True)
    _check_pair(pred, target)
    _check_device(pred, "pred", needs_kernels=True)
    weights = _weights(dims, D, pred.device, topology_weights)
    x = _activate(pred, activation)
    y = target.detach()
    if not include_background and x.shape[1] > 1:
        x, y = x[:, 1:], y[:, 1:]
    B, C = x.shape[:2]
    spatial = tuple(x.shape[2:])
    x = _float(x).reshape((-1,) + spatial)
    y = y.to(x.dtype).reshape((-1,) + spatial)
    N = x.shape[0]
    rows, _ = _matching_rows(x.detach(), y, filtration, relative, sphere, strict, include_target_unmatched, True)
    xp, yp, fx, fy, npasses = _prepare(x, y, filtration, relative, sphere)
    if push_unmatched_to_1_0 or threshold > 0:
        loss = _loss_rows_torch(fx.reshape(fx.shape[0], -1), fy.reshape(fy.shape[0], -1), rows, weights, D,
                                push_unmatched_to_1_0, threshold)
    else:  # the kernel reads p: its squared differences are the same in f = 1 - p
        loss = ops.betti_matching_loss_rows(
            xp.reshape(xp.shape[0], -1).contiguous(), yp.reshape(yp.shape[0], -1).contiguous(), rows, weights
        )
    if npasses == 2:
        loss = 0.5 * (loss[:N] + loss[N:])
    return _reduce(loss.to(pred.dtype), reduction, B, C)


def _binarize(x, threshold, filtration):
    """{0, 1} in float32 whatever x's dtype (bool, int or float targets beside any pred: the core matches
    two images of one dtype); NaN stays NaN, for the op's check."""
    x = x.detach()
    x = x.to(torch.float32) if not x.is_floating_point() else _float(x)
    b = (x <= threshold) if filtration == "sublevel" else (x >= threshold)
    return torch.where(torch.isnan(x), torch.full_like(x, float("nan")), b.to(x.dtype)).to(torch.float32)


def _metric_inputs(pred, target, threshold, filtration, reduction, relative, allowed):
    _check_tensor(pred, "pred")
    _check_tensor(target, "target")
    filtration = _filtration(filtration, allowed)
    _check_choice(reduction, "reduction", REDUCTIONS)
    _check_flag(relative, "relative")
    D = _check_images(pred, "pred", True)
    _check_pair(pred, target)
    _check_device(pred, "pred")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return D, filtration


def betti_matching_error(
    pred: Tensor,
    target: Tensor,
    threshold: float = 0.5,
    filtration: str = "superlevel",
    *,
    relative: bool = False,
    dims: Sequence[float] | None = None,
    reduction: str = "none",
) -> Tensor:
    """Betti matching error: the number of unmatched bars between the binarised prediction and target
    (the Betti matching loss of the binarised inputs), per (b, c) instance ([B, C] with reduction
    "none"; every channel counts). Binarisation: p >= threshold is foreground (p <= threshold for
    "sublevel"), so any target values work (a {0, 255} mask with threshold 0.5 too); NaN raises
    ``ValueError``. "bothlevel" adds both counts. ``dims`` weights the homology dimensions.

    >>> import torch, lossforge
    >>> pred = torch.tensor([[[[0.9, 0.2, 0.8], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]]]])
    >>> target = torch.tensor([[[[1, 0, 0], [0, 0, 0], [0, 0, 0]]]])
    >>> lossforge.betti_matching_error(pred, target)
    tensor([[1.]])
    """
    D, filtration = _metric_inputs(pred, target, threshold, filtration, reduction, relative, FILTRATIONS)
    B, C = pred.shape[:2]
    spatial = tuple(pred.shape[2:])
    weights = _weights(dims, D, pred.device)[:, 2]
    total = 0
    for flt in (["superlevel", "sublevel"] if filtration == "bothlevel" else [filtration]):
        # binarised in the filtration's own sense, then matched as a superlevel filtration of {0, 1}
        x = _binarize(pred, threshold, flt).reshape((-1,) + spatial)
        y = _binarize(target, threshold, flt).reshape((-1,) + spatial)
        _, counts = _matching_rows(x, y, "superlevel", relative, False, False, True, False)
        unmatched = counts[:, :, 1] + counts[:, :, 2]  # [N, D]
        total = total + (unmatched.to(torch.float64) * weights).sum(1)
    out = total.to(torch.float32 if not pred.is_floating_point() else _float(pred).dtype)
    return _reduce(out, reduction, B, C)


def betti_number_error(
    pred: Tensor,
    target: Tensor,
    threshold: float = 0.5,
    filtration: str = "superlevel",
    *,
    relative: bool = False,
    dims: Sequence[float] | None = None,
    reduction: str = "none",
) -> Tensor:
    """Betti number error: sum over homology dimensions of |beta_k(pred) - beta_k(target)| of the
    binarised images (p >= threshold is foreground; p <= threshold for "sublevel"; any target values,
    NaN raises ``ValueError``), per (b, c) instance ([B, C] with reduction "none"). ``dims`` weights
    the dimensions.

    >>> import torch, lossforge
    >>> pred = torch.tensor([[[[0.9, 0.2, 0.8], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]]]])
    >>> target = torch.tensor([[[[1, 0, 0], [0, 0, 0], [0, 0, 0]]]])
    >>> lossforge.betti_number_error(pred, target)  # two components against one
    tensor([[1.]])
    """
    D, filtration = _metric_inputs(pred, target, threshold, filtration, reduction, relative,
                                   ("superlevel", "sublevel"))
    B, C = pred.shape[:2]
    spatial = tuple(pred.shape[2:])
    weights = _weights(dims, D, pred.device)[:, 2]

    def betti(x, name):
        xb = _binarize(x, threshold, filtration).reshape((-1,) + spatial)
        if relative:
            xb = _frame(xb, True)
        _, counts = _persistence_rows(xb, True, False, name)
        betti = counts.to(torch.float64)
        # every finite bar of a binary image is born in the foreground; the essential class counts
        # when the foreground is not empty
        ess = (xb.reshape(xb.shape[0], -1) == 1).any(1).to(torch.float64)
        return torch.cat([betti[:, :1] + ess[:, None], betti[:, 1:]], 1)

    err = ((betti(pred, "pred") - betti(target, "target")).abs() * weights).sum(1)
    out = err.to(torch.float32 if not pred.is_floating_point() else _float(pred).dtype)
    return _reduce(out, reduction, B, C)
