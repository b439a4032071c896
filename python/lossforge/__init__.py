"""lossforge: fast, exact PyTorch kernels for training-time losses from recent papers.

Every public name lives at the top level (lossforge.stablemax_cross_entropy, ...), except the M-FAC
inverse-Hessian objects (lossforge.mfac), the nn.Module wrappers (lossforge.nn) and the optimizers
(lossforge.optim). The implementation modules are private (lossforge._stablemax, ...).
"""
from ._version import __version__  # noqa: E402  (the one version source)

from ._ops import build_info  # noqa: E402  (loads the compiled ops first)

# StableMax
from ._stablemax import (  # noqa: E402
    collapse_fraction,
    fused_linear_stablemax_cross_entropy,
    log_stablemax,
    stablemax,
    stablemax_cross_entropy,
)

# Sliced Wasserstein
from ._sliced_wasserstein import (  # noqa: E402,F401
    distributional_sliced_wasserstein,
    max_sliced_wasserstein,
    random_projections,
    sliced_wasserstein,
    vmf_sample,
)

# Betti matching
from ._betti_matching import (  # noqa: E402,F401
    BettiMatchingResult,
    PersistenceBarcode,
    betti_matching,
    betti_matching_error,
    betti_matching_loss,
    betti_number_error,
    persistence_barcode,
)

# M-FAC
from . import mfac  # noqa: E402,F401  (lossforge.mfac.StaticIHVP, BlockIHVP, SlidingWindowIHVP)

# PamC
from ._pamc import (  # noqa: E402
    PamCGraph,
    SBMGraph,
    influence_matrix,
    pairwise_contrastive_loss,
    pamc_loss,
    prepare_graph,
    stochastic_block_model,
)

from . import nn, optim  # noqa: E402,F401

__all__ = [
    "__version__", "build_info",
    # StableMax
    "stablemax", "log_stablemax", "stablemax_cross_entropy", "fused_linear_stablemax_cross_entropy",
    "collapse_fraction",
    # sliced Wasserstein
    "sliced_wasserstein", "max_sliced_wasserstein", "distributional_sliced_wasserstein", "vmf_sample",
    "random_projections",
    # Betti matching
    "persistence_barcode", "betti_matching", "betti_matching_loss", "betti_matching_error",
    "betti_number_error", "BettiMatchingResult", "PersistenceBarcode",
    # M-FAC (StaticIHVP, BlockIHVP, SlidingWindowIHVP) and PamC
    "mfac",
    "pamc_loss", "pairwise_contrastive_loss", "prepare_graph", "influence_matrix", "stochastic_block_model",
    "PamCGraph", "SBMGraph",
    # nn.Module wrappers and optimizers
    "nn", "optim",
]
