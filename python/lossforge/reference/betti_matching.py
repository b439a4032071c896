"""Persistence barcodes and Betti matching from the definitions, in plain Python (small images only).

Independent of the C++ core: no union-find, no duality, no clearing. Every homology dimension k is
the textbook reduction of the boundary matrix of the V-construction cubical complex (columns: the
(k+1)-cells, rows: the k-cells, both in filtration order), and the image pairs of the induced map
H(K_f) -> H(K_c) (c = min(f, g), so K_f(t) is a subcomplex of K_c(t)) come from the same matrix with
the columns ordered by c and the rows by f (Cohen-Steiner, Edelsbrunner, Harer, Morozov 2009).

Order of the cells of one dimension: (value, linear index of the lower corner, type), where the type
of an edge is its axis, of a 3D face its normal axis (the order of the Betti-Matching-3D reference).
Critical pixel of a cell: the vertex attaining its value; on a tie the largest linear index, except
for 3D cubes, where the smallest wins (the reference's convention).

Induced matching (Bauer & Lesnick; Stucki et al. 2023): an f-bar maps to the image bar with the same
birth cell, which maps to the c-bar with the same death cell; an f-bar and a g-bar are matched when
they reach the same c-bar. Loss: sum_k w_k [sum_matched 2 ||(b, d) - (b', d')||^2 +
sum_unmatched_pred (b - d)^2 + sum_unmatched_target (b' - d')^2].
"""
from __future__ import annotations

import itertools

import numpy as np
import torch


def _cells(shape):
    """All cells by dimension: (corner, axes) with axes a sorted tuple of spanned axes."""
    D = len(shape)
    out = [[] for _ in range(D + 1)]
    for axes_len in range(D + 1):
        for axes in itertools.combinations(range(D), axes_len):
            for corner in itertools.product(*(range(n) for n in shape)):
                if all(corner[a] + 1 < shape[a] for a in axes):
                    out[axes_len].append((corner, axes))
    return out


def _vertices(cell):
    corner, axes = cell
    for bits in itertools.product((0, 1), repeat=len(axes)):
        v = list(corner)
        for a, b in zip(axes, bits):
            v[a] += b
        yield tuple(v)


def _type(cell, D):
    corner, axes = cell
    if len(axes) == 1:
        return axes[0]
    if len(axes) == 2 and D == 3:
        return ({0, 1, 2} - set(axes)).pop()
    return 0


def _facets(cell):
    corner, axes = cell
    for a in axes:
        rest = tuple(x for x in axes if x != a)
        yield (corner, rest)
        up = list(corner)
        up[a] += 1
        yield (tuple(up), rest)


class _Complex:
    def __init__(self, shape):
        self.shape = tuple(shape)
        self.D = len(shape)
        self.cells = _cells(shape)

    def lin(self, v):
        return int(np.ravel_multi_index(v, self.shape))

    def value(self, img, cell):
        return max(img[v] for v in _vertices(cell))

    def key(self, img, cell):
        return (self.value(img, cell), self.lin(cell[0]), _type(cell, self.D))

    def critical(self, img, cell):
        val = self.value(img, cell)
        cands = sorted(self.lin(v) for v in _vertices(cell) if img[v] == val)
        is_cube_3d = self.D == 3 and len(cell[1]) == 3
        return cands[0] if is_cube_3d else cands[-1]

    def pivot_pairs(self, row_img, col_img, k):
        """Pivot pairs (k-cell, (k+1)-cell) of the boundary matrix with rows ordered by row_img and
        columns by col_img (standard left-to-right reduction over Z/2)."""
        rows = sorted(self.cells[k], key=lambda c: self.key(row_img, c))
        pos = {c: i for i, c in enumerate(rows)}
        cols = sorted(self.cells[k + 1], key=lambda c: self.key(col_img, c))
        low_of = {}
        pairs = []
        for col in cols:
            column = set()
            for fct in _facets(col):
                column ^= {pos[fct]}
            while column:
                low = max(column)
                if low not in low_of:
                    break
                column ^= low_of[low]
            if column:
                low = max(column)
                low_of[low] = column
                pairs.append((rows[low], col))
        return pairs

    def bars(self, img, k):
        """Non-zero persistence pairs (birth cell, death cell) of dimension k."""
        return [(s, t) for s, t in self.pivot_pairs(img, img, k) if self.value(img, s) != self.value(img, t)]

    def essential(self, img):
        return min(self.cells[0], key=lambda c: self.key(img, c))


