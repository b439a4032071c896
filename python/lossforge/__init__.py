"""lossforge: fast, exact PyTorch kernels for training-time losses from recent papers.

Families (one module each): stablemax, sliced_wasserstein, betti_matching, mfac, pamc.
Modules live in lossforge.nn, optimizers in lossforge.optim.
"""
__version__ = "0.1.0"

from ._ops import build_info  # noqa: E402  (loads the compiled ops first)

# StableMax
from .stablemax import (  # noqa: E402
    collapse_fraction,
    fused_linear_stablemax_cross_entropy,
    log_stablemax,
    stablemax,
    stablemax_cross_entropy,
)

# Sliced Wasserstein
from .sliced_wasserstein import (  # noqa: E402,F401
    distributional_sliced_wasserstein,
    max_sliced_wasserstein,
    sliced_wasserstein,
    vmf_sample,
)

# Betti matching
from .betti_matching import (  # noqa: E402,F401
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
from .pamc import (  # noqa: E402
    PamCGraph,
    SBMGraph,
    influence_matrix,
    pairwise_contrastive_loss,
    pamc_loss,
    prepare_graph,
    stochastic_block_model,
)

from . import nn, optim  # noqa: E402,F401
