"""torch.nn modules built on lossforge's functional API."""
import torch

from .stablemax import _check_options, stablemax_cross_entropy

__all__ = ["StableMaxCrossEntropyLoss"]

# StableMax


class StableMaxCrossEntropyLoss(torch.nn.Module):
    """StableMax cross-entropy as a module, with the arguments of `torch.nn.CrossEntropyLoss`
    (plus `dim`: the class dimension, 1 by default, -1 for `[..., V]` logits).

    >>> loss_fn = lossforge.nn.StableMaxCrossEntropyLoss(ignore_index=-100, dim=-1)
    >>> loss = loss_fn(logits_BLV, target_BL)
    """

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, dim: int = 1):
        super().__init__()
        _check_options(ignore_index, reduction, label_smoothing, "StableMaxCrossEntropyLoss")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.dim = dim

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return stablemax_cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                                                  self.label_smoothing, self.dim)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, dim={self.dim}")

# Sliced Wasserstein

# Betti matching
class BettiMatchingLoss(torch.nn.Module):
    """Betti matching loss (:func:`lossforge.betti_matching_loss`) of probabilities
    ``[B, C, H, W]`` / ``[B, C, D, H, W]`` against a target of the same shape."""

    def __init__(self, filtration="superlevel", relative=False, strict=False, dims=None,
                 include_target_unmatched=True, reduction="mean"):
        super().__init__()
        from .betti_matching import FILTRATIONS, REDUCTIONS, _check_choice

        _check_choice(filtration, "filtration", FILTRATIONS)
        _check_choice(reduction, "reduction", REDUCTIONS)
        self.filtration, self.relative, self.strict = filtration, relative, strict
        self.dims = None if dims is None else tuple(float(d) for d in dims)
        self.include_target_unmatched, self.reduction = include_target_unmatched, reduction

    def forward(self, pred, target):
        from .betti_matching import betti_matching_loss

        return betti_matching_loss(pred, target, self.filtration, self.relative, self.strict, self.dims,
                                   self.include_target_unmatched, self.reduction)

    def extra_repr(self):
        return (f"filtration={self.filtration!r}, relative={self.relative}, strict={self.strict}, dims={self.dims}, "
                f"include_target_unmatched={self.include_target_unmatched}, reduction={self.reduction!r}")


class DiceBettiMatchingLoss(torch.nn.Module):
    """Soft Dice loss plus ``alpha`` times the Betti matching loss (the combination of Stucki et al.).

    Dice per (b, c) instance: 1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth), averaged over
    the instances (``reduction="mean"``), summed, or returned as [B, C] ("none"). The remaining
    keyword arguments go to :class:`BettiMatchingLoss` (whose reduction follows ``reduction``).
    """

    def __init__(self, alpha=0.5, smooth=1e-5, reduction="mean", **betti_kwargs):
        super().__init__()
        if not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
        if not (isinstance(smooth, (int, float)) and smooth >= 0):
            raise ValueError(f"smooth must be a non-negative number, got {smooth!r}")
        self.alpha, self.smooth = float(alpha), float(smooth)
        self.betti = BettiMatchingLoss(reduction=reduction, **betti_kwargs)
        self.reduction = reduction

    def forward(self, pred, target):
        from .betti_matching import _reduce

        dims = tuple(range(2, pred.dim()))
        t = target.to(pred.dtype)
        inter = (pred * t).sum(dims)
        dice = 1 - (2 * inter + self.smooth) / (pred.sum(dims) + t.sum(dims) + self.smooth)
        dice = _reduce(dice, self.reduction, pred.shape[0], pred.shape[1])
        if self.alpha == 0:
            return dice
        return dice + self.alpha * self.betti(pred, target)

    def extra_repr(self):
        return f"alpha={self.alpha}, smooth={self.smooth}, reduction={self.reduction!r}"


# PamC
