"""torch.nn modules built on lossforge's functional API."""
import torch

# StableMax

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
