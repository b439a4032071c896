"""StableMax, StableMax cross-entropy and ⊥Grad (Prieto et al. 2025, "Grokking at the Edge of
Numerical Stability").

    s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0);   stablemax(x)_i = s(x_i) / sum_j s(x_j)

StableMax-CE equals softmax-CE of t = sign(x) * log1p(|x|), so every F.cross_entropy option carries
over, class-probability targets included. The kernels read the logits once in the forward (twice
with label smoothing) and once in the backward, keep O(rows) state (the non-target sum, the full sum
and the target's weight per row), accumulate in float32 (float64 for float64 input), and take one
branch per element: gradients are finite at logits of exactly 1.0, confident rows keep their (tiny)
loss in float32, and -inf logits are masked out.

Autocast follows torch's cast lists: the cross-entropy losses are on autocast's float32 list, as
F.cross_entropy is (a float16/bfloat16 loss comes back in float32); the fused linear loss runs its
GEMMs in the autocast dtype, as F.linear does. DTensors sharded over the batch dimension are split
into their local shards and the reduction is combined across the mesh.
"""
from __future__ import annotations

import math
import sys

import torch

from ._ops import ops, register_fake

__all__ = [
    "stablemax",
    "log_stablemax",
    "stablemax_cross_entropy",
    "fused_linear_stablemax_cross_entropy",
    "collapse_fraction",
]

_FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_REDUCTIONS = ("none", "mean", "sum")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- op registrations: shapes (fake) and autograd ----------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# The fake kernels repeat the kernels' own checks (csrc/stablemax/stablemax.h) with torch._check, so that a
# direct torch.ops.lossforge.* call under torch.compile fails while tracing with the message of eager.
def _fake_input(x, op, arg):
    torch._check(x.dtype in _FLOATING, lambda: f"{op}: {arg} must be float32, float64, bfloat16 or float16, "
                                               f"got {_dtype_name(x.dtype)}")
    torch._check(x.is_contiguous(), lambda: f"{op}: {arg} must be contiguous")


def _fake_rows(x, dim, op):
    """The kernels' split_at_dim: checks dim and returns (rows, classes)."""
    torch._check(x.dim() > 0, lambda: f"{op}: expected a tensor with at least one dimension")
    torch._check(-x.dim() <= dim < x.dim(), lambda: f"{op}: dim {dim} is out of range for a {x.dim()}-d tensor")
    dim %= x.dim()
    return math.prod(x.shape[:dim]) * math.prod(x.shape[dim + 1:]), x.shape[dim]


def _fake_acc(t, input, op, arg):
    acc = _acc_dtype(input.dtype)
    torch._check(t.dtype == acc, lambda: f"{op}: {arg} must be {_dtype_name(acc)}, got {_dtype_name(t.dtype)}")
    torch._check(t.is_contiguous(), lambda: f"{op}: {arg} must be contiguous")


def _fake_ce_args(input, target, weight, dim, op):
    _fake_input(input, op, "input")
    torch._check(target.dtype == torch.int64, lambda: f"{op}: target must be int64, got {_dtype_name(target.dtype)}")
    torch._check(target.is_contiguous(), lambda: f"{op}: target must be contiguous")
    rows, classes = _fake_rows(input, dim, op)
    torch._check(target.numel() == rows, lambda: f"{op}: target has {target.numel()} elements, expected {rows} "
                                                 f"(input's shape without the class dimension)")
    if weight is not None:
        _fake_acc(weight, input, op, "weight")
        torch._check(weight.dim() == 1 and weight.shape[0] == classes,
                     lambda: f"{op}: weight must have shape [{classes}] (one entry per class)")
    return rows


@register_fake("lossforge::stablemax")
def _stablemax_fake(x, dim, log):
    _fake_input(x, "stablemax", "x")
    _fake_rows(x, dim, "stablemax")
    return torch.empty_like(x)


@register_fake("lossforge::stablemax_backward")
def _stablemax_backward_fake(grad, x, out, dim, log):
    op = "stablemax_backward"
    for t, name in ((x, "x"), (grad, "grad"), (out, "out")):
        _fake_input(t, op, name)
    torch._check(grad.dtype == x.dtype and out.dtype == x.dtype,
                 lambda: f"{op}: grad, x and out must have the same dtype")
    torch._check(grad.shape == x.shape and out.shape == x.shape,
                 lambda: f"{op}: grad, x and out must have the same shape")
    _fake_rows(x, dim, op)
    return torch.empty_like(x)


def _stablemax_setup(ctx, inputs, output):
    x, dim, log = inputs
    ctx.save_for_backward(x, output)
    ctx.dim, ctx.log = dim, log


def _stablemax_backward(ctx, grad):
    x, out = ctx.saved_tensors
    return ops.stablemax_backward(grad.contiguous(), x, out, ctx.dim, ctx.log), None, None


