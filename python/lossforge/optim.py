"""Optimizers built on lossforge's kernels."""
import torch

from .stablemax import _orthograd_

__all__ = ["OrthoGrad"]

# StableMax (⊥Grad)


class OrthoGrad(torch.optim.Optimizer):
    """⊥Grad (Prieto et al. 2025) around any torch optimizer.

    Before each step of the base optimizer, every parameter's gradient g is replaced by its
    component orthogonal to the parameter w, rescaled to the norm of g:
        g_perp = g - (w·g / (w·w + 1e-30)) w,   g <- g_perp * ‖g‖ / (‖g_perp‖ + 1e-30).
    One fused kernel per tensor (dot products accumulated in float64; no host sync on CUDA).

    Every keyword argument is forwarded to `base_optimizer_cls` (the original release dropped them),
    and per-group options in `params` are kept:

    >>> opt = lossforge.optim.OrthoGrad(model.parameters(), torch.optim.AdamW, lr=1e-3, weight_decay=0.0)

    `param_groups`, `state`, `state_dict()` and `load_state_dict()` are the base optimizer's, so LR
    schedulers and checkpoints work as with the base optimizer alone.
    """

    def __init__(self, params, base_optimizer_cls: type = torch.optim.SGD, **base_kwargs):
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"OrthoGrad: base_optimizer_cls must be a torch.optim.Optimizer subclass, "
                            f"got {base_optimizer_cls!r}")
        self.base_optimizer = base_optimizer_cls(params, **base_kwargs)
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        # one set of groups and one state, shared with the base optimizer
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("OrthoGrad: sparse gradients are not supported")
                _orthograd_(p.grad, p)
        self.base_optimizer.step()
        return loss

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __repr__(self):
        return f"OrthoGrad({self.base_optimizer!r})"

# M-FAC
