"""torch.nn modules built on lossforge's functional API."""
import torch

from ._stablemax import _check_options, stablemax_cross_entropy

__all__ = [
    "StableMaxCrossEntropyLoss",
    "AmortizedSlicedWasserstein",
    "EfficientAttentionAmortizer",
    "BettiMatchingLoss",
    "DiceBettiMatchingLoss",
    "PamCLoss",
]

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
from ._sliced_wasserstein import (  # noqa: E402
    _check_count,
    _check_p,
    _check_reduction,
    sliced_wasserstein as _sliced_wasserstein,
    vmf_sample as _vmf_sample,
)


class EfficientAttentionAmortizer(torch.nn.Module):
    """Efficient self-attention pooling of a point cloud into one vector, linear in the number of points:

        g(X) = mean_i softmax_features(Q_i) (softmax_points(K)^T V),   Q, K = X W_q, X W_k [N, d_k],  V = X W_v [N, d]

    Permutation invariant (the softmax over points is equivariant and the mean pools it away).
    """

    def __init__(self, dim: int, d_k: int = 64):
        super().__init__()
        self.query = torch.nn.Linear(dim, d_k)
        self.key = torch.nn.Linear(dim, d_k)
        self.value = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., N, d] -> [..., d]
        q = torch.softmax(self.query(x), dim=-1)
        k = torch.softmax(self.key(x), dim=-2)
        context = k.transpose(-1, -2) @ self.value(x)  # [..., d_k, d]
        return (q.mean(dim=-2).unsqueeze(-2) @ context).squeeze(-2)