torch.library.register_autograd("lossforge::stablemax", _stablemax_backward, setup_context=_stablemax_setup)


@register_fake("lossforge::stablemax_cross_entropy")
def _ce_fake(input, target, weight, dim, ignore_index, label_smoothing):
    op = "stablemax_cross_entropy"
    _fake_ce_args(input, target, weight, dim, op)
    torch._check(0.0 <= label_smoothing <= 1.0,
                 lambda: f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    acc = _acc_dtype(input.dtype)
    return target.new_empty(target.shape, dtype=acc), target.new_empty((*target.shape, 3), dtype=acc)


@register_fake("lossforge::stablemax_cross_entropy_backward")
def _ce_backward_fake(grad_rows, input, target, weight, stats, dim, ignore_index, label_smoothing):
    op = "stablemax_cross_entropy_backward"
    rows = _fake_ce_args(input, target, weight, dim, op)
    _fake_acc(grad_rows, input, op, "grad_rows")
    torch._check(grad_rows.numel() == 1 or grad_rows.numel() == rows,
                 lambda: f"{op}: grad_rows must have one element or one per row")
    _fake_acc(stats, input, op, "stats")
    torch._check(stats.numel() == 3 * rows, lambda: f"{op}: stats must have shape target.shape + [3]")
    return torch.empty_like(input)


def _ce_setup(ctx, inputs, output):
    input, target, weight, dim, ignore_index, label_smoothing = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(input, target, weight, stats)
    ctx.dim, ctx.ignore_index, ctx.label_smoothing = dim, ignore_index, label_smoothing


def _ce_backward(ctx, grad_loss, grad_stats):
    input, target, weight, stats = ctx.saved_tensors
    grad_rows = _rows_gradient(grad_loss)
    grad_input = ops.stablemax_cross_entropy_backward(
        grad_rows, input, target, weight, stats, ctx.dim, ctx.ignore_index, ctx.label_smoothing)
    return grad_input, None, None, None, None, None


def _rows_gradient(grad: torch.Tensor) -> torch.Tensor:
    """The per-row gradient as the kernel wants it: one element when it is the same for every row
    (the expanded gradient of a sum or mean), else contiguous."""
    if grad.dim() > 0 and grad.numel() > 1 and all(s == 0 for s in grad.stride()):
        return grad[(0,) * grad.dim()].reshape(1)
    return grad.contiguous()


torch.library.register_autograd("lossforge::stablemax_cross_entropy", _ce_backward, setup_context=_ce_setup)


@register_fake("lossforge::orthograd_")
def _orthograd_fake(grad, param):
    op = "orthograd_"
    _fake_input(grad, op, "grad")
    _fake_input(param, op, "param")
    torch._check(grad.dtype == param.dtype, lambda: f"{op}: grad and param must have the same dtype")
    torch._check(grad.numel() == param.numel(), lambda: f"{op}: grad and param must have the same number of elements")
    return None


# ---- validation ---------------------------------------------------------------------------------


def _check_floating(name: str, t, fn: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATING:
        raise TypeError(f"{fn}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if t.is_sparse:
        raise TypeError(f"{fn}: {name} must be a dense tensor")


def _check_dim(x: torch.Tensor, dim: int, fn: str) -> int:
    if x.dim() == 0:
        raise ValueError(f"{fn}: input must have at least one dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{fn}: dim {dim} is out of range for input of shape {list(x.shape)}")
    return dim % x.dim()


# ---- DTensor and autocast ---------------------------------------------------------------------------


def _dtensor_type():
    """DTensor's class when torch.distributed.tensor is loaded (any code holding a DTensor has loaded it;
    importing it here would add ~0.5 s to `import lossforge`), else None."""
    if torch.compiler.is_compiling():  # torch.compile has loaded it (dynamo imports it)
        return torch.distributed.tensor.DTensor if torch.distributed.is_available() else None
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _any_dtensor(*ts) -> bool:
    dt = _dtensor_type()
    return dt is not None and any(isinstance(t, dt) for t in ts)


def _reject_dtensor(fn: str, **tensors) -> None:
    if _any_dtensor(*tensors.values()):
        names = ", ".join(tensors)
        raise TypeError(f"{fn}: DTensor arguments are not supported ({names}): pass local shards (`.to_local()`, "
                        f"and combine the per-shard results yourself) or whole tensors (`.full_tensor()`)")


def _batch_sharded(fn: str, dim: int, **tensors):
    """(mesh, placements) of DTensors that are all sharded the same way over dimensions other than `dim` (the
    class dimension) or replicated; a clear TypeError for anything else."""
    dt = _dtensor_type()
    ts = list(tensors.items())
    for name, t in ts:
        if not isinstance(t, dt):
            raise TypeError(f"{fn}: {name} is a plain tensor beside DTensors: pass all of "
                            f"{', '.join(tensors)} as DTensors on one mesh, or all as plain tensors")
    mesh, placements = ts[0][1].device_mesh, tuple(ts[0][1].placements)
    for name, t in ts[1:]:
        if t.device_mesh != mesh or tuple(t.placements) != placements:
            raise TypeError(f"{fn}: {name} is placed as {tuple(t.placements)} on {t.device_mesh}, but {ts[0][0]} as "
                            f"{placements} on {mesh}: shard them alike (over the batch dimension)")
    for p in placements:
        if not (p.is_replicate() or (p.is_shard() and p.dim % ts[0][1].dim() != dim)):
            raise TypeError(f"{fn}: DTensors must be sharded over a batch dimension (e.g. Shard(0)) or replicated, "
                            f"got {placements} with the class dimension {dim}: redistribute them, or pass "
                            f"`.full_tensor()`")
    return mesh, placements


def _combine(local: torch.Tensor, mesh, placements, reduction: str):
    """A per-shard loss back as a DTensor: 'none' keeps the shards; a sum is summed across the shards of each
    sharded mesh dimension (Partial) and returned replicated."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if reduction == "none":
        return DTensor.from_local(local, mesh, placements, run_check=False)
    partial = [Partial() if p.is_shard() else Replicate() for p in placements]
    return DTensor.from_local(local, mesh, partial, run_check=False).redistribute(mesh, [Replicate()] * mesh.ndim)


def _autocast_on(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)


def _loss_dtype(x: torch.Tensor) -> torch.dtype:
    """The loss dtype of F.cross_entropy: under autocast (float32 list) a float16/bfloat16 loss is float32."""
    if x.dtype in (torch.float16, torch.bfloat16) and _autocast_on(x.device):
        return torch.float32
    return x.dtype


# CUDA autocast puts softmax and log_softmax on its float32 list: StableMax follows (CPU autocast leaves
# softmax in the input's dtype, and so StableMax too).
torch.library.register_autocast("lossforge::stablemax", "cuda", torch.float32)


# ---- public API ---------------------------------------------------------------------------------


def stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """StableMax along `dim`: s(x_i) / sum_j s(x_j). Any shape, any dim, autograd.

    Under autocast it follows torch.softmax: float32 on CUDA (the float32 list), the input's dtype on
    the CPU. A DTensor sharded over dimensions other than `dim` gives a DTensor sharded alike.

    >>> import torch, lossforge
    >>> lossforge.stablemax(torch.tensor([0.0, 1.0, -1.0]))   # s = (1, 2, 0.5)
    tensor([0.2857, 0.5714, 0.1429])
    """
    return _stablemax(x, dim, False, "stablemax")


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(stablemax(x)) along `dim`, computed as sign(x)·log1p(|x|) − log(sum s): no log of a ratio.
    Autocast and DTensors as in `stablemax`.

    >>> import torch, lossforge
    >>> lossforge.log_stablemax(torch.tensor([0.0, 1.0, -1.0])).exp()
    tensor([0.2857, 0.5714, 0.1429])
    """
    return _stablemax(x, dim, True, "log_stablemax")


def _stablemax(x, dim, log, fn):
    if _any_dtensor(x):
        mesh, placements = _batch_sharded(fn, _check_dim(x, dim, fn), x=x)
        return _combine(_stablemax(x.to_local(), dim, log, fn), mesh, placements, "none")
    _check_floating("x", x, fn)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
    dim = _check_dim(x, dim, fn)
    if x.numel() == 0:
        raise ValueError(f"{fn}: x is empty (shape {list(x.shape)})")
    return ops.stablemax(x.contiguous(), dim, log)


def _check_target(target, device, fn):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype != torch.int64:
        hint = (" (class-probability targets are not supported here: compute the logits and use "
                "stablemax_cross_entropy)") if target.is_floating_point() else ""
        raise TypeError(f"{fn}: target must be int64 class indices, got {target.dtype}{hint}")
    if target.device != device:
        raise ValueError(f"{fn}: target is on {target.device} but the logits are on {device}")


def _check_target_range(target, n_classes, ignore_index, fn):
    """On the CPU a target outside [0, n_classes) other than ignore_index raises here, with its flat index
    (on CUDA that check would need a host sync: the row's loss is NaN instead)."""
    if target.device.type != "cpu":
        return
    t = target.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{fn}: target value {int(t[i])} at flat index {i} is out of range: expected a class "
                         f"index in [0, {n_classes}) or ignore_index={ignore_index}")


@torch.library.custom_op("lossforge::stablemax_target_out_of_range", mutates_args=())
def _target_out_of_range(target: torch.Tensor, n_classes: int, ignore_index: int, fn: str) -> torch.Tensor:
    """The mask of targets outside [0, n_classes) other than ignore_index; on the CPU such a target raises.
    An op, so that under torch.compile the data-dependent check runs at run time, inside the graph."""
    _check_target_range(target, n_classes, ignore_index, fn)
    return (target != ignore_index) & ((target < 0) | (target >= n_classes))


@_target_out_of_range.register_fake
def _target_out_of_range_fake(target, n_classes, ignore_index, fn):
    torch._check(target.dtype == torch.int64, lambda: f"{fn}: target must be int64, got {_dtype_name(target.dtype)}")
    return torch.empty_like(target, dtype=torch.bool)


def _check_options(ignore_index, reduction, label_smoothing, fn):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_class_weight(weight, n_classes, device, fn, name="weight", grad_ok=False):
    if weight is None:
        return
    _check_floating(name, weight, fn)
    if weight.shape != (n_classes,):
        raise ValueError(f"{fn}: {name} must have shape [{n_classes}] (one entry per class), got {list(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"{fn}: {name} is on {weight.device} but the logits are on {device}")
    if weight.requires_grad and not grad_ok:
        raise RuntimeError(f"{fn}: the gradient with respect to {name} is not implemented for class-index targets "
                           f"(as in F.cross_entropy)")


def _check_positional_weight(weight, fn, after, name="weight", what="a per-class torch.Tensor"):
    """The last positional argument must be a tensor: the grokking reference's
    stablemax_cross_entropy(logits, labels, reduction) passes a string there."""
    if weight is not None and not isinstance(weight, torch.Tensor):
        hint = f"; to choose the reduction pass reduction={weight!r}" if isinstance(weight, str) else ""
        raise TypeError(f"{fn}: {name} must be {what} or None, got {type(weight).__name__} "
                        f"{weight!r}: the arguments after {name} ({after}) are keyword-only{hint}")


def _class_dim(input, target, dim, fn):
    """The class dimension of `input` for `target`, validated (F.cross_entropy's layouts, plus `dim`)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
    probs = target.is_floating_point()
    if input.dim() == 1:
        cdim = 0  # [V] with a 0-d target (or a [V] probability target): unbatched
    else:
        cdim = _check_dim(input, dim, fn)
    expected = input.shape if probs else input.shape[:cdim] + input.shape[cdim + 1:]
    if target.shape != expected:
        if probs:
            index_shape = input.shape[:cdim] + input.shape[cdim + 1:]
            err = TypeError if target.shape == index_shape else ValueError  # float class indices: a dtype error
            raise err(
                f"{fn}: a floating target holds class probabilities and must have input's shape {list(input.shape)}, "
                f"got {list(target.shape)} (class indices must be int64)")
        hint = ""
        if input.dim() >= 3 and target.shape == input.shape[:-1]:
            hint = "; for [..., V] logits pass dim=-1"
        raise ValueError(
            f"{fn}: target shape {list(target.shape)} does not match input shape {list(input.shape)} with the "
            f"class dimension {cdim} (expected target shape {list(expected)}){hint}")
    return cdim


def _check_ce_args(input, target, weight, dim, ignore_index, reduction, label_smoothing, fn, probs_ok=False):
    """Validates F.cross_entropy-style arguments; returns the class dimension."""
    _check_floating("input", input, fn)
    if probs_ok and isinstance(target, torch.Tensor) and target.is_floating_point():
        if target.dtype not in _FLOATING:
            raise TypeError(f"{fn}: probability target must be float32, float64, bfloat16 or float16, got "
                            f"{target.dtype}")
        if target.device != input.device:
            raise ValueError(f"{fn}: target is on {target.device} but the logits are on {input.device}")
    else:
        _check_target(target, input.device, fn)
    _check_options(ignore_index, reduction, label_smoothing, fn)
    cdim = _class_dim(input, target, dim, fn)
    if input.shape[cdim] == 0:
        raise ValueError(f"{fn}: input has no classes (size 0 at dimension {cdim})")
    if input.numel() == 0:
        raise ValueError(f"{fn}: input is empty (shape {list(input.shape)}): there is no row to average over")
    # probability targets run a composite, differentiable in weight as torch's is
    _check_class_weight(weight, input.shape[cdim], input.device, fn, grad_ok=target.is_floating_point())
    return cdim


def _reduce(loss_rows: torch.Tensor, stats: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "none":
        return loss_rows.to(dtype)
    if reduction == "sum":
        return loss_rows.sum().to(dtype)
    # PyTorch's weighted mean: divide by the summed weights of the non-ignored targets (NaN if none).
    return (loss_rows.sum() / stats[..., 2].sum()).to(dtype)


def _probability_ce(input, target, weight, cdim, reduction, label_smoothing):
    """F.cross_entropy with class probabilities q: loss = -sum_c w_c q_c log p_c, with q smoothed to
    q (1 - eps) + eps / C; 'mean' divides by the number of rows (not by the weights), as torch does.
    Composite (log_stablemax and autograd), in the accumulation dtype; differentiable in target too."""
    acc = _acc_dtype(input.dtype)
    n_classes = input.shape[cdim]
    logp = ops.stablemax(input.to(acc).contiguous(), cdim, True)
    q = target.to(acc)
    if label_smoothing > 0:
        q = q * (1 - label_smoothing) + label_smoothing / n_classes
    terms = logp * q
    if weight is not None:
        terms = terms * weight.to(acc).reshape([n_classes if i == cdim else 1 for i in range(input.dim())])
    loss = -terms.sum(cdim)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (input.numel() // n_classes)


def stablemax_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, *,
                            ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                            dim: int = 1) -> torch.Tensor:
    """StableMax cross-entropy with the arguments and shapes of `torch.nn.functional.cross_entropy`.

    input: `[N, V]`, `[N, V, d1, ...]` (class dimension 1, the default) or `[V]` (unbatched);
    `[..., V]` layouts such as `[B, L, V]` logits with a `[B, L]` target take `dim=-1`.
    target: either int64 class indices with input's shape minus the class dimension (`ignore_index`
    rows contribute 0 and are left out of the mean), or class probabilities of input's shape (floating;
    `ignore_index` does not apply, as in torch). weight: per-class weights `[V]`. reduction:
    "none" | "mean" | "sum" (the weighted mean of PyTorch for indices, the mean over rows for
    probabilities). label_smoothing: as in PyTorch. Everything after `weight` is keyword-only.

    Equals `F.cross_entropy(sign(x) * log1p(|x|), target, ...)`. Returns the loss in input's dtype, or
    in float32 for a float16/bfloat16 input under autocast (F.cross_entropy is on autocast's float32
    list; the kernel reads the low-precision logits as they are and accumulates in float32).
    Index targets run the fused kernel; probability targets a composite of `log_stablemax`.
    On CUDA an out-of-range target gives a NaN loss for its row (raising would need a host sync);
    on the CPU it raises. A DTensor input and target sharded over a batch dimension give a DTensor
    (sharded for 'none', replicated for 'mean' and 'sum').

    >>> import torch, lossforge
    >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]], requires_grad=True)
    >>> loss = lossforge.stablemax_cross_entropy(logits, torch.tensor([0, 2]))
    >>> round(loss.item(), 4)
    0.8291
    >>> loss.backward()
    >>> probs = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    >>> round(lossforge.stablemax_cross_entropy(logits, probs, reduction="sum").item(), 4)
    2.2075
    """
    fn = "stablemax_cross_entropy"
    _check_positional_weight(weight, fn, "ignore_index=, reduction=, label_smoothing=, dim=")
    if _any_dtensor(input, target, weight):
        return _stablemax_cross_entropy_dtensor(input, target, weight, ignore_index, reduction, label_smoothing,
                                                dim, fn)
    cdim = _check_ce_args(input, target, weight, dim, ignore_index, reduction, label_smoothing, fn, probs_ok=True)
    out_dtype = _loss_dtype(input)
    if target.is_floating_point():
        return _probability_ce(input, target, weight, cdim, reduction, float(label_smoothing)).to(out_dtype)
    if not torch.compiler.is_compiling():  # compiled, the kernel raises (a data-dependent check breaks the graph)
        _check_target_range(target, input.shape[cdim], ignore_index, fn)
    acc = _acc_dtype(input.dtype)
    w = None if weight is None else weight.to(acc).contiguous()
    loss_rows, stats = ops.stablemax_cross_entropy(
        input.contiguous(), target.contiguous(), w, cdim, ignore_index, float(label_smoothing))
    return _reduce(loss_rows, stats, reduction, out_dtype)


def _stablemax_cross_entropy_dtensor(input, target, weight, ignore_index, reduction, label_smoothing, dim, fn):
    """Batch-sharded DTensors: the loss of each local shard, summed across the mesh; the mean divides by
    the global denominator (the summed weights of the non-ignored targets, or the number of rows)."""
    dt = _dtensor_type()
    if isinstance(weight, dt):
        if not all(p.is_replicate() for p in weight.placements):
            raise TypeError(f"{fn}: a DTensor weight must be replicated, got {tuple(weight.placements)}")
        weight = weight.to_local()
    cdim = dim % input.dim() if input.dim() > 1 else 0
    mesh, placements = _batch_sharded(fn, cdim, input=input, target=target)
    x, t = input.to_local(), target.to_local()
    local = stablemax_cross_entropy(x, t, weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                    dim=dim, reduction="none" if reduction == "none" else "sum")
    # shards of one mesh dimension hold different rows; replicated mesh dimensions hold the same rows
    total = _combine(local, mesh, placements, reduction)
    if reduction != "mean":
        return total
    if t.is_floating_point():
        denom = torch.tensor(float(t.numel() // t.shape[cdim]), dtype=torch.float64, device=x.device)
    else:
        denom = _mean_denominator(t.reshape(-1), None if weight is None else weight.to(_acc_dtype(x.dtype)),
                                  ignore_index, torch.float64)
    return total / _combine(denom, mesh, placements, "sum").to(total.dtype)


def collapse_fraction(logits: torch.Tensor, target: torch.Tensor, *, loss: str = "softmax", dim: int = 1,
                      ignore_index: int = -100) -> torch.Tensor:
    """The collapse diagnostic: the fraction of (non-ignored) rows whose loss is exactly 0 when
    computed the usual way in the logits' own dtype.

    loss="softmax": Softmax Collapse, F.cross_entropy in the training dtype (the failure the paper
    describes: once exp(x_y) swamps the other terms, the loss and its gradient vanish).
    loss="stablemax": the same for the naive StableMax-CE, log(sum s) − log(s_y) in the dtype.
    Returns a 0-d float32 tensor (no host sync on CUDA). An out-of-range target raises on the CPU and
    makes the result NaN on CUDA, as in `stablemax_cross_entropy`. Keyword-only after `target`.

    >>> import torch, lossforge
    >>> x = torch.tensor([[200.0, 0.0, 0.0], [1.0, 2.0, 0.0]])   # row 0: exp(-200) underflows
    >>> lossforge.collapse_fraction(x, torch.tensor([0, 1]), loss="softmax")
    tensor(0.5000)
    """
    fn = "collapse_fraction"
    _reject_dtensor(fn, logits=logits, target=target)
    cdim = _check_ce_args(logits, target, None, dim, ignore_index, "none", 0.0, fn)
    if loss not in ("softmax", "stablemax"):
        raise ValueError(f"{fn}: loss must be 'softmax' or 'stablemax', got {loss!r}")
    with torch.no_grad():
        x = logits.movedim(cdim, -1).reshape(-1, logits.shape[cdim])  # rows of classes
        t = target.reshape(-1)
        valid = t != ignore_index
        out_of_range = _target_out_of_range(t.contiguous(), x.shape[1], ignore_index, fn)
        # gather only in-range indices: torch would raise a device-side assert on CUDA
        t_safe = torch.where(valid & ~out_of_range, t, torch.zeros_like(t)).unsqueeze(1)
        if loss == "softmax":  # F.cross_entropy's per-row loss, -log_softmax(x)[y]
            rows = -torch.log_softmax(x, 1).gather(1, t_safe).squeeze(1)
        else:
            sx = torch.where(x >= 0, x + 1, 1 / (1 - x))
            rows = torch.log(sx.sum(1)) - torch.log(sx.gather(1, t_safe).squeeze(1))
        zero = (rows == 0) & valid
        fraction = zero.sum().float() / valid.sum().clamp_min(1).float()
        return torch.where(out_of_range.any(), torch.nan, fraction)


# ---- fused linear + StableMax-CE ----------------------------------------------------------------


def _chunk_rows(n_classes: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(16, (1 << 23) // max(n_classes, 1))  # ~8M logits (32 MB in float32) per chunk


def _chunk_loss_and_grads(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, chunk,
                          grad_rows, need_grads):
    """Loss rows (and optionally dL/dhidden, dL/dweight, dL/dbias for per-row gradients `grad_rows`,
    one element or one per row) without ever holding more than `chunk` rows of logits.
    Autocast is off inside: the wrapper has already cast hidden and weight to the autocast dtype, and the
    `out=` GEMM and the accumulation must keep the dtypes chosen here."""
    if _autocast_on(hidden.device):
        with torch.autocast(hidden.device.type, enabled=False):
            return _chunk_loss_and_grads(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                         chunk, grad_rows, need_grads)
    n = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    loss_rows = hidden.new_empty(n, dtype=acc)
    gh = torch.empty_like(hidden) if need_grads else None
    gw = gb = None
    for i in range(0, n, chunk):
        h = hidden[i:i + chunk]
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        t = target[i:i + chunk]
        lrows, stats = ops.stablemax_cross_entropy(logits, t, class_weight, 1, ignore_index, label_smoothing)
        loss_rows[i:i + chunk] = lrows
        if need_grads:
            g = grad_rows if grad_rows.numel() == 1 else grad_rows[i:i + chunk].contiguous()
            glogits = ops.stablemax_cross_entropy_backward(g, logits, t, class_weight, stats, 1, ignore_index,
                                                           label_smoothing)
            del logits
            torch.matmul(glogits, weight, out=gh[i:i + chunk])
            if gw is None:
                gw = (glogits.t() @ h).to(acc)
            elif gw.dtype == glogits.dtype:
                gw.addmm_(glogits.t(), h)  # accumulate inside the GEMM (beta = 1)
            else:
                gw += (glogits.t() @ h).to(acc)
            if bias is not None:
                gb = glogits.sum(0, dtype=acc) if gb is None else gb + glogits.sum(0, dtype=acc)
    return loss_rows, gh, gw, gb


def _mean_denominator(target, class_weight, ignore_index, acc):
    """PyTorch's weighted-mean denominator, the summed weights of the non-ignored targets, from the
    targets alone (so that the chunked gradients come out already scaled)."""
    valid = target != ignore_index
    if class_weight is None:
        return valid.sum().to(acc)
    safe = torch.where(valid, target, torch.zeros_like(target)).clamp(0, class_weight.shape[0] - 1)
    return (class_weight[safe] * valid).sum().to(acc)


@torch.library.custom_op("lossforge::fused_linear_stablemax_cross_entropy", mutates_args=())
def _fused_linear_ce(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
                     class_weight: torch.Tensor | None, ignore_index: int, label_smoothing: float, reduction: str,
                     chunk_size: int, need_grads: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss in the accumulation dtype, d loss/d hidden, d loss/d weight, d loss/d bias); for
    mean/sum the gradients are computed in the same chunked pass, so the backward only multiplies them by
    the incoming gradient."""
    # in the op (it runs eagerly under torch.compile too), before the chunks: an index of the whole target
    _check_target_range(target, weight.shape[0], ignore_index, "fused_linear_stablemax_cross_entropy")
    acc = _acc_dtype(hidden.dtype)
    grads_now = need_grads and reduction != "none"
    denom = _mean_denominator(target, class_weight, ignore_index, acc) if reduction == "mean" else None
    scale = (1 / denom if denom is not None else torch.ones((), dtype=acc, device=hidden.device)).reshape(1)
    loss_rows, gh, gw, gb = _chunk_loss_and_grads(
        hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, chunk_size, scale, grads_now)
    if reduction == "none":
        loss = loss_rows
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / denom

    def empty():
        return hidden.new_empty(0)  # a fresh tensor each: outputs of a custom op must not alias

    return (loss, gh if gh is not None else empty(), gw.to(weight.dtype) if gw is not None else empty(),
            gb.to(weight.dtype) if gb is not None else empty())


