"""torch.nn modules built on lossforge's functional API."""
import torch

# StableMax

# Sliced Wasserstein

# Betti matching

# PamC
