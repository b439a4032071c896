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
from . import pamc as _pamc  # noqa: E402


class PamCLoss(torch.nn.Module):
    """`lossforge.pamc_loss` as a module. The graph is validated and laid out once and reused for as
    long as the same edge tensors (unchanged in place) are passed: a training loop pays for it once.

    >>> loss_fn = lossforge.nn.PamCLoss(tau=1.0)
    >>> loss = loss_fn(z, edge_index, edge_weight, assignment=q)
    """

    def __init__(self, tau: float = 1.0, soft: bool = False, reduction: str = "mean",
                 num_clusters: int | None = None):
        super().__init__()
        _pamc._check_tau(tau, "PamCLoss")
        _pamc._check_reduction(reduction, "PamCLoss")
        self.tau, self.soft, self.reduction, self.num_clusters = float(tau), soft, reduction, num_clusters
        self._graphs = _pamc.GraphCache()

    def forward(self, z: torch.Tensor, edge_index, edge_weight: torch.Tensor | None = None,
                assignment: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(z, torch.Tensor) and z.dim() == 2:
            edge_index = self._graphs.get(z, edge_index, edge_weight, "PamCLoss")
            edge_weight = None
        return _pamc.pamc_loss(z, edge_index, edge_weight, assignment=assignment, tau=self.tau, soft=self.soft,
                               reduction=self.reduction, num_clusters=self.num_clusters)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, soft={self.soft}, reduction={self.reduction!r}"