@_fused_linear_ce.register_fake
def _fused_linear_ce_fake(hidden, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction,
                          chunk_size, need_grads):
    acc = _acc_dtype(hidden.dtype)
    loss = hidden.new_empty(hidden.shape[0] if reduction == "none" else (), dtype=acc)
    grads_now = need_grads and reduction != "none"
    gh = torch.empty_like(hidden) if grads_now else hidden.new_empty(0)
    gw = torch.empty_like(weight) if grads_now else hidden.new_empty(0)
    gb = bias.new_empty(bias.shape) if grads_now and bias is not None else hidden.new_empty(0)
    return loss, gh, gw, gb


def _fused_setup(ctx, inputs, output):
    hidden, weight, target, bias, class_weight = inputs[:5]
    ignore_index, label_smoothing, reduction, chunk_size, need_grads = inputs[5:]
    _, gh, gw, gb = output
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.reduction = reduction
    ctx.opts = (ignore_index, label_smoothing, chunk_size)
    ctx.has_bias = bias is not None
    # per-row gradients are known only in the backward (and a direct call may have asked for no gradients
    # in the forward): recompute there
    ctx.recompute = reduction == "none" or not need_grads
    if ctx.recompute:
        ctx.save_for_backward(hidden, weight, target, bias, class_weight)
    else:
        ctx.save_for_backward(gh, gw, gb)


