"""StableMax, StableMax cross-entropy and ⊥Grad (Prieto et al. 2025, "Grokking at the Edge of
Numerical Stability"). Spec: shared/specs/stablemax.md.

    s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0);   stablemax(x)_i = s(x_i) / sum_j s(x_j)

StableMax-CE equals softmax-CE of t = sign(x) * log1p(|x|), so every F.cross_entropy option carries
over. The kernels read the logits once in the forward (twice with label smoothing) and once in the
backward, keep O(rows) state (the non-target sum, the full sum and the target's weight per row),
accumulate in float32 (float64 for float64 input), and take one branch per element: gradients are
finite at logits of exactly 1.0, confident rows keep their (tiny) loss in float32, and -inf logits
are masked out.
"""
from __future__ import annotations

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


@register_fake("lossforge::stablemax")
def _stablemax_fake(x, dim, log):
    return torch.empty_like(x)


@register_fake("lossforge::stablemax_backward")
def _stablemax_backward_fake(grad, x, out, dim, log):
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
    acc = _acc_dtype(input.dtype)
    return target.new_empty(target.shape, dtype=acc), target.new_empty((*target.shape, 3), dtype=acc)


@register_fake("lossforge::stablemax_cross_entropy_backward")
def _ce_backward_fake(grad_rows, input, target, weight, stats, dim, ignore_index, label_smoothing):
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


# ---- public API ---------------------------------------------------------------------------------


def stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """StableMax along `dim`: s(x_i) / sum_j s(x_j). Any shape, any dim, autograd.

    >>> lossforge.stablemax(torch.tensor([0.0, 1.0, -1.0]))   # s = (1, 2, 0.5)
    tensor([0.2857, 0.5714, 0.1429])
    """
    _check_floating("x", x, "stablemax")
    dim = _check_dim(x, dim, "stablemax")
    if x.numel() == 0:
        raise ValueError(f"stablemax: x is empty (shape {list(x.shape)})")
    return ops.stablemax(x.contiguous(), dim, False)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(stablemax(x)) along `dim`, computed as sign(x)·log1p(|x|) − log(sum s): no log of a ratio."""
    _check_floating("x", x, "log_stablemax")
    dim = _check_dim(x, dim, "log_stablemax")
    if x.numel() == 0:
        raise ValueError(f"log_stablemax: x is empty (shape {list(x.shape)})")
    return ops.stablemax(x.contiguous(), dim, True)


def _check_target(target, device, fn):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype != torch.int64:
        hint = " (class-probability targets are not supported: pass class indices)" if target.is_floating_point() else ""
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


def _check_options(ignore_index, reduction, label_smoothing, fn):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_class_weight(weight, n_classes, device, fn, name="weight"):
    if weight is None:
        return
    _check_floating(name, weight, fn)
    if weight.shape != (n_classes,):
        raise ValueError(f"{fn}: {name} must have shape [{n_classes}] (one entry per class), got {list(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"{fn}: {name} is on {weight.device} but the logits are on {device}")
    if weight.requires_grad:
        raise RuntimeError(f"{fn}: the gradient with respect to {name} is not implemented (as in F.cross_entropy)")


def _check_ce_args(input, target, weight, dim, ignore_index, reduction, label_smoothing, fn):
    """Validates F.cross_entropy-style arguments; returns the class dimension."""
    _check_floating("input", input, fn)
    _check_target(target, input.device, fn)
    _check_options(ignore_index, reduction, label_smoothing, fn)
    cdim = 0 if input.dim() == 1 else _check_dim(input, dim, fn)  # [V] with a 0-d target: unbatched
    expected = input.shape[:cdim] + input.shape[cdim + 1:]
    if target.shape != expected:
        hint = ""
        if input.dim() >= 3 and target.shape == input.shape[:-1]:
            hint = "; for [..., V] logits pass dim=-1"
        raise ValueError(
            f"{fn}: target shape {list(target.shape)} does not match input shape {list(input.shape)} with the "
            f"class dimension {cdim} (expected target shape {list(expected)}){hint}")
    if input.shape[cdim] == 0:
        raise ValueError(f"{fn}: input has no classes (size 0 at dimension {cdim})")
    if input.numel() == 0:
        raise ValueError(f"{fn}: input is empty (shape {list(input.shape)}): there is no row to average over")
    _check_class_weight(weight, input.shape[cdim], input.device, fn)
    return cdim


def _reduce(loss_rows: torch.Tensor, stats: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "none":
        return loss_rows.to(dtype)
    if reduction == "sum":
        return loss_rows.sum().to(dtype)
    # PyTorch's weighted mean: divide by the summed weights of the non-ignored targets (NaN if none).
    return (loss_rows.sum() / stats[..., 2].sum()).to(dtype)


def stablemax_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                            ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                            dim: int = 1) -> torch.Tensor:
    """StableMax cross-entropy with the arguments and shapes of `torch.nn.functional.cross_entropy`.

    input: `[N, V]`, `[N, V, d1, ...]` (class dimension 1, the default) or `[V]` (unbatched);
    `[..., V]` layouts such as `[B, L, V]` logits with a `[B, L]` target take `dim=-1`.
    target: int64 class indices with input's shape minus the class dimension; `ignore_index` rows
    contribute 0 (and are left out of the mean). weight: per-class weights `[V]`. reduction:
    "none" | "mean" | "sum" (the weighted mean of PyTorch). label_smoothing: as in PyTorch.

    Equals `F.cross_entropy(sign(x) * log1p(|x|), target, ...)`. Returns the loss in input's dtype.
    On CUDA an out-of-range target gives a NaN loss for its row (raising would need a host sync);
    on the CPU it raises.

    >>> logits = torch.randn(4, 10, requires_grad=True); y = torch.tensor([1, 0, 9, 3])
    >>> lossforge.stablemax_cross_entropy(logits, y).backward()
    """
    fn = "stablemax_cross_entropy"
    cdim = _check_ce_args(input, target, weight, dim, ignore_index, reduction, label_smoothing, fn)
    if not torch.compiler.is_compiling():  # compiled, the kernel raises (a data-dependent check breaks the graph)
        _check_target_range(target, input.shape[cdim], ignore_index, fn)
    acc = _acc_dtype(input.dtype)
    w = None if weight is None else weight.to(acc).contiguous()
    loss_rows, stats = ops.stablemax_cross_entropy(
        input.contiguous(), target.contiguous(), w, cdim, ignore_index, float(label_smoothing))
    return _reduce(loss_rows, stats, reduction, input.dtype)


def collapse_fraction(logits: torch.Tensor, target: torch.Tensor, loss: str = "softmax", dim: int = 1,
                      ignore_index: int = -100) -> torch.Tensor:
    """The collapse diagnostic: the fraction of (non-ignored) rows whose loss is exactly 0 when
    computed the usual way in the logits' own dtype.

    loss="softmax": Softmax Collapse, F.cross_entropy in the training dtype (the failure the paper
    describes: once exp(x_y) swamps the other terms, the loss and its gradient vanish).
    loss="stablemax": the same for the naive StableMax-CE, log(sum s) − log(s_y) in the dtype.
    Returns a 0-d float32 tensor (no host sync on CUDA). An out-of-range target raises on the CPU and
    makes the result NaN on CUDA, as in `stablemax_cross_entropy`.
    """
    fn = "collapse_fraction"
    cdim = _check_ce_args(logits, target, None, dim, ignore_index, "none", 0.0, fn)
    if loss not in ("softmax", "stablemax"):
        raise ValueError(f"{fn}: loss must be 'softmax' or 'stablemax', got {loss!r}")
    with torch.no_grad():
        x = logits.movedim(cdim, -1).reshape(-1, logits.shape[cdim])  # rows of classes
        t = target.reshape(-1)
        valid = t != ignore_index
        out_of_range = valid & ((t < 0) | (t >= x.shape[1]))
        _check_target_range(t, x.shape[1], ignore_index, fn)
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
    one element or one per row) without ever holding more than `chunk` rows of logits."""
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
    """Returns (loss, d loss/d hidden, d loss/d weight, d loss/d bias); for mean/sum the gradients are
    computed in the same chunked pass, so the backward only multiplies them by the incoming gradient."""
    # in the op (it runs eagerly under torch.compile too), before the chunks: an index of the whole target
    _check_target_range(target, weight.shape[0], ignore_index, "fused_linear_stablemax_cross_entropy")
    acc = _acc_dtype(hidden.dtype)
    grads_now = need_grads and reduction != "none"
    denom = _mean_denominator(target, class_weight, ignore_index, acc) if reduction == "mean" else None
    scale = (1 / denom if denom is not None else torch.ones((), dtype=acc, device=hidden.device)).reshape(1)
    loss_rows, gh, gw, gb = _chunk_loss_and_grads(
        hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, chunk_size, scale, grads_now)
    if reduction == "none":
        loss = loss_rows.to(hidden.dtype)
    elif reduction == "sum":
        loss = loss_rows.sum().to(hidden.dtype)
    else:
        loss = (loss_rows.sum() / denom).to(hidden.dtype)

    def empty():
        return hidden.new_empty(0)  # a fresh tensor each: outputs of a custom op must not alias

    return (loss, gh if gh is not None else empty(), gw.to(weight.dtype) if gw is not None else empty(),
            gb.to(weight.dtype) if gb is not None else empty())


