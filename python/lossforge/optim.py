"""Optimizers built on lossforge's kernels."""
import torch

# StableMax (⊥Grad)

# M-FAC
