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

# PamC