def _fused_backward(ctx, grad_loss, *unused):
    if ctx.recompute:
        hidden, weight, target, bias, class_weight = ctx.saved_tensors
        ignore_index, label_smoothing, chunk = ctx.opts
        grad_rows = grad_loss.contiguous()  # the loss, and so its gradient, is in the accumulation dtype
        if ctx.reduction != "none":
            grad_rows = grad_rows.reshape(1)
            if ctx.reduction == "mean":
                grad_rows = grad_rows / _mean_denominator(target, class_weight, ignore_index, grad_rows.dtype)
        _, gh, gw, gb = _chunk_loss_and_grads(hidden, weight, bias, target, class_weight, ignore_index,
                                              label_smoothing, chunk, grad_rows, True)
        gw = gw.to(weight.dtype)
        gb = gb.to(weight.dtype) if gb is not None else None
    else:
        # out of place: a retained graph may run this backward again (gradcheck does)
        gh, gw, gb = ctx.saved_tensors
        gh, gw = gh * grad_loss.to(gh.dtype), gw * grad_loss.to(gw.dtype)
        gb = gb * grad_loss.to(gb.dtype) if ctx.has_bias else None
    return gh, gw, None, gb, None, None, None, None, None, None


_fused_linear_ce.register_autograd(_fused_backward, setup_context=_fused_setup)