@_fused_linear_ce.register_fake
def _fused_linear_ce_fake(hidden, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction,
                          chunk_size, need_grads):
    loss = hidden.new_empty(hidden.shape[0]) if reduction == "none" else hidden.new_empty(())
    grads_now = need_grads and reduction != "none"
    gh = torch.empty_like(hidden) if grads_now else hidden.new_empty(0)
    gw = torch.empty_like(weight) if grads_now else hidden.new_empty(0)
    gb = bias.new_empty(bias.shape) if grads_now and bias is not None else hidden.new_empty(0)
    return loss, gh, gw, gb


def _fused_setup(ctx, inputs, output):
    hidden, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction, chunk_size, _ = inputs
    _, gh, gw, gb = output
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.reduction = reduction
    ctx.opts = (ignore_index, label_smoothing, chunk_size)
    ctx.has_bias = bias is not None
    if reduction == "none":  # per-row gradients are known only in the backward: recompute there
        ctx.save_for_backward(hidden, weight, target, bias, class_weight)
    else:
        ctx.save_for_backward(gh, gw, gb)


def _fused_backward(ctx, grad_loss, *unused):
    if ctx.reduction == "none":
        hidden, weight, target, bias, class_weight = ctx.saved_tensors
        ignore_index, label_smoothing, chunk = ctx.opts
        grad_rows = grad_loss.to(_acc_dtype(hidden.dtype)).contiguous()
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

    hidden `[N, H]` (or `[..., H]`), weight `[V, H]` (an LM head), target `[N]` (or `[...]`), bias `[V]`.
    The rows are processed in chunks of `chunk_size` (default: ~8M logits per chunk); for
    reduction mean/sum the gradients are formed in the same pass and the backward only rescales them,
    so peak memory is O(chunk · V) beyond the gradients themselves. class_weight, ignore_index,
    reduction and label_smoothing are as in `stablemax_cross_entropy`.
    """
    fn = "fused_linear_stablemax_cross_entropy"
    _check_floating("hidden", hidden, fn)
    _check_floating("weight", weight, fn)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{fn}: weight must be [V, H] with V >= 1 classes, got shape {list(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: hidden's last dimension must equal weight's H={weight.shape[1]}, "
                         f"got hidden shape {list(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{fn}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        _check_floating("bias", bias, fn)
        if bias.shape != (weight.shape[0],) or bias.device != hidden.device or bias.dtype != hidden.dtype:
            raise ValueError(f"{fn}: bias must be [{weight.shape[0]}] with hidden's dtype and device, got "
                             f"{list(bias.shape)} {bias.dtype} on {bias.device}")
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
    return loss.reshape(lead) if reduction == "none" else loss


def _orthograd_(grad: torch.Tensor, param: torch.Tensor) -> None:
    """⊥Grad on one tensor, in place (see lossforge.optim.OrthoGrad)."""
    if grad.is_contiguous() and param.is_contiguous():
        ops.orthograd_(grad, param)
    else:
        g = grad.contiguous()
        ops.orthograd_(g, param.contiguous())
        grad.copy_(g)

