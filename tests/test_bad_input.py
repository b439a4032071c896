"""What each family does with bad input: one row per case, run here, and rendered into docs/bad-input.md
(`python tools/bad_input_table.py` writes it; the last test fails while the committed page differs)."""
import math
import pathlib
import re

import pytest
import torch

import lossforge
from lossforge import mfac
from lossforge.optim import MFAC

ops = torch.ops.lossforge


def _window_with(g):
    W = mfac.SlidingWindowIHVP(4, 2)
    W.update(g)


def _mfac_step_with_grad(value):
    p = torch.zeros(3, requires_grad=True)
    opt = MFAC([p], ngrads=2)
    p.grad = torch.tensor([1.0, value, 0.0])
    opt.step()


def _nan_at(shape, index, dtype=torch.float32):
    t = torch.rand(shape, dtype=dtype)
    t[index] = math.nan
    return t


# (family, input, call, exception, message pattern)
CASES = [
    ("StableMax", "target out of range (CPU)",
     lambda: lossforge.stablemax_cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1])), ValueError,
     r"target value 5 at flat index 1 is out of range: expected a class index in \[0, 5\)"),
    ("StableMax", "float class indices (probabilities need input's shape)",
     lambda: lossforge.stablemax_cross_entropy(torch.randn(3, 5), torch.tensor([0.0, 4.0, 1.0])), TypeError,
     r"a floating target holds class probabilities and must have input's shape \[3, 5\], got \[3\]"),
    ("StableMax", "target shape without the class dimension of [B, L, V] logits",
     lambda: lossforge.stablemax_cross_entropy(torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.long)), ValueError,
     "for \\[..., V\\] logits pass dim=-1"),
    ("StableMax", "label_smoothing outside [0, 1]",
     lambda: lossforge.stablemax_cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long),
                                               label_smoothing=1.5), ValueError,
     r"label_smoothing must be a float in \[0, 1\], got 1.5"),
    ("StableMax", "integer logits (raw op)",
     lambda: ops.stablemax(torch.zeros(3, 4, dtype=torch.uint8), 1, False), RuntimeError,
     "x must be float32, float64, bfloat16 or float16, got uint8"),
    ("StableMax", "a CPU and a meta tensor in one call (raw op)",
     lambda: ops.stablemax_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long, device="meta"), None, 1,
                                         -100, 0.0), RuntimeError,
     "all tensor arguments must be on one device, got cpu and meta"),
    ("sliced Wasserstein", "NaN or inf coordinate",
     lambda: lossforge.sliced_wasserstein(_nan_at((1, 5, 2), (0, 3, 1)), torch.randn(1, 4, 2),
                                          projections=torch.randn(2, 3)), ValueError, "x contains NaN or infinite values"),
    ("sliced Wasserstein", "clouds of different dimension",
     lambda: lossforge.sliced_wasserstein(torch.randn(1, 5, 2), torch.randn(1, 4, 3)), ValueError, "dimension"),
    ("sliced Wasserstein", "negative weight",
     lambda: lossforge.sliced_wasserstein(torch.randn(1, 3, 2), torch.randn(1, 3, 2), torch.tensor([[1.0, -1.0, 1.0]]),
                                          None), ValueError, "non-negative"),
    ("sliced Wasserstein", "p < 1",
     lambda: lossforge.sliced_wasserstein(torch.randn(1, 3, 2), torch.randn(1, 3, 2), p=0.5), ValueError, "p must be"),
    ("sliced Wasserstein", "float64 clouds for a float32 amortizer",
     lambda: lossforge.nn.AmortizedSlicedWasserstein(2, kappa=1.0)(torch.randn(1, 4, 2, dtype=torch.float64),
                                                                    torch.randn(1, 4, 2, dtype=torch.float64)),
     TypeError, "x is torch.float64 but the amortizer's parameters are torch.float32"),
    ("Betti matching", "NaN in pred",
     lambda: lossforge.betti_matching_loss(_nan_at((1, 1, 5, 5), (0, 0, 2, 2)), torch.rand(1, 1, 5, 5)), ValueError,
     "pred contains NaN"),
    ("Betti matching", "target of another shape",
     lambda: lossforge.betti_matching_loss(torch.rand(1, 1, 5, 5), torch.rand(1, 1, 5, 6)), ValueError,
     "target must have pred's shape"),
    ("Betti matching", "a 1D image",
     lambda: lossforge.betti_matching_loss(torch.rand(1, 1, 5), torch.rand(1, 1, 5)), ValueError,
     r"pred must have shape \[B, C, H, W\] \(2D\) or \[B, C, D, H, W\] \(3D\)"),
    ("Betti matching", "an empty image",
     lambda: lossforge.betti_matching_loss(torch.rand(1, 1, 0, 5), torch.rand(1, 1, 0, 5)), ValueError, "is empty"),
    ("M-FAC", "NaN gradient into a window (nothing changes)",
     lambda: _window_with(torch.tensor([1.0, math.nan, 0.0, 2.0])), ValueError,
     r"g has a non-finite entry \(nan at flat index 1\): nothing was changed"),
    ("M-FAC", "float32 gradient entry above 2^56 (its square overflows)",
     lambda: _window_with(torch.tensor([1.0, 1e18, 0.0, 2.0])), ValueError,
     "too large for the float32 accumulation"),
    ("M-FAC", "inf gradient in optim.MFAC.step (nothing changes)",
     lambda: _mfac_step_with_grad(math.inf), ValueError,
     r"the gradient of param_groups\[0\]\['params'\]\[0\] has a non-finite entry"),
    ("M-FAC", "a window state_dict with count = -5 (nothing changes)",
     lambda: mfac.SlidingWindowIHVP(4, 2).load_state_dict({**mfac.SlidingWindowIHVP(4, 2).state_dict(), "count": -5}),
     ValueError, r"state_dict\['count'\] must be an int >= 0, got -5"),
    ("M-FAC", "non-positive damp",
     lambda: mfac.SlidingWindowIHVP(4, 2, damp=0.0), ValueError, "damp must be positive and finite"),
    ("PamC", "edge index out of range",
     lambda: lossforge.pamc_loss(torch.randn(4, 3), torch.tensor([[0, 1], [1, 9]]), assignment=torch.zeros(4, dtype=torch.long)),
     ValueError, "node index 9 at edge 1, out of range for 4 nodes"),
    ("PamC", "negative edge weight",
     lambda: lossforge.pamc_loss(torch.randn(4, 3), torch.tensor([[0, 1], [1, 2]]), torch.tensor([1.0, -1.0]),
                                 assignment=torch.zeros(4, dtype=torch.long)), ValueError,
     "edge_weight must be finite and non-negative, got -1.0 at edge 1"),
    ("PamC", "hard label out of range",
     lambda: lossforge.pamc_loss(torch.randn(4, 3), torch.tensor([[0], [1]]), assignment=torch.tensor([0, 1, 2, 5]),
                                 num_clusters=3), ValueError, r"labels must be in \[0, 3\), got 5"),
    ("PamC", "tau beyond 1/eps of z's dtype",
     lambda: lossforge.pamc_loss(torch.randn(4, 3), torch.tensor([[0], [1]]), assignment=torch.zeros(4, dtype=torch.long),
                                 tau=1e300), ValueError, r"\|tau\| must be at most 8.389e\+06 for float32 z"),
    ("PamC", "num_clusters too large to allocate",
     lambda: lossforge.pamc_loss(torch.randn(4, 3), torch.tensor([[0], [1]]), assignment=torch.zeros(4, dtype=torch.long),
                                 num_clusters=2**40), ValueError, "do not fit in memory: is num_clusters=1099511627776 right"),
]


@pytest.mark.parametrize("family,what,call,exc,match", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input(family, what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def render() -> str:
    """docs/bad-input.md: the cases above, as a table per family (with the message each one raises)."""
    lines = ["# What happens on bad input", "",
             "Generated from `tests/test_bad_input.py` (`python tools/bad_input_table.py`), where each row is a test.",
             "Every error is raised before any state changes; messages name the argument.", ""]
    for family in dict.fromkeys(c[0] for c in CASES):
        lines += [f"## {family}", "", "| input | raises | message |", "|---|---|---|"]
        for fam, what, call, exc, _ in CASES:
            if fam != family:
                continue
            try:
                call()
                message = "(no error)"
            except exc as e:  # without the C++ checks' "function, file:line, " prefix
                message = re.sub(r"^\w+, \S+:\d+, ", "", str(e).splitlines()[0]).replace("|", "\\|")
            lines.append(f"| {what} | `{exc.__name__}` | {message} |")
        lines.append("")
    return "\n".join(lines)


def test_docs_table_is_current():
    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
    assert page.exists() and page.read_text() == render(), "docs/bad-input.md is stale: python tools/bad_input_table.py"
