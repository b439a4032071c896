"""Optimizers built on lossforge's kernels."""
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._stablemax import _orthograd_

__all__ = ["OrthoGrad", "MFAC"]

# StableMax (⊥Grad)


class OrthoGrad(torch.optim.Optimizer):
    """⊥Grad (Prieto et al. 2025) around any torch optimizer.

    Before each step of the base optimizer, every parameter's gradient g is replaced by its
    component orthogonal to the parameter w, rescaled to the norm of g:
        g_perp = g - (w·g / (w·w + 1e-30)) w,   g <- g_perp * ‖g‖ / (‖g_perp‖ + 1e-30).
    Per tensor, one pass for the three dot products, one for the norm of g_perp as written (not the
    closed form, which cancels when g is nearly parallel to w, e.g. for a one-element parameter) and
    one that writes; sums in float64, no host sync on CUDA.

    Every keyword argument is forwarded to `base_optimizer_cls` (the original release dropped them),
    and per-group options in `params` are kept:

    >>> import torch, lossforge
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = lossforge.optim.OrthoGrad(model.parameters(), torch.optim.AdamW, lr=1e-3, weight_decay=0.0)
    >>> model(torch.ones(4, 3)).sum().backward()
    >>> opt.step()
    >>> opt.param_groups[0]["lr"]
    0.001

    `param_groups`, `state`, `state_dict()` and `load_state_dict()` are the base optimizer's, so LR
    schedulers and checkpoints work as with the base optimizer alone.

    torch.compile: `step()` cannot compile with fullgraph=True, because torch's own optimizers break
    the graph on purpose around their step (torch.optim.Optimizer's no-grad wrapper calls
    torch._dynamo.graph_break()); the projection itself compiles into one graph, and the compiled
    step (with graph breaks) matches eager.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 base_optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD, **base_kwargs: Any) -> None:
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"OrthoGrad: base_optimizer_cls must be a torch.optim.Optimizer subclass, "
                            f"got {base_optimizer_cls!r}")
        self.base_optimizer = base_optimizer_cls(params, **base_kwargs)
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        # one set of groups and one state, shared with the base optimizer
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @torch.no_grad()
    def _project_gradients(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("OrthoGrad: sparse gradients are not supported")
                _orthograd_(p.grad, p)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the base optimizer on the projected gradients. A closure is handed on to the base
        optimizer wrapped so that every gradient it computes is projected: optimizers that evaluate it
        several times per step (LBFGS) see only projected gradients."""
        if closure is None:
            self._project_gradients()
            return self.base_optimizer.step()

        def projected_closure():
            with torch.enable_grad():
                loss = closure()
            self._project_gradients()
            return loss
        return self.base_optimizer.step(projected_closure)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __repr__(self) -> str:
        return f"OrthoGrad({self.base_optimizer!r})"

# M-FAC
from .mfac import SlidingWindowIHVP as _MFACWindow, _check_device, _check_insertable  # noqa: E402
from ._ops import ops as _ops  # noqa: E402


def _check_mfac_options(lr, momentum, weight_decay, where: str) -> None:
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{where}{name} must be a float >= 0, got {value!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"{where}momentum must be in [0, 1), got {momentum!r}")


