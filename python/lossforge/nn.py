"""torch.nn modules built on lossforge's functional API."""
import torch

from ._stablemax import _check_options, _check_positional_weight, stablemax_cross_entropy

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
    (plus `dim`: the class dimension, 1 by default, -1 for `[..., V]` logits); everything after
    `weight` is keyword-only. Targets are class indices or class probabilities, autocast and DTensors
    as in `lossforge.stablemax_cross_entropy`.

    >>> import torch, lossforge
    >>> loss_fn = lossforge.nn.StableMaxCrossEntropyLoss(ignore_index=-100, dim=-1)
    >>> logits_BLV, target_BL = torch.zeros(2, 3, 4), torch.tensor([[0, 1, -100], [3, 2, 1]])
    >>> loss_fn(logits_BLV, target_BL)   # uniform logits: log 4
    tensor(1.3863)
    """

    def __init__(self, weight: torch.Tensor | None = None, *, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, dim: int = 1) -> None:
        super().__init__()
        fn = "StableMaxCrossEntropyLoss"
        _check_positional_weight(weight, fn, "ignore_index=, reduction=, label_smoothing=, dim=")
        _check_options(ignore_index, reduction, label_smoothing, fn)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.dim = dim

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return stablemax_cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                                       reduction=self.reduction, label_smoothing=self.label_smoothing, dim=self.dim)

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
    Compiles with torch.compile(fullgraph=True).

    >>> import torch, lossforge
    >>> f = lossforge.nn.EfficientAttentionAmortizer(3, d_k=16)
    >>> x = torch.randn(4, 100, 3)
    >>> f(x).shape, bool(torch.allclose(f(x[:, torch.randperm(100)]), f(x), atol=1e-6))
    (torch.Size([4, 3]), True)
    """

    def __init__(self, dim: int, d_k: int = 64) -> None:
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

    forward returns sliced_wasserstein(x, y, ...) with the vMF projections around f(x, y) (root and
    reduction as in lossforge.sliced_wasserstein); weights, if given, weight the points in the distance
    (the amortizer pools the points uniformly). kappa = inf is allowed (amortized Max-SW).

    torch.compile: forward compiles with fullgraph=True for dim = 3 when no generator is passed (torch
    cannot trace a Generator object). For dim != 3 the vMF rejection sampler decides on the host when every
    sample is accepted (see lossforge.vmf_sample), so forward compiles with graph breaks (fullgraph=False).

    >>> import torch, lossforge
    >>> sw = lossforge.nn.AmortizedSlicedWasserstein(3, kappa=10.0, n_projections=100)
    >>> x = torch.randn(8, 256, 3, requires_grad=True)  # e.g. a decoder's output
    >>> y = torch.randn(8, 200, 3)
    >>> loss = sw(x, y)         # gradients reach x and y (the direction eps is a constant)
    >>> loss.backward()         # then the model's optimizer step
    >>> objective = sw.amortizer_step(x, y)   # one ascent step of the amortizer on the v-DSW objective
    >>> loss.shape, x.grad.shape
    (torch.Size([]), torch.Size([8, 256, 3]))
    """

    def __init__(self, dim: int, kappa: float, n_projections: int = 100, amortizer: str = "efficient_attention", *,
                 p: float = 2.0, d_k: int = 64, root: bool = True, reduction: str = "mean",
                 amortizer_lr: float = 1e-3) -> None:
        super().__init__()
        dim = _check_count(dim, "dim", minimum=2)
        self.n_projections = _check_count(n_projections, "n_projections")
        if amortizer != "efficient_attention":
            raise ValueError(f"amortizer must be 'efficient_attention', got {amortizer!r}")
        if not float(kappa) >= 0:
            raise ValueError(f"kappa must be >= 0 (inf: amortized Max-SW), got {kappa}")
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

    def _projections(self, eps: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return _vmf_sample(eps, self.kappa, self.n_projections, generator).transpose(-1, -2).contiguous()

    def forward(self, x: torch.Tensor, y: torch.Tensor, x_weights: torch.Tensor | None = None,
                y_weights: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            eps = self.direction(x.detach(), y.detach())
            proj = self._projections(eps, generator)
        return _sliced_wasserstein(x, y, x_weights, y_weights, p=self.p, projections=proj, root=self.root,
                                   reduction=self.reduction)

    def objective(self, x: torch.Tensor, y: torch.Tensor, x_weights: torch.Tensor | None = None,
                  y_weights: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
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

    def amortizer_step(self, x: torch.Tensor, y: torch.Tensor, x_weights: torch.Tensor | None = None,
                       y_weights: torch.Tensor | None = None, optimizer: torch.optim.Optimizer | None = None,
                       generator: torch.Generator | None = None) -> float:
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
from typing import Any, Sequence  # noqa: E402


class BettiMatchingLoss(torch.nn.Module):
    """Betti matching loss (:func:`lossforge.betti_matching_loss`, which documents the options) of
    ``[B, C, H, W]`` / ``[B, C, D, H, W]`` probabilities (or logits with ``activation``) against a
    target of the same shape. The defaults are topolosses' ``BettiMatchingLoss(use_base_loss=False)``
    (background channel left out, superlevel filtration).

    >>> import torch, lossforge
    >>> loss_fn = lossforge.nn.BettiMatchingLoss(activation="softmax")
    >>> logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    >>> target = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 16, 16)), 3).permute(0, 3, 1, 2)
    >>> loss = loss_fn(logits, target)
    >>> loss.backward()
    >>> loss.shape, logits.grad.shape
    (torch.Size([]), torch.Size([2, 3, 16, 16]))
    """

    def __init__(self, filtration: str = "superlevel", *, activation: str | None = None,
                 include_background: bool = False, topology_weights: tuple[float, float] = (1.0, 1.0),
                 push_unmatched_to_1_0: bool = False, barcode_length_threshold: float = 0.0, sphere: bool = False,
                 relative: bool = False, strict: bool = False, dims: Sequence[float] | None = None,
                 include_target_unmatched: bool = True, reduction: str = "mean") -> None:
        super().__init__()
        from . import _betti_matching as bm

        filtration = bm._filtration(filtration)
        bm._check_choice(activation, "activation", bm.ACTIVATIONS)
        bm._check_choice(reduction, "reduction", bm.REDUCTIONS)
        for name, flag in (("include_background", include_background), ("push_unmatched_to_1_0", push_unmatched_to_1_0),
                           ("strict", strict), ("include_target_unmatched", include_target_unmatched)):
            bm._check_flag(flag, name)
        bm._check_frame_options(relative, sphere)
        self.barcode_length_threshold = bm._check_number(barcode_length_threshold, "barcode_length_threshold")
        self.topology_weights = bm._topology_weights(topology_weights)
        self.dims = None if dims is None else tuple(float(d) for d in dims)
        self.filtration, self.activation, self.include_background = filtration, activation, include_background
        self.push_unmatched_to_1_0, self.sphere, self.relative, self.strict = push_unmatched_to_1_0, sphere, relative, strict
        self.include_target_unmatched, self.reduction = include_target_unmatched, reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from ._betti_matching import betti_matching_loss

        return betti_matching_loss(
            pred, target, self.filtration, activation=self.activation, include_background=self.include_background,
            topology_weights=self.topology_weights, push_unmatched_to_1_0=self.push_unmatched_to_1_0,
            barcode_length_threshold=self.barcode_length_threshold, sphere=self.sphere, relative=self.relative,
            strict=self.strict, dims=self.dims, include_target_unmatched=self.include_target_unmatched,
            reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"filtration={self.filtration!r}, activation={self.activation!r}, "
                f"include_background={self.include_background}, topology_weights={self.topology_weights}, "
                f"push_unmatched_to_1_0={self.push_unmatched_to_1_0}, "
                f"barcode_length_threshold={self.barcode_length_threshold}, sphere={self.sphere}, "
                f"relative={self.relative}, strict={self.strict}, dims={self.dims}, "
                f"include_target_unmatched={self.include_target_unmatched}, reduction={self.reduction!r}")


class DiceBettiMatchingLoss(torch.nn.Module):
    """Soft Dice loss plus ``alpha`` times the Betti matching loss: topolosses' default
    ``BettiMatchingLoss()`` (Dice + 0.5 Betti matching, the Betti term without the background
    channel), with the same value for the same call.

    ``activation`` (None, "sigmoid", "softmax" over the channels) is applied first and both terms see
    its output. Dice per (b, c) instance over every channel: 1 - (2 sum(p t) + smooth) /
    (sum(p) + sum(t) + smooth). ``reduction`` "mean" averages each term over its instances (the Dice
    term over B*C, the Betti term over the channels it uses), "sum" sums them, "none" returns
    ``[B, C]`` (the Betti term 0 on a left-out background channel). The remaining keyword arguments
    go to :class:`BettiMatchingLoss`. Unlike topolosses, ``alpha >= 1`` keeps the Dice term.

    >>> import torch, lossforge
    >>> loss_fn = lossforge.nn.DiceBettiMatchingLoss()
    >>> pred = torch.tensor([[[[0.9, 0.2, 0.8], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]]]])
    >>> target = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])
    >>> round(loss_fn(pred, target).item(), 4)  # Dice 1 - 1.8 / 3.5 + 0.5 * (0.8 - 0.2)^2
    0.6657
    """

    def __init__(self, alpha: float = 0.5, *, smooth: float = 1e-5, activation: str | None = None,
                 reduction: str = "mean", **betti_kwargs: Any) -> None:
        super().__init__()
        from . import _betti_matching as bm

        if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
        if isinstance(smooth, bool) or not (isinstance(smooth, (int, float)) and smooth >= 0):
            raise ValueError(f"smooth must be a non-negative number, got {smooth!r}")
        bm._check_choice(activation, "activation", bm.ACTIVATIONS)
        self.betti = BettiMatchingLoss(reduction=reduction, **betti_kwargs)
        self.alpha, self.smooth, self.activation, self.reduction = float(alpha), float(smooth), activation, reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from ._betti_matching import _activate, _check_images, _check_pair, _check_tensor, _reduce

        # the Betti term validates too, but the Dice term would broadcast mismatched shapes first
        _check_tensor(pred, "pred")
        _check_tensor(target, "target")
        _check_images(pred, "pred", True)
        _check_pair(pred, target)
        x = _activate(pred, self.activation)
        dims = tuple(range(2, x.dim()))
        t = target.to(x.dtype)
        inter = (x * t).sum(dims)
        dice = 1 - (2 * inter + self.smooth) / (x.sum(dims) + t.sum(dims) + self.smooth)
        dice = _reduce(dice, self.reduction, x.shape[0], x.shape[1])
        if self.alpha == 0:
            return dice
        betti = self.betti(x, target)
        if self.reduction == "none" and betti.shape[1] != dice.shape[1]:  # background channel left out
            betti = torch.cat([torch.zeros_like(betti[:, :1]), betti], 1)
        return dice + self.alpha * betti.to(dice.dtype)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, smooth={self.smooth}, activation={self.activation!r}, "
                f"reduction={self.reduction!r}")


# PamC
from . import _pamc  # noqa: E402


class PamCLoss(torch.nn.Module):
    """`lossforge.pamc_loss` as a module. The graph is validated and laid out once and reused for as
    long as the same edge tensors (unchanged in place) are passed: a training loop pays for it once.
    soft, reduction and num_clusters are keyword-only.

    torch.compile: given a PamCGraph (`lossforge.prepare_graph`) the module compiles with fullgraph=True
    (as `pamc_loss` does); given raw edge tensors it compiles with graph breaks, since the cache of the
    prepared graph is a host decision (are these the tensors seen last time, unchanged?).

    >>> import torch, lossforge
    >>> g = lossforge.stochastic_block_model(60, 3, avg_degree=4.0, seed=0)
    >>> edge_index, edge_weight = lossforge.influence_matrix(g.edge_index, 60)
    >>> z = torch.randn(60, 8, requires_grad=True)
    >>> q = torch.softmax(torch.randn(60, 3), dim=1)
    >>> loss_fn = lossforge.nn.PamCLoss(tau=1.0)
    >>> loss = loss_fn(z, edge_index, edge_weight, assignment=q)
    >>> loss.backward()
    >>> loss.shape, z.grad.shape
    (torch.Size([]), torch.Size([60, 8]))
    """

    def __init__(self, tau: float = 1.0, *, soft: bool = False, reduction: str = "mean",
                 num_clusters: int | None = None) -> None:
        super().__init__()
        _pamc._check_tau(tau, "PamCLoss")
        _pamc._check_reduction(reduction, "PamCLoss")
        if not isinstance(soft, bool):
            raise TypeError(f"PamCLoss: soft must be a bool, got {type(soft).__name__}")
        self.tau, self.soft, self.reduction, self.num_clusters = float(tau), soft, reduction, num_clusters
        self._graphs = _pamc.GraphCache()

    def forward(self, z: torch.Tensor, edge_index: _pamc.EdgeIndex, edge_weight: torch.Tensor | None = None,
                assignment: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(z, torch.Tensor) and z.dim() == 2:
            edge_index = self._graphs.get(z, edge_index, edge_weight, "PamCLoss")
            edge_weight = None
        return _pamc.pamc_loss(z, edge_index, edge_weight, assignment=assignment, tau=self.tau, soft=self.soft,
                               reduction=self.reduction, num_clusters=self.num_clusters)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, soft={self.soft}, reduction={self.reduction!r}"