def fused_linear_stablemax_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                         bias: torch.Tensor | None = None, *, class_weight: torch.Tensor | None = None,
                                         ignore_index: int = -100, reduction: str = "mean",
                                         label_smoothing: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """StableMax-CE of `hidden @ weight.T + bias` without materialising the `[N, V]` logits.

    hidden `[N, H]` (or `[..., H]`), weight `[V, H]` (an LM head), target `[N]` (or `[...]`) int64 class
    indices, bias `[V]`. The rows are processed in chunks of `chunk_size` (default: ~8M logits per chunk);
    for reduction mean/sum the gradients are formed in the same pass and the backward only rescales them,
    so peak memory is O(chunk · V) beyond the gradients themselves. class_weight, ignore_index,
    reduction and label_smoothing are as in `stablemax_cross_entropy`; everything after `bias` is
    keyword-only. Class-probability targets are not supported (TypeError): compute the logits and call
    `stablemax_cross_entropy`.

    dtypes: hidden, weight and bias share one dtype (as F.linear requires; TypeError otherwise) and the
    loss has it. Under autocast, as F.linear, they are cast to the autocast dtype (float64 is left
    alone), so a bfloat16 hidden state with a float32 head works; the GEMMs run in that dtype, the loss
    accumulates in float32 and is returned in float32 (F.cross_entropy's autocast policy).
    DTensors are not supported (TypeError): pass local shards or `.full_tensor()`.

    >>> import torch, lossforge
    >>> h = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); W = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.0, 0.0]])
    >>> y = torch.tensor([0, 1])
    >>> torch.allclose(lossforge.fused_linear_stablemax_cross_entropy(h, W, y),
    ...                lossforge.stablemax_cross_entropy(h @ W.T, y))
    True
    """
    fn = "fused_linear_stablemax_cross_entropy"
    _check_positional_weight(bias, fn, "class_weight=, ignore_index=, reduction=, label_smoothing=, chunk_size=",
                             "bias", "a [V] torch.Tensor")
    _reject_dtensor(fn, hidden=hidden, weight=weight, target=target, bias=bias, class_weight=class_weight)
    _check_floating("hidden", hidden, fn)
    _check_floating("weight", weight, fn)
    if bias is not None:
        _check_floating("bias", bias, fn)
    out_dtype = None
    if _autocast_on(hidden.device):
        # F.linear's autocast policy (the lower-precision list; float64 stays as it is) ...
        low = torch.get_autocast_dtype(hidden.device.type)

        def cast(t):
            return t.to(low) if t is not None and t.dtype != torch.float64 else t
        hidden, weight, bias = cast(hidden), cast(weight), cast(bias)
        out_dtype = _acc_dtype(hidden.dtype)  # ... and F.cross_entropy's (the float32 list) for the loss
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{fn}: weight must be [V, H] with V >= 1 classes, got shape {list(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: hidden's last dimension must equal weight's H={weight.shape[1]}, "
                         f"got hidden shape {list(hidden.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        got = f"hidden is {hidden.dtype}, weight {weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}")
        raise TypeError(f"{fn}: hidden, weight and bias must have one dtype (as in F.linear), got {got}: "
                        f"cast them, or run under torch.autocast")
    if weight.device != hidden.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != hidden.device):
        raise ValueError(f"{fn}: bias must be [{weight.shape[0]}] on hidden's device, got {list(bias.shape)} on "
                         f"{bias.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    lead = hidden.shape[:-1]
    _check_target(target, hidden.device, fn)
    if target.shape != lead:
        raise ValueError(f"{fn}: target shape {list(target.shape)} must equal hidden's leading shape {list(lead)}")
    if target.numel() == 0:
        raise ValueError(f"{fn}: hidden is empty (shape {list(hidden.shape)}): there is no row to average over")
    _check_options(ignore_index, reduction, label_smoothing, fn)
    _check_class_weight(class_weight, weight.shape[0], hidden.device, fn, "class_weight")
    h2 = hidden.reshape(lead.numel(), hidden.shape[-1]).contiguous()
    cw = None if class_weight is None else class_weight.to(_acc_dtype(hidden.dtype)).contiguous()
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                              (bias is not None and bias.requires_grad))
    loss = _fused_linear_ce(h2, weight.contiguous(), target.reshape(-1).contiguous(),
                            None if bias is None else bias.contiguous(), cw, ignore_index, float(label_smoothing),
                            reduction, _chunk_rows(weight.shape[0], chunk_size), need_grads)[0]
    loss = loss.to(out_dtype or hidden.dtype)
    return loss.reshape(lead) if reduction == "none" else loss


def _orthograd_(grad: torch.Tensor, param: torch.Tensor) -> None:
    """⊥Grad on one tensor, in place (see lossforge.optim.OrthoGrad)."""
    if grad.is_contiguous() and param.is_contiguous():
        ops.orthograd_(grad, param)
    else:
        g = grad.contiguous()
        ops.orthograd_(g, param.contiguous())
        grad.copy_(g)