def barcode(image: np.ndarray, include_essential: bool = False):
    """Sublevel barcode of a 2D/3D numpy image: per dimension a list of (birth pixel, death pixel)
    flat indices (death -1 for the essential bar)."""
    cx = _Complex(image.shape)
    out = []
    for k in range(cx.D):
        bars = [(cx.critical(image, s), cx.critical(image, t)) for s, t in cx.bars(image, k)]
        if k == 0 and include_essential:
            bars.append((cx.lin(cx.essential(image)[0]), -1))
        out.append(bars)
    return out


def matching(f: np.ndarray, g: np.ndarray, strict: bool = False):
    """Betti matching of two sublevel images f, g (numpy, same shape). Returns per dimension
    (matched [(fb, fd, gb, gd)], unmatched f [(fb, fd)], unmatched g [(gb, gd)]) of flat pixel indices."""
    cx = _Complex(f.shape)
    c = np.minimum(f, g)
    out = []
    for k in range(cx.D):
        bars_f = {s: t for s, t in cx.bars(f, k)}
        bars_g = {s: t for s, t in cx.bars(g, k)}
        img_f = {t: s for s, t in cx.pivot_pairs(f, c, k)}  # c-ordered column -> f-ordered pivot row
        img_g = {t: s for s, t in cx.pivot_pairs(g, c, k)}
        matched, used_f, used_g = [], set(), set()
        for sc, tc in cx.bars(c, k):
            sf, sg = img_f.get(tc), img_g.get(tc)
            if sf not in bars_f or sg not in bars_g:
                continue
            if strict:
                dc = cx.value(c, tc)
                if not (cx.value(f, sf) < dc and cx.value(g, sg) < dc):
                    continue
            matched.append((cx.critical(f, sf), cx.critical(f, bars_f[sf]), cx.critical(g, sg), cx.critical(g, bars_g[sg])))
            used_f.add(sf)
            used_g.add(sg)
        un_f = [(cx.critical(f, s), cx.critical(f, t)) for s, t in bars_f.items() if s not in used_f]
        un_g = [(cx.critical(g, s), cx.critical(g, t)) for s, t in bars_g.items() if s not in used_g]
        out.append((matched, un_f, un_g))
    return out


def loss_from_matching(pred: torch.Tensor, target: torch.Tensor, result, weights=None,
                       include_target_unmatched: bool = True) -> torch.Tensor:
    """The Betti matching loss of one instance from a matching of flat pixel indices (the output
    of :func:`matching`), as a differentiable torch expression in pred."""
    p = pred.reshape(-1)
    t = target.reshape(-1).to(p.dtype)
    total = p.new_zeros(())
    for k, (matched, un_f, un_g) in enumerate(result):
        w = 1.0 if weights is None else float(weights[k])
        term = p.new_zeros(())
        if matched:
            m = torch.tensor(matched, dtype=torch.long, device=p.device)
            term = term + 2 * ((p[m[:, 0]] - t[m[:, 2]]) ** 2 + (p[m[:, 1]] - t[m[:, 3]]) ** 2).sum()
        if un_f:
            u = torch.tensor(un_f, dtype=torch.long, device=p.device)
            term = term + ((p[u[:, 0]] - p[u[:, 1]]) ** 2).sum()
        if un_g and include_target_unmatched:
            v = torch.tensor(un_g, dtype=torch.long, device=p.device)
            term = term + ((t[v[:, 0]] - t[v[:, 1]]) ** 2).sum()
        total = total + w * term
    return total


def betti_matching_loss(pred: torch.Tensor, target: torch.Tensor, filtration: str = "superlevel",
                        weights=None, include_target_unmatched: bool = True) -> torch.Tensor:
    """Per-instance loss [B * C] of probabilities [B, C, *spatial] (superlevel: f = 1 - p, sublevel:
    f = p, bothlevel: the mean of both, as topolosses' "bothlevels"), from the definitions."""
    spatial = pred.shape[2:]
    P = pred.reshape((-1,) + tuple(spatial))
    T = target.reshape((-1,) + tuple(spatial)).to(pred.dtype)
    losses = []
    for n in range(P.shape[0]):
        total = P.new_zeros(())
        for flt in (["superlevel", "sublevel"] if filtration == "bothlevel" else [filtration]):
            pn = P[n].detach().cpu().numpy()
            tn = T[n].detach().cpu().numpy()
            f, g = (1 - pn, 1 - tn) if flt == "superlevel" else (pn, tn)
            total = total + loss_from_matching(P[n], T[n], matching(f, g), weights, include_target_unmatched)
        losses.append(total / 2 if filtration == "bothlevel" else total)
    return torch.stack(losses)