class AmortizedSlicedWasserstein(torch.nn.Module):
    """Amortized v-DSW (Nguyen, Nguyen, Ho, ICML 2023): an amortizer f(X, Y) -> eps in S^{d-1} replaces the
    per-pair ascent of v-DSW; the loss uses L projections theta ~ vMF(eps, kappa).

    f(X, Y) = normalise((g(X) + g(Y)) / 2) with the efficient self-attention pooling g shared by both
    clouds: symmetric in X and Y, invariant to permuting their points, linear in N (and N != M is fine).

    Use:
        sw = lossforge.nn.AmortizedSlicedWasserstein(3, kappa=10.0, n_projections=100)
        loss = sw(x, y)                  # [B, N, 3], [B, M, 3]: gradients reach x and y (eps is a constant)
        loss.backward(); model_opt.step()
        sw.amortizer_step(x, y)          # one ascent step of the amortizer on the v-DSW objective

    forward returns sliced_wasserstein(x, y, ...) with the vMF projections around f(x, y) (root and
    reduction as in lossforge.sliced_wasserstein); weights, if given, weight the points in the distance
    (the amortizer pools the points uniformly).
    """

    def __init__(self, dim: int, kappa: float, n_projections: int = 100, amortizer: str = "efficient_attention", *,
                 p: float = 2.0, d_k: int = 64, root: bool = True, reduction: str = "mean",
                 amortizer_lr: float = 1e-3):
        super().__init__()
        dim = _check_count(dim, "dim", minimum=2)
        self.n_projections = _check_count(n_projections, "n_projections")
        if amortizer != "efficient_attention":
            raise ValueError(f"amortizer must be 'efficient_attention', got {amortizer!r}")
        if not (float(kappa) >= 0 and float(kappa) < float("inf")):
            raise ValueError(f"kappa must be finite and >= 0, got {kappa}")
        _check_reduction(reduction)
        self.dim = dim
        self.kappa = float(kappa)
        self.p = _check_p(p)
        self.root = root
        self.reduction = reduction
        self.amortizer_lr = amortizer_lr
        self.amortizer = EfficientAttentionAmortizer(dim, _check_count(d_k, "d_k"))
        self._optimizer = None

    def direction(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps = f(x, y): [d] for single clouds [N, d], [B, d] for batches [B, N, d]."""
        dtype = next(self.amortizer.parameters()).dtype
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3) or t.shape[-1] != self.dim:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be [N, {self.dim}] or [B, N, {self.dim}], got {shape}")
            if t.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"{name} must be float32 or float64 (the module's dtype, {dtype}), got {t.dtype}")
            if t.dtype != dtype:
                raise TypeError(f"{name} is {t.dtype} but the amortizer's parameters are {dtype}: convert the clouds "
                                f"({name}.to({dtype})) or the module (module.to({t.dtype}))")
        a = 0.5 * (self.amortizer(x) + self.amortizer(y))
        return a / a.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)

    def _projections(self, eps: torch.Tensor, generator) -> torch.Tensor:
        return _vmf_sample(eps, self.kappa, self.n_projections, generator).transpose(-1, -2).contiguous()

    def forward(self, x, y, x_weights=None, y_weights=None, generator=None) -> torch.Tensor:
        with torch.no_grad():
            eps = self.direction(x.detach(), y.detach())
            proj = self._projections(eps, generator)
        return _sliced_wasserstein(x, y, x_weights, y_weights, p=self.p, projections=proj, root=self.root,
                                   reduction=self.reduction)

    def objective(self, x, y, x_weights=None, y_weights=None, generator=None) -> torch.Tensor:
        """The v-DSW objective at eps = f(x, y), mean over pairs; differentiable w.r.t. the amortizer only."""
        x, y = x.detach(), y.detach()
        wx = None if x_weights is None else x_weights.detach()
        wy = None if y_weights is None else y_weights.detach()
        proj = self._projections(self.direction(x, y), generator)  # reparameterised: gradients reach f
        per_pair = _sliced_wasserstein(x, y, wx, wy, p=self.p, projections=proj, root=False, reduction="none")
        # the p-th root with a zero gradient where a pair's value is 0 (identical clouds): pow's inf there
        # times the kernel's zero gradient would put NaN into every parameter of the amortizer
        tiny = torch.finfo(per_pair.dtype).tiny
        root = torch.where(per_pair > 0, per_pair.clamp_min(tiny).pow(1.0 / self.p), torch.zeros_like(per_pair))
        return root.mean()

    def amortizer_step(self, x, y, x_weights=None, y_weights=None, optimizer=None, generator=None) -> float:
        """One ascent step of the amortizer on the objective (Adam with `amortizer_lr` unless an optimizer
        over the amortizer's parameters is given). Returns the objective before the step; the amortizer's
        gradients are cleared afterwards so they never leak into the model's optimizer."""
        if optimizer is None:
            if self._optimizer is None:
                self._optimizer = torch.optim.Adam(self.amortizer.parameters(), lr=self.amortizer_lr)
            optimizer = self._optimizer
        optimizer.zero_grad(set_to_none=True)
        value = self.objective(x, y, x_weights, y_weights, generator)
        (-value).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(value.detach())

# Betti matching
class BettiMatchingLoss(torch.nn.Module):
    """Betti matching loss (:func:`lossforge.betti_matching_loss`) of probabilities
    ``[B, C, H, W]`` / ``[B, C, D, H, W]`` against a target of the same shape."""

    def __init__(self, filtration="superlevel", relative=False, strict=False, dims=None,
                 include_target_unmatched=True, reduction="mean"):
        super().__init__()
        from ._betti_matching import FILTRATIONS, REDUCTIONS, _check_choice

        _check_choice(filtration, "filtration", FILTRATIONS)
        _check_choice(reduction, "reduction", REDUCTIONS)
        self.filtration, self.relative, self.strict = filtration, relative, strict
        self.dims = None if dims is None else tuple(float(d) for d in dims)
        self.include_target_unmatched, self.reduction = include_target_unmatched, reduction

    def forward(self, pred, target):
        from ._betti_matching import betti_matching_loss

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
        from ._betti_matching import _check_images, _check_pair, _check_tensor, _reduce

        # the Betti term validates too, but the Dice term would broadcast mismatched shapes first
        _check_tensor(pred, "pred")
        _check_tensor(target, "target")
        _check_images(pred, "pred", True)
        _check_pair(pred, target)
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
from . import _pamc  # noqa: E402


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
