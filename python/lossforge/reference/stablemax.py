"""StableMax as the paper writes it, in eager torch (Prieto et al. 2025, "Grokking at the Edge of
Numerical Stability"): cast the logits to float64, s(x) = where(x >= 0, x + 1, 1 / (1 - x)),
log_stablemax = log(s / sum(s)), and the negative log-probability of the target.

This is the formulation users copy today. It is exact in float64 but moves ~500 bytes per logit,
keeps several full-size float64 tensors for the backward, and its `where` evaluates both branches, so
the gradient is NaN at a logit of exactly 1.0 (1 / (1 - x) is infinite there).
"""
import torch


def s(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x + 1, 1 / (1 - x))


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    sx = s(x)
    return torch.log(sx / sx.sum(dim=dim, keepdim=True))


def stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    sx = s(x)
    return sx / sx.sum(dim=dim, keepdim=True)


def stablemax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                            reduction: str = "mean") -> torch.Tensor:
    """StableMax-CE over the last dimension of `logits` ([..., V]) with integer `target` ([...])."""
    logprobs = log_stablemax(logits.to(torch.float64), dim=-1)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    picked = torch.gather(logprobs, -1, safe_target.unsqueeze(-1)).squeeze(-1)
    loss = -torch.where(valid, picked, torch.zeros_like(picked))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


def orthograd_(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """⊥Grad on one tensor: remove the component of g along w, then restore the norm of g."""
    w, g = param.reshape(-1), grad.reshape(-1)
    proj = torch.dot(w, g) / (torch.dot(w, w) + 1e-30)
    g_orth = g - proj * w
    g_orth = g_orth * (g.norm() / (g_orth.norm() + 1e-30))
    grad.copy_(g_orth.view_as(grad))
    return grad