class MFAC(torch.optim.Optimizer):
    """The M-FAC optimizer (Frantar, Kurtic, Alistarh, NeurIPS 2021): preconditioned SGD with the inverse of
    the empirical Fisher of the last `ngrads` gradients, F = damp I + (1/s) sum g g^T, over all parameters
    together (one window for the concatenated parameter vector).

    Per step, with the official code's semantics: g = grad + weight_decay * p; u = F^-1 g (after g joined
    the window); v = momentum v + (1 - momentum) u when momentum > 0; p -= lr * (v or u). lr, momentum
    and weight_decay may differ per parameter group.

    The step is two passes over the gradient buffer (lossforge.mfac.SlidingWindowIHVP): pass 1 writes g
    into the buffer and computes G g; pass 2 computes F^-1 g and updates the parameters in the same sweep.
    No flattened copy of the parameters or gradients is made. With bfloat16 storage the step
    preconditions g as stored (g.bfloat16()), see SlidingWindowIHVP.update_mul.

    Warm-up (the first ngrads - 1 steps, while the window fills), the keyword `warmup`:
      - "zeros" (default: the paper's algorithm and the official code's): the buffer starts as ngrads zero
        gradients and s = ngrads from the first step, F = damp I + (1/ngrads) sum over the gradients seen
        so far; the steps along directions not seen yet are lr / damp times the gradient.
      - "scaled": s = min(steps, ngrads), F = damp I + the average of g g^T over the gradients seen so far
        (more curvature, shorter early steps).
      Both are the same operator once ngrads steps were made.

    Other keyword arguments: storage_dtype (torch.bfloat16 halves the buffer and the bytes moved),
    refactor_every (float64 refactor period of the m x m factor), process_group (a torch.distributed
    group: each rank keeps the buffer for its contiguous share of the concatenated parameters, updates
    that share, and the shares are all-gathered after each step; every rank must see the same gradients,
    e.g. after DDP's all-reduce).

    torch.compile: `step` compiles with graph breaks, not with fullgraph=True. Each step makes host
    decisions the algorithm needs: whether the gradient may enter the window (a NaN/inf raises before
    anything changes, the all-or-nothing check), and whether the O(m^2) factor update kept its accuracy
    or the factor must be refactored. Between them the passes run as traced ops.

    >>> import torch, lossforge
    >>> gen = torch.Generator().manual_seed(0)
    >>> x = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    >>> y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]], dtype=torch.float64)
    >>> w = torch.zeros(4, 1, dtype=torch.float64, requires_grad=True)
    >>> opt = lossforge.optim.MFAC([w], lr=1.0, ngrads=8, damp=1.0)
    >>> losses = []
    >>> for _ in range(20):
    ...     opt.zero_grad()
    ...     loss = (x @ w - y).square().mean()
    ...     loss.backward()
    ...     opt.step()
    ...     losses.append(loss.item())
    >>> losses[-1] < 0.05 * losses[0]
    True
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3, ngrads: int = 1024,
                 damp: float = 1e-5, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, storage_dtype: torch.dtype | None = None, warmup: str = "zeros",
                 refactor_every: int = 64, process_group: "torch.distributed.ProcessGroup | None" = None) -> None:
        _check_mfac_options(lr, momentum, weight_decay, "")
        self._frozen = False
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self._frozen = True
        plist = [p for g in self.param_groups for p in g["params"]]
        dtypes = {p.dtype for p in plist}
        devices = {p.device for p in plist}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
            raise TypeError(f"MFAC: all parameters must be float32, or all float64, got {sorted(map(str, dtypes))}")
        if len(devices) != 1:
            raise ValueError(f"MFAC: all parameters must be on one device, got {sorted(map(str, devices))}")
        _check_device(next(iter(devices)), "MFAC: parameters")
        for i, p in enumerate(plist):
            if not p.is_contiguous():
                raise ValueError(f"MFAC: parameter {i} (shape {tuple(p.shape)}) is not contiguous; "
                                 "the update is written in place, so parameters must be contiguous")
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self.ngrads, self.damp = ngrads, damp
        self.process_group = process_group
        total = sum(p.numel() for p in plist)
        if process_group is not None:
            import torch.distributed as dist

            self._rank, self._world = dist.get_rank(process_group), dist.get_world_size(process_group)
        else:
            self._rank, self._world = 0, 1
        if total < self._world:
            raise ValueError(f"MFAC: {total} parameters cannot be sharded over {self._world} ranks")
        self._bounds = [total * q // self._world for q in range(self._world + 1)]
        self._pieces = [self._pieces_of(q) for q in range(self._world)]
        lo, hi = self._bounds[self._rank], self._bounds[self._rank + 1]
        self._window = _MFACWindow(hi - lo, ngrads, damp, self.dtype, self.device, storage_dtype, warmup=warmup,
                                   refactor_every=refactor_every, process_group=process_group)
        self._momentum_buffer = None
        self._sync_state()

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_frozen", False):
            raise RuntimeError("MFAC: parameter groups cannot be added after construction (the window spans "
                               "a fixed parameter vector)")
        super().add_param_group(param_group)

    def _pieces_of(self, q: int):
        """[(group index, param index, start, end, local column)] of rank q's share [lo, hi)."""
        lo, hi = self._bounds[q], self._bounds[q + 1]
        out, a = [], 0
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                n = p.numel()
                s, e = max(lo, a), min(hi, a + n)
                if s < e:
                    out.append((gi, pi, s - a, e - a, s - lo))
                a += n
        return out

    def _sync_state(self):
        self.state["mfac"] = {"window": self._window.state_dict(), "momentum_buffer": self._momentum_buffer}

    def state_dict(self) -> dict:
        self._sync_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict saved by an MFAC over the same parameters, window and options. Everything is
        checked first (the window, the momentum buffer, every group's lr, momentum and weight decay): a
        state_dict that raises leaves the optimizer as it was."""
        where = "MFAC.load_state_dict: "
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) or \
                not isinstance(state_dict.get("param_groups"), list):
            raise ValueError(where + "expected an optimizer state_dict (keys 'state' and 'param_groups')")
        saved = state_dict["state"].get("mfac")
        if not isinstance(saved, dict) or "window" not in saved:
            raise ValueError(where + "the state_dict holds no M-FAC window (not saved by lossforge.optim.MFAC)")
        try:
            self._window._check_state(saved["window"])
        except (TypeError, ValueError) as e:
            raise type(e)(where + str(e)) from None
        buf = saved.get("momentum_buffer")
        if buf is not None:
            if not isinstance(buf, torch.Tensor) or buf.shape != (self._window.dim,) or not buf.is_floating_point():
                raise ValueError(where + f"momentum_buffer must be a floating tensor of shape [{self._window.dim}]")
            if not bool(torch.isfinite(buf).all()):
                raise ValueError(where + "momentum_buffer has NaN or inf entries")
        for gi, group in enumerate(state_dict["param_groups"]):
            if not isinstance(group, dict) or not {"lr", "momentum", "weight_decay"} <= group.keys():
                raise ValueError(where + f"param_groups[{gi}] lacks lr, momentum or weight_decay")
            _check_mfac_options(group["lr"], group["momentum"], group["weight_decay"], where + f"param_groups[{gi}]: ")
        super().load_state_dict(state_dict)  # checks the groups' sizes before it changes anything
        self._window.load_state_dict(saved["window"])
        self._momentum_buffer = None if buf is None else buf.to(device=self.device, dtype=self.dtype, copy=True)
        self._sync_state()

    @torch.no_grad()
    def step(self, closure: "Callable[[], torch.Tensor | float] | None" = None) -> "torch.Tensor | float | None":
        """One M-FAC step on the current gradients (a gradient that is None counts as zeros). A NaN or inf
        in a gradient (or in a parameter, with weight decay) raises ValueError before anything changes, so
        the step can be skipped as AMP's GradScaler does. Returns the closure's loss, if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):  # before the window changes
            _check_mfac_options(group["lr"], group["momentum"], group["weight_decay"], f"MFAC: param_groups[{gi}]: ")
        win = self._window
        # This rank's share as per-group segments of parameter and gradient views (no copies).
        segments, checks = [], []
        for gi, group in enumerate(self.param_groups):
            ps, gs, col, n, names = [], [], None, 0, []
            for (g_i, pi, s, e, c) in self._pieces[self._rank]:
                if g_i != gi:
                    continue
                p = group["params"][pi]
                grad = p.grad
                if grad is None:
                    grad = torch.zeros_like(p)
                elif grad.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients")
                grad = grad.contiguous()
                if grad.dtype != self.dtype:
                    raise TypeError(f"MFAC: a gradient is {grad.dtype}, expected {self.dtype}")
                ps.append(p.view(-1)[s:e])
                gs.append(grad.view(-1)[s:e])
                names.append(f"param_groups[{gi}]['params'][{pi}]")
                col = c if col is None else col
                n += e - s
            if n:
                segments.append((col, n, gs, ps, group))
                checks.append(([(f"MFAC: the gradient of {k}", g) for k, g in zip(names, gs)],
                               [(f"MFAC: {k} (added to its gradient by weight decay)", p) for k, p in zip(names, ps)],
                               float(group["weight_decay"])))
        _check_insertable(checks, self.dtype)  # NaN/inf raises here, before anything changes
        with win._all_or_nothing():
            b = win._solve(win._insert([(col, n, gs, ps if group["weight_decay"] > 0 else [], group["weight_decay"])
                                        for col, n, gs, ps, group in segments]))
        G = win.G[: win._rows()]
        if self._momentum_buffer is None and any(g["momentum"] > 0 for g in self.param_groups):
            self._momentum_buffer = torch.zeros(win.dim, dtype=self.dtype, device=self.device)
            self._sync_state()
        for col, n, gs, ps, group in segments:
            Gs = G if n == win.dim else G.narrow(1, col, n)
            mom = float(group["momentum"])
            buf = self._momentum_buffer.narrow(0, col, n) if mom > 0 else None
            _ops.mfac_step_(Gs, b, ps, gs, buf, -1.0 / self.damp, 1.0 / self.damp, float(group["lr"]),
                            float(group["weight_decay"]), mom)
        if self._world > 1:
            self._all_gather_params()
        return loss

    def _all_gather_params(self):
        import torch.distributed as dist

        def views(q):
            return [self.param_groups[gi]["params"][pi].view(-1)[s:e] for gi, pi, s, e, _ in self._pieces[q]]

        width = max(self._bounds[q + 1] - self._bounds[q] for q in range(self._world))
        mine = torch.zeros(width, dtype=self.dtype, device=self.device)
        n = self._bounds[self._rank + 1] - self._bounds[self._rank]
        torch.cat(views(self._rank), out=mine[:n])
        outs = [torch.empty_like(mine) for _ in range(self._world)]
        dist.all_gather(outs, mine, group=self.process_group)
        for q in range(self._world):
            if q == self._rank:
                continue
            off = 0
            for v in views(q):
                v.copy_(outs[q][off: off + v.numel()])
                off += v.numel()
