"""lossforge: fast, exact PyTorch kernels for training-time losses from recent papers."""
__version__ = "0.1.0"

from ._ops import build_info  # noqa: E402  (loads the compiled ops first)
