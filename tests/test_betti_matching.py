"""Betti matching family: barcodes against gudhi and cripser, matchings against the Betti-Matching-3D
reference build (inside the topolosses wheel) and the pure reference, the invariants of the spec,
the loss and its gradient, options, modules and bad input."""
import dataclasses
import glob
import importlib
import importlib.util
import os
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import lossforge
from lossforge import nn as lnn
from lossforge.reference import betti_matching as ref

ops = torch.ops.lossforge


# ---- oracles ------------------------------------------------------------------------------------

def reference_build():
    """The Betti-Matching-3D C++ build shipped in the topolosses wheel (pip install --no-deps
    topolosses); importing it needs only its folder on sys.path. Missing -> the test fails."""
    spec = importlib.util.find_spec("topolosses")
    assert spec is not None, "topolosses is not installed (pip install --no-deps topolosses)"
    folder = os.path.join(os.path.dirname(spec.origin), "losses", "betti_matching", "src")
    assert glob.glob(os.path.join(folder, "betti_matching*.so")), f"no betti_matching*.so in {folder}"
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("betti_matching")


def topolosses_betti_loss():
    """topolosses' BettiMatchingLoss class. `import topolosses.losses` imports every loss of the package
    (cv2 for one of them), so its betti_matching subpackage is imported on its own, under a private
    package name, with the reference build above as its extension."""
    spec = importlib.util.find_spec("topolosses")
    assert spec is not None, "topolosses is not installed (pip install --no-deps topolosses)"
    losses = os.path.join(os.path.dirname(spec.origin), "losses")
    build = reference_build()
    for name, path in (("_topolosses_ref", losses), ("_topolosses_ref.betti_matching", os.path.join(losses, "betti_matching")),
                       ("_topolosses_ref.betti_matching.src", os.path.join(losses, "betti_matching", "src"))):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [path]
            sys.modules[name] = module
    sys.modules["_topolosses_ref.betti_matching.src.betti_matching"] = build
    sys.modules["_topolosses_ref.betti_matching.src"].betti_matching = build
    return importlib.import_module("_topolosses_ref.betti_matching.src.betti_matching_loss").BettiMatchingLoss


def flat_rows(arrays, shape):
    a = np.asarray(arrays).reshape(-1, len(shape))
    return [int(x) for x in np.ravel_multi_index(tuple(a.T), shape)] if len(a) else []


def build_matching(f, g):
    """The reference build's matching of sublevel images f, g as sorted per-dimension sets."""
    r = reference_build().compute_matching(np.ascontiguousarray(f, np.float64), np.ascontiguousarray(g, np.float64))
    out = []
    for k in range(f.ndim):
        m = sorted(zip(*(flat_rows(a[k], f.shape) for a in (
            r.input1_matched_birth_coordinates, r.input1_matched_death_coordinates,
            r.input2_matched_birth_coordinates, r.input2_matched_death_coordinates))))
        u = sorted(zip(flat_rows(r.input1_unmatched_birth_coordinates[k], f.shape),
                       flat_rows(r.input1_unmatched_death_coordinates[k], f.shape)))
        v = sorted(zip(flat_rows(r.input2_unmatched_birth_coordinates[k], f.shape),
                       flat_rows(r.input2_unmatched_death_coordinates[k], f.shape)))
        out.append((m, u, v))
    return out


def as_sets(result, shape):
    """A BettiMatchingResult as sorted per-dimension (matched, unmatched pred, unmatched target) rows
    of flat pixel indices."""
    def fl(t):
        t = t.cpu()
        return [int(x) for x in np.ravel_multi_index(tuple(t.numpy().T), shape)] if t.shape[0] else []
    out = []
    for k in range(len(result.pred_matched_birth)):
        m = sorted(zip(fl(result.pred_matched_birth[k]), fl(result.pred_matched_death[k]),
                       fl(result.target_matched_birth[k]), fl(result.target_matched_death[k])))
        u = sorted(zip(fl(result.pred_unmatched_birth[k]), fl(result.pred_unmatched_death[k])))
        v = sorted(zip(fl(result.target_unmatched_birth[k]), fl(result.target_unmatched_death[k])))
        out.append((m, u, v))
    return out


def ref_sets(res):
    return [(sorted(m), sorted(u), sorted(v)) for m, u, v in res]


# ---- inputs -------------------------------------------------------------------------------------

def smooth(x, passes=2):
    """A few box-blur passes (cheap stand-in for a Gaussian): blob-like fields."""
    D = x.dim()
    for _ in range(passes):
        for d in range(D):
            x = (x + x.roll(1, d) + x.roll(-1, d)) / 3
    return x


def probs(shape, gen, kind, dtype=torch.float64):
    """Probability maps: continuous noise, smooth blobs, tie-heavy (few levels), binary."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == "continuous":
        x = u
    elif kind == "smooth":
        x = smooth(u)
        x = (x - x.min()) / (x.max() - x.min())
    elif kind == "ties":
        x = torch.floor(u * 4) / 3
    elif kind == "binary":
        x = (smooth(u, 1) > 0.5).to(torch.float64)
    else:
        raise ValueError(kind)
    return x.to(dtype)


def pair(shape, gen, pred_kind, target_kind, dtype=torch.float64):
    return probs(shape, gen, pred_kind, dtype), probs(shape, gen, target_kind, dtype)


SHAPES_2D = [(1, 6), (7, 1), (2, 2), (9, 11), (24, 17)]
SHAPES_3D = [(1, 5, 6), (4, 1, 3), (2, 2, 2), (6, 5, 7), (10, 9, 8)]
KINDS = [("continuous", "binary"), ("ties", "ties"), ("continuous", "continuous"), ("binary", "binary"),
         ("smooth", "binary")]


# ---- barcodes -----------------------------------------------------------------------------------

def our_bars(img, filtration="sublevel", include_essential=False):
    bc = lossforge.persistence_barcode(torch.as_tensor(img), filtration, include_essential=include_essential)
    return [sorted(zip(b.tolist(), d.tolist())) for b, d in zip(bc.births, bc.deaths)], bc


@pytest.mark.parametrize("shape", [(9, 11), (30, 20), (6, 5, 7), (12, 10, 9), (1, 8)])
@pytest.mark.parametrize("kind", ["continuous", "ties", "binary", "smooth"])
def test_barcode_matches_gudhi(shape, kind, gen):
    gudhi = importlib.import_module("gudhi")  # an oracle: missing -> the test fails
    f = probs(shape, gen, kind).numpy()
    cc = gudhi.CubicalComplex(vertices=f)
    cc.compute_persistence(homology_coeff_field=2, min_persistence=-1)
    ours, bc = our_bars(f, include_essential=True)
    for k in range(f.ndim):
        expected = sorted((b, d) for b, d in cc.persistence_intervals_in_dimension(k) if b < d)
        assert ours[k] == expected, f"dimension {k}"
        # the values are the image's values at the reported critical pixels
        coords = bc.birth_coords[k]
        torch.testing.assert_close(bc.births[k], torch.as_tensor(f)[tuple(coords.T)], rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(13, 10), (7, 6, 5)])
@pytest.mark.parametrize("kind", ["continuous", "ties", "binary"])
def test_barcode_matches_cripser(shape, kind, gen):
    cripser = importlib.import_module("cripser")
    f = probs(shape, gen, kind).numpy()
    ph = cripser.compute_ph(f, filtration="V")
    ours, _ = our_bars(f)
    for k in range(f.ndim):
        rows = ph[ph[:, 0] == k]
        expected = sorted((float(b), float(d)) for b, d in rows[:, 1:3] if d < np.finfo(np.float64).max and b < d)
        assert ours[k] == expected, f"dimension {k}"


@pytest.mark.parametrize("shape", [(17, 23), (9, 8, 7)])
@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_barcode_coordinates_match_reference_build(shape, kind, gen):
    f = probs(shape, gen, kind).numpy()
    r = reference_build().compute_barcode(f)
    bc = lossforge.persistence_barcode(torch.as_tensor(f), "sublevel")
    for k in range(f.ndim):
        expected = sorted(zip(flat_rows(r.birth_coordinates[k], shape), flat_rows(r.death_coordinates[k], shape)))
        got = sorted(zip(flat_rows(bc.birth_coords[k].numpy(), shape), flat_rows(bc.death_coords[k].numpy(), shape)))
        assert got == expected


def test_barcode_superlevel_and_essential(gen):
    p = probs((12, 9), gen, "continuous")
    sup = lossforge.persistence_barcode(p, "superlevel", include_essential=True)
    sub = lossforge.persistence_barcode(1 - p, "sublevel", include_essential=True)
    for k in range(2):
        assert torch.equal(sup.birth_coords[k], sub.birth_coords[k])
        assert bool((sup.births[k] >= sup.deaths[k]).all())  # superlevel bars run downwards
    assert sup.deaths[0][-1] == float("-inf") and sub.deaths[0][-1] == float("inf")
    assert sup.births[0][-1] == p.max()
    assert sup.death_coords[0][-1].tolist() == [-1, -1]
    assert len(lossforge.persistence_barcode(p).births[0]) == len(sup.births[0]) - 1


def test_barcode_batch_matches_single(gen):
    x = probs((2, 3, 8, 9), gen, "ties")
    batch = lossforge.persistence_barcode(x)
    assert len(batch) == 6
    for i, bc in enumerate(batch):
        one = lossforge.persistence_barcode(x.reshape(6, 8, 9)[i])
        for k in range(2):
            assert torch.equal(bc.births[k], one.births[k]) and torch.equal(bc.death_coords[k], one.death_coords[k])


def test_persistence_pairs_dtypes_agree(gen):
    x = probs((5, 6, 7), gen, "ties")
    a = ops.persistence_pairs(x[None].contiguous(), True)
    b = ops.persistence_pairs(x[None].float().contiguous(), True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- matching against the reference build -------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES_2D + SHAPES_3D)
@pytest.mark.parametrize("kinds", KINDS)
def test_matching_matches_reference_build(shape, kinds, gen):
    p, t = pair(shape, gen, *kinds)
    res = lossforge.betti_matching(p, t)
    expected = build_matching((1 - p).numpy(), (1 - t).numpy())
    assert as_sets(res, shape) == expected


@pytest.mark.parametrize("shape", [(64, 64), (32, 28, 24)])
@pytest.mark.parametrize("kinds", [("smooth", "binary"), ("continuous", "continuous")])
def test_matching_matches_reference_build_larger(shape, kinds, gen):
    p, t = pair(shape, gen, *kinds, dtype=torch.float32)
    res = lossforge.betti_matching(p, t)
    # the reference receives f = 1 - p computed in float32, as topolosses passes it
    expected = build_matching((1 - p).double().numpy(), (1 - t).double().numpy())
    assert as_sets(res, shape) == expected


@pytest.mark.parametrize("filtration", ["superlevel", "sublevel"])
def test_batch_matches_reference_build(filtration, gen):
    # 12 instances: the per-instance task path; 1 instance: the per-phase path
    for B, C in ((4, 3), (1, 1)):
        p, t = pair((B, C, 15, 14), gen, "continuous", "binary")
        res = lossforge.betti_matching(p, t, filtration=filtration)
        assert len(res) == B * C
        for i, r in enumerate(res):
            pi, ti = p.reshape(-1, 15, 14)[i], t.reshape(-1, 15, 14)[i]
            f, g = ((1 - pi, 1 - ti) if filtration == "superlevel" else (pi, ti))
            assert as_sets(r, (15, 14)) == build_matching(f.numpy(), g.numpy())


def ordered_rows(result_or_build, shape, build):
    """Per dimension the (matched, unmatched pred, unmatched target) rows in the order given."""
    out = []
    for k in range(len(shape)):
        if build:
            r = result_or_build
            m = list(zip(*(flat_rows(a[k], shape) for a in (
                r.input1_matched_birth_coordinates, r.input1_matched_death_coordinates,
                r.input2_matched_birth_coordinates, r.input2_matched_death_coordinates))))
            u = list(zip(flat_rows(r.input1_unmatched_birth_coordinates[k], shape), flat_rows(r.input1_unmatched_death_coordinates[k], shape)))
            v = list(zip(flat_rows(r.input2_unmatched_birth_coordinates[k], shape), flat_rows(r.input2_unmatched_death_coordinates[k], shape)))
        else:
            r = result_or_build
            fl = lambda t: flat_rows(t.numpy(), shape)
            m = list(zip(fl(r.pred_matched_birth[k]), fl(r.pred_matched_death[k]), fl(r.target_matched_birth[k]), fl(r.target_matched_death[k])))
            u = list(zip(fl(r.pred_unmatched_birth[k]), fl(r.pred_unmatched_death[k])))
            v = list(zip(fl(r.target_unmatched_birth[k]), fl(r.target_unmatched_death[k])))
        out.append((m, u, v))
    return out


@pytest.mark.parametrize("shape", [(24, 17), (7, 6, 8), (10, 9, 8), (5, 1, 6)])
@pytest.mark.parametrize("kinds", [("continuous", "binary"), ("ties", "ties"), ("continuous", "continuous"),
                                   ("smooth", "binary")])
def test_pairs_come_in_the_reference_order(shape, kinds, gen):
    """Not only the same pairs as the Betti-Matching-3D build but in its order, 3D dimension 1 included
    (there it was the same set in another order: matched pairs now come by the comparison image's
    death face, unmatched bars by their own death face, in filtration order); barcodes too."""
    p, t = pair(shape, gen, *kinds)
    f, g = (1 - p).numpy(), (1 - t).numpy()
    build = reference_build()
    r, res = build.compute_matching(f, g), lossforge.betti_matching(p, t)
    assert ordered_rows(res, shape, False) == ordered_rows(r, shape, True)
    assert (res.num_matched, res.num_unmatched_pred, res.num_unmatched_target) == \
        (list(r.num_matched), list(r.num_unmatched_input1), list(r.num_unmatched_input2))
    bc, rb = lossforge.persistence_barcode(p), build.compute_barcode(f)
    for k in range(len(shape)):
        assert list(zip(flat_rows(bc.birth_coords[k].numpy(), shape), flat_rows(bc.death_coords[k].numpy(), shape))) == \
            list(zip(flat_rows(rb.birth_coordinates[k], shape), flat_rows(rb.death_coordinates[k], shape)))


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 4)])
@pytest.mark.parametrize("kinds", [("continuous", "binary"), ("ties", "ties"), ("continuous", "continuous")])
@pytest.mark.parametrize("strict", [False, True])
def test_matching_matches_pure_reference(shape, kinds, strict, gen):
    p, t = pair(shape, gen, *kinds)
    res = lossforge.betti_matching(p, t, strict=strict)
    assert as_sets(res, shape) == ref_sets(ref.matching((1 - p).numpy(), (1 - t).numpy(), strict))


def test_threads_do_not_change_the_result(gen):
    p, t = pair((3, 2, 9, 8, 7), gen, "smooth", "binary")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.betti_matching_pairs((1 - p).reshape(6, 9, 8, 7).contiguous(), (1 - t).reshape(6, 9, 8, 7).contiguous(), False, True)
        torch.set_num_threads(max(2, old))
        many = ops.betti_matching_pairs((1 - p).reshape(6, 9, 8, 7).contiguous(), (1 - t).reshape(6, 9, 8, 7).contiguous(), False, True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


# ---- invariants ---------------------------------------------------------------------------------

def total_unmatched(res):
    return sum(res.num_unmatched_pred) + sum(res.num_unmatched_target)


@pytest.mark.parametrize("shape", [(20, 18), (7, 8, 6)])
@pytest.mark.parametrize("kind", ["continuous", "ties", "binary"])
def test_identical_inputs_match_everything(shape, kind, gen, device):
    p = probs(shape, gen, kind).to(device)
    res = lossforge.betti_matching(p, p)
    assert total_unmatched(res) == 0
    bc = lossforge.persistence_barcode(p)
    assert res.num_matched == [len(b) for b in bc.births]
    for k in range(len(shape)):
        assert torch.equal(res.pred_matched_birth[k], res.target_matched_birth[k])
    loss = lossforge.betti_matching_loss(p[None, None], p[None, None])
    assert loss.item() == 0


@pytest.mark.parametrize("shape", [(25, 22), (9, 8, 7)])
def test_binary_inputs_give_loss_equal_to_unmatched_count(shape, gen, device):
    p, t = pair(shape, gen, "binary", "binary")
    p, t = p.to(device), t.to(device)
    res = lossforge.betti_matching(p, t)
    loss = lossforge.betti_matching_loss(p[None, None], t[None, None], reduction="sum")
    assert loss.item() == total_unmatched(res)
    err = lossforge.betti_matching_error(p[None, None], t[None, None])
    assert err.item() == total_unmatched(res)


@pytest.mark.parametrize("shape", [(23, 19), (8, 9, 7)])
@pytest.mark.parametrize("kinds", [("continuous", "binary"), ("ties", "continuous")])
def test_matched_plus_unmatched_is_the_barcode(shape, kinds, gen):
    p, t = pair(shape, gen, *kinds)
    res = lossforge.betti_matching(p, t)
    bp, bt = lossforge.persistence_barcode(p), lossforge.persistence_barcode(t)
    for k in range(len(shape)):
        assert res.num_matched[k] + res.num_unmatched_pred[k] == len(bp.births[k])
        assert res.num_matched[k] + res.num_unmatched_target[k] == len(bt.births[k])
        # and they are the same bars
        pred_bars = sorted(map(tuple, torch.cat([
            torch.cat([res.pred_matched_birth[k], res.pred_matched_death[k]], 1),
            torch.cat([res.pred_unmatched_birth[k], res.pred_unmatched_death[k]], 1)]).tolist()))
        assert pred_bars == sorted(map(tuple, torch.cat([bp.birth_coords[k], bp.death_coords[k]], 1).tolist()))


@pytest.mark.parametrize("shape", [(21, 20), (8, 7, 9)])
@pytest.mark.parametrize("strict", [False, True])
def test_swapping_inputs_swaps_roles(shape, strict, gen):
    p, t = pair(shape, gen, "continuous", "smooth")
    a = as_sets(lossforge.betti_matching(p, t, strict=strict), shape)
    b = as_sets(lossforge.betti_matching(t, p, strict=strict), shape)
    for (m1, u1, v1), (m2, u2, v2) in zip(a, b):
        assert m1 == sorted((c, d, a_, b_) for a_, b_, c, d in m2)
        assert u1 == v2 and v1 == u2


@pytest.mark.parametrize("shape", [(30, 30), (10, 10, 10)])
def test_strict_matches_only_overlapping_bars(shape, gen):
    p, t = pair(shape, gen, "continuous", "continuous")
    f, g = (1 - p).reshape(-1), (1 - t).reshape(-1)
    loose = lossforge.betti_matching(p, t)
    res = lossforge.betti_matching(p, t, strict=True)
    dropped = 0
    for k in range(len(shape)):
        idx = lambda c: torch.as_tensor(np.ravel_multi_index(tuple(c.numpy().T), shape) if c.shape[0] else [], dtype=torch.long)
        fb, fd = f[idx(res.pred_matched_birth[k])], f[idx(res.pred_matched_death[k])]
        gb, gd = g[idx(res.target_matched_birth[k])], g[idx(res.target_matched_death[k])]
        assert bool((torch.maximum(fb, gb) < torch.minimum(fd, gd)).all()), f"dimension {k}"
        dropped += loose.num_matched[k] - res.num_matched[k]
        # strict matches are a subset of the loose ones
        assert set(as_sets(res, shape)[k][0]) <= set(as_sets(loose, shape)[k][0])
    assert dropped > 0  # continuous targets: some pairs match only through empty image bars


@pytest.mark.parametrize("shape", [(30, 26), (9, 10, 8)])
def test_binary_targets_match_only_overlapping_bars(shape, gen):
    """With a binary target every target bar is [0, 1) (in f = 1 - p), so even the reference's loose
    matching never pairs non-overlapping bars; strict mode still drops the pairs whose image bar is
    empty (a prediction component born inside the target's foreground, where c = 0)."""
    p, t = pair(shape, gen, "continuous", "binary")
    f, g = (1 - p).reshape(-1), (1 - t).reshape(-1)
    res = lossforge.betti_matching(p, t)
    for k in range(len(shape)):
        idx = lambda c: torch.as_tensor(np.ravel_multi_index(tuple(c.numpy().T), shape) if c.shape[0] else [], dtype=torch.long)
        fb, fd = f[idx(res.pred_matched_birth[k])], f[idx(res.pred_matched_death[k])]
        gb, gd = g[idx(res.target_matched_birth[k])], g[idx(res.target_matched_death[k])]
        assert bool((gb == 0).all() and (gd == 1).all())
        assert bool((torch.maximum(fb, gb) < torch.minimum(fd, gd)).all())


# ---- loss ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 7), (4, 3, 5)])
@pytest.mark.parametrize("filtration", ["superlevel", "sublevel", "bothlevel"])
def test_loss_matches_pure_reference(shape, filtration, gen, device):
    p, t = pair((2, 1) + shape, gen, "continuous", "binary")
    w = [1.0, 0.5, 2.0][: len(shape)]
    ours = lossforge.betti_matching_loss(p.to(device), t.to(device), filtration=filtration, dims=w, reduction="none")
    expected = ref.betti_matching_loss(p, t, filtration, w).reshape(2, 1)
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(33, 31), (11, 10, 9)])
def test_loss_matches_reference_build_coordinates(shape, gen):
    """The topolosses formula (values of 1 - p gathered at the build's coordinates)."""
    p, t = pair(shape, gen, "smooth", "binary")
    f, g = 1 - p, 1 - t
    r = reference_build().compute_matching(f.numpy(), g.numpy())
    expected = 0.0
    for k in range(len(shape)):
        def val(img, coords):
            c = np.asarray(coords).reshape(-1, len(shape))
            return img.numpy()[tuple(c.T)] if len(c) else np.zeros(0)
        expected += 2 * (((val(f, r.input1_matched_birth_coordinates[k]) - val(g, r.input2_matched_birth_coordinates[k])) ** 2).sum()
                         + ((val(f, r.input1_matched_death_coordinates[k]) - val(g, r.input2_matched_death_coordinates[k])) ** 2).sum())
        expected += ((val(f, r.input1_unmatched_birth_coordinates[k]) - val(f, r.input1_unmatched_death_coordinates[k])) ** 2).sum()
        expected += ((val(g, r.input2_unmatched_birth_coordinates[k]) - val(g, r.input2_unmatched_death_coordinates[k])) ** 2).sum()
    ours = lossforge.betti_matching_loss(p[None, None], t[None, None])
    assert abs(ours.item() - expected) <= 1e-9 * max(1.0, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(3, 2, 40, 37), (2, 1, 12, 11, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(shape, dtype, gen):
    """CUDA inputs: the same pairs (one transfer each way), the loss and its gradient on the device."""
    p, t = pair(shape, gen, "smooth", "binary", dtype)
    for kw in ({}, {"filtration": "bothlevel", "relative": True, "dims": [0.5, 1.0, 2.0][: len(shape) - 2]}):
        xc = p.clone().requires_grad_()
        xg = p.cuda().requires_grad_()
        lc = lossforge.betti_matching_loss(xc, t, **kw)
        lg = lossforge.betti_matching_loss(xg, t.cuda(), **kw)
        assert lg.device.type == "cuda"
        torch.testing.assert_close(lg.cpu(), lc)
        lc.backward()
        lg.backward()
        torch.testing.assert_close(xg.grad.cpu(), xc.grad)
    rc = lossforge.betti_matching(p, t)
    rg = lossforge.betti_matching(p.cuda(), t.cuda())
    assert rg[0].pred_matched_birth[0].device.type == "cuda"
    assert [as_sets(a, shape[2:]) for a in rc] == [as_sets(b, shape[2:]) for b in rg]
    torch.testing.assert_close(lossforge.betti_number_error(p.cuda(), t.cuda()).cpu(), lossforge.betti_number_error(p, t))


def distinct_probs(shape, gen, offset=0.5):
    """Well-separated distinct values (a random permutation of a grid): finite differences of size
    1e-6 never change the order of the cells (give pred and target different offsets, so that no
    value of one equals a value of the other)."""
    n = int(np.prod(shape))
    v = (torch.randperm(n, generator=gen).to(torch.float64) + offset) / n
    return v.reshape(shape)


@pytest.mark.parametrize("shape", [(2, 1, 6, 5), (1, 2, 3, 4, 3)])
@pytest.mark.parametrize("filtration", ["superlevel", "bothlevel"])
@pytest.mark.parametrize("target_kind", ["binary", "distinct"])
def test_loss_gradcheck(shape, filtration, target_kind, gen, device):
    p = distinct_probs(shape, gen).to(device).requires_grad_()
    t = probs(shape, gen, "binary") if target_kind == "binary" else distinct_probs(shape, gen, offset=0.25)
    t = t.to(device)
    assert torch.autograd.gradcheck(
        lambda x: lossforge.betti_matching_loss(x, t, filtration=filtration, dims=[1.0, 0.7, 1.3][: len(shape) - 2]),
        (p,), eps=1e-6, atol=1e-7, fast_mode=True)


def test_loss_gradient_matches_autograd_of_reference(gen, device):
    p = distinct_probs((1, 1, 7, 6), gen).requires_grad_()
    t = probs((1, 1, 7, 6), gen, "binary")
    (expected,) = torch.autograd.grad(ref.betti_matching_loss(p, t).sum(), p)
    pd = p.detach().to(device).requires_grad_()
    (ours,) = torch.autograd.grad(lossforge.betti_matching_loss(pd, t.to(device), reduction="sum"), pd)
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-12, atol=1e-12)


def test_loss_float32_and_half_inputs(gen, device):
    p, t = pair((2, 2, 20, 21), gen, "smooth", "binary")
    ref64 = lossforge.betti_matching_loss(p.float().double().to(device), t.to(device))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = p.to(dtype).to(device).requires_grad_()
        loss = lossforge.betti_matching_loss(x, t.to(device))
        assert loss.dtype == dtype
        loss.backward()
        assert x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all())
    x32 = lossforge.betti_matching_loss(p.float().to(device), t.to(device))
    torch.testing.assert_close(x32.double(), ref64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_reduction_and_target_unmatched(reduction, gen, device):
    p, t = pair((3, 2, 12, 13), gen, "continuous", "smooth")
    p, t = p.to(device), t.to(device)
    per = lossforge.betti_matching_loss(p, t, include_background=True, reduction="none")
    assert per.shape == (3, 2)
    out = lossforge.betti_matching_loss(p, t, include_background=True, reduction=reduction)
    expected = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    torch.testing.assert_close(out, expected)
    # dropping the target's unmatched bars removes exactly their (constant) terms
    without = lossforge.betti_matching_loss(p, t, include_background=True, reduction="none",
                                            include_target_unmatched=False)
    g = 1 - t
    for i in range(6):
        res = lossforge.betti_matching(p.reshape(6, 12, 13)[i], t.reshape(6, 12, 13)[i])
        gi = g.reshape(6, 12, 13)[i]
        const = sum(((gi[tuple(b.T)] - gi[tuple(d.T)]) ** 2).sum() for b, d in zip(res.target_unmatched_birth, res.target_unmatched_death))
        torch.testing.assert_close(per.reshape(-1)[i] - without.reshape(-1)[i], const, rtol=1e-9, atol=1e-12)


def test_dims_weights_are_linear(gen, device):
    p, t = pair((2, 1, 6, 7, 5), gen, "continuous", "binary")
    p, t = p.to(device), t.to(device)
    parts = [lossforge.betti_matching_loss(p, t, dims=[float(i == k) for i in range(3)], reduction="none") for k in range(3)]
    w = [0.3, 2.0, 1.5]
    torch.testing.assert_close(lossforge.betti_matching_loss(p, t, dims=w, reduction="none"),
                               sum(wk * pk for wk, pk in zip(w, parts)))
    torch.testing.assert_close(lossforge.betti_matching_loss(p, t, reduction="none"), sum(parts))


def test_bothlevel_is_the_mean_of_both_filtrations(gen, device):
    """topolosses' "bothlevels" averages the two filtrations (it was the sum, twice topolosses' value)."""
    p, t = pair((2, 2, 11, 12), gen, "ties", "continuous")
    p, t = p.to(device), t.to(device)
    both = lossforge.betti_matching_loss(p, t, filtration="bothlevel", include_background=True, reduction="none")
    torch.testing.assert_close(lossforge.betti_matching_loss(p, t, filtration="bothlevels", include_background=True,
                                                         reduction="none"), both)
    sup = lossforge.betti_matching_loss(p, t, filtration="superlevel", include_background=True, reduction="none")
    sub = lossforge.betti_matching_loss(p, t, filtration="sublevel", include_background=True, reduction="none")
    torch.testing.assert_close(both, (sup + sub) / 2)
    res = lossforge.betti_matching(p[0, 0], t[0, 0], filtration="bothlevel")
    assert res[0].filtration == "superlevel" and res[1].filtration == "sublevel"
    assert as_sets(res[1], (11, 12)) == as_sets(lossforge.betti_matching(p[0, 0], t[0, 0], filtration="sublevel"), (11, 12))


@pytest.mark.parametrize("filtration", ["superlevel", "sublevel"])
def test_relative_pads_a_frame(filtration, gen, device):
    p, t = pair((1, 1, 10, 9), gen, "continuous", "binary")
    p, t = p.to(device), t.to(device)
    rel = lossforge.betti_matching(p[0, 0], t[0, 0], filtration=filtration, relative=True)
    v = (lambda x: x.max()) if filtration == "superlevel" else (lambda x: x.min())
    pp = torch.nn.functional.pad(p[0, 0], (1, 1, 1, 1), value=float(v(p)))
    tp = torch.nn.functional.pad(t[0, 0], (1, 1, 1, 1), value=float(v(t)))
    assert as_sets(rel, (12, 11)) == as_sets(lossforge.betti_matching(pp, tp, filtration=filtration), (12, 11))
    loss = lossforge.betti_matching_loss(p, t, filtration=filtration, relative=True)
    torch.testing.assert_close(loss, lossforge.betti_matching_loss(pp[None, None], tp[None, None], filtration=filtration))
    x = p.clone().requires_grad_()
    lossforge.betti_matching_loss(x, t, filtration=filtration, relative=True).backward()
    assert x.grad.shape == p.shape and bool(torch.isfinite(x.grad).all())


# ---- the ops: opcheck, the loss kernel against torch ----------------------------------------------

def rows_for(p, t, include_target_unmatched=True):
    return ops.betti_matching_pairs((1 - p).contiguous(), (1 - t).contiguous(), False, include_target_unmatched)


def test_opcheck_ops(gen, device):
    p, t = pair((3, 7, 6), gen, "continuous", "binary")
    torch.library.opcheck(ops.betti_matching_pairs.default, ((1 - p).contiguous(), (1 - t).contiguous(), False, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.persistence_pairs.default, (p.contiguous(), True), test_utils=("test_schema", "test_faketensor"))
    rows, _ = rows_for(p, t)
    x = p.reshape(3, -1).to(device).requires_grad_()
    y = t.reshape(3, -1).to(device)
    w = torch.rand(2, 3, generator=gen, dtype=torch.float64).to(device)
    torch.library.opcheck(ops.betti_matching_loss_rows.default, (x, y, rows.to(device), w))
    g = torch.rand(3, generator=gen, dtype=torch.float64).to(device)
    torch.library.opcheck(ops.betti_matching_loss_rows_backward.default, (g, x.detach(), y, rows.to(device), w))


def loss_rows_torch(pred, target, rows, w):
    """The loss over rows in plain torch (the same formula as the kernel, autograd for the backward)."""
    D = w.shape[0]
    seg = rows[:, 0]
    n, kind, k = seg // (3 * D), seg % 3, (seg % (3 * D)) // 3
    V = pred.shape[1]
    p, t = pred.reshape(-1), target.reshape(-1)
    at = lambda x, c: x[n * V + rows[:, c].clamp(min=0)]
    m = 2 * ((at(p, 1) - at(t, 3)) ** 2 + (at(p, 2) - at(t, 4)) ** 2)
    u = (at(p, 1) - at(p, 2)) ** 2
    v = (at(t, 3) - at(t, 4)) ** 2
    term = torch.where(kind == 0, m, torch.where(kind == 1, u, v)) * w[k, kind]
    return torch.zeros(pred.shape[0], dtype=pred.dtype, device=pred.device).index_add(0, n, term)


@pytest.mark.parametrize("shape", [(4, 13, 12), (3, 5, 6, 4)])
def test_loss_rows_kernel_matches_torch(shape, gen, device):
    p, t = pair(shape, gen, "continuous", "ties")
    rows, _ = rows_for(p, t)
    D = len(shape) - 1
    w = (torch.rand(D, 3, generator=gen, dtype=torch.float64) + 0.5)
    x = p.reshape(shape[0], -1).to(device).requires_grad_()
    y = t.reshape(shape[0], -1).to(device)
    ours = ops.betti_matching_loss_rows(x, y, rows.to(device), w.to(device))
    x2 = x.detach().clone().requires_grad_()
    expected = loss_rows_torch(x2, y, rows.to(device), w.to(device))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    g = torch.rand(shape[0], generator=gen, dtype=torch.float64).to(device)
    (gx,) = torch.autograd.grad(ours, x, g)
    (gx2,) = torch.autograd.grad(expected, x2, g)
    torch.testing.assert_close(gx, gx2, rtol=1e-12, atol=1e-12)


# ---- metrics ------------------------------------------------------------------------------------

def betti_numbers_oracle(mask):
    """Betti numbers of a binary mask's V-construction complex (4/6-connected foreground) from
    scipy.ndimage component labelling and the Euler characteristic."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    D = mask.ndim
    b0 = ndimage.label(mask, structure=ndimage.generate_binary_structure(D, 1))[1]
    bg = np.pad(~mask, 1, constant_values=True)
    holes = ndimage.label(bg, structure=ndimage.generate_binary_structure(D, D))[1] - 1
    if D == 2:
        return [b0, holes]
    # Euler characteristic of the cubical complex: cells whose vertices are all foreground
    chi = 0
    for axes_len in range(4):
        for axes in __import__("itertools").combinations(range(3), axes_len):
            sl = mask
            for a in axes:
                n = sl.shape[a]
                sl = np.logical_and(sl.take(range(n - 1), a), sl.take(range(1, n), a))
            chi += (-1) ** axes_len * int(sl.sum())
    return [b0, b0 + holes - chi, holes]


@pytest.mark.parametrize("shape", [(2, 1, 24, 20), (1, 2, 9, 10, 8)])
def test_betti_number_error_matches_scipy(shape, gen, device):
    p, t = pair(shape, gen, "smooth", "binary")
    err = lossforge.betti_number_error(p.to(device), t.to(device), threshold=0.5)
    assert err.shape == shape[:2]
    for i in range(shape[0] * shape[1]):
        bp = betti_numbers_oracle(p.reshape((-1,) + shape[2:])[i].numpy() >= 0.5)
        bt = betti_numbers_oracle(t.reshape((-1,) + shape[2:])[i].numpy() >= 0.5)
        assert err.reshape(-1)[i].item() == sum(abs(a - b) for a, b in zip(bp, bt))


def test_betti_matching_error_is_loss_of_binarised_inputs(gen, device):
    p, t = pair((2, 2, 17, 16), gen, "smooth", "smooth")
    p, t = p.to(device), t.to(device)
    for filtration in ("superlevel", "sublevel"):
        err = lossforge.betti_matching_error(p, t, threshold=0.4, filtration=filtration)
        if filtration == "superlevel":
            pb, tb = (p >= 0.4).double(), (t >= 0.4).double()
        else:
            pb, tb = (p <= 0.4).double(), (t <= 0.4).double()
        torch.testing.assert_close(err, lossforge.betti_matching_loss(pb, tb, include_background=True,
                                                                     reduction="none").to(err.dtype))
    both = lossforge.betti_matching_error(p, t, threshold=0.4, filtration="bothlevel", reduction="sum")
    assert both.item() == (lossforge.betti_matching_error(p, t, 0.4, "superlevel", reduction="sum")
                           + lossforge.betti_matching_error(p, t, 0.4, "sublevel", reduction="sum")).item()


# ---- topolosses' options ------------------------------------------------------------------------

# (lossforge keyword arguments, the same loss in topolosses' BettiMatchingLoss arguments)
TOPOLOSSES_OPTIONS = [
    ({}, {}),
    ({"include_background": True}, {"include_background": True}),
    ({"activation": "sigmoid"}, {"sigmoid": True}),
    ({"activation": "softmax"}, {"softmax": True}),
    ({"activation": "softmax", "include_background": True}, {"softmax": True, "include_background": True}),
    ({"topology_weights": (0.3, 2.5)}, {"topology_weights": (0.3, 2.5)}),
    ({"push_unmatched_to_1_0": True}, {"push_unmatched_to_1_0": True}),
    ({"barcode_length_threshold": 0.25}, {"barcode_length_threshold": 0.25}),
    ({"sphere": True}, {"sphere": True}),
    ({"sphere": True, "filtration": "sublevel"}, {"sphere": True, "filtration_type": "sublevel"}),
    ({"filtration": "sublevel"}, {"filtration_type": "sublevel"}),
    ({"filtration": "bothlevels"}, {"filtration_type": "bothlevels"}),
    ({"filtration": "bothlevel", "push_unmatched_to_1_0": True, "sphere": True, "topology_weights": (2.0, 0.5),
      "barcode_length_threshold": 0.1},
     {"filtration_type": "bothlevels", "push_unmatched_to_1_0": True, "sphere": True, "topology_weights": (2.0, 0.5),
      "barcode_length_threshold": 0.1}),
    ({"filtration": "sublevel", "push_unmatched_to_1_0": True, "activation": "sigmoid"},
     {"filtration_type": "sublevel", "push_unmatched_to_1_0": True, "sigmoid": True}),
]


def topolosses_value_and_grad(x, t, use_base_loss, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on alpha and on single-channel inputs
        loss_fn = topolosses_betti_loss()(use_base_loss=use_base_loss, **kw)
        x = x.detach().clone().requires_grad_()
        value = loss_fn(x, t)
    value.backward()
    return value.detach(), x.grad


def option_inputs(shape, gen, logits):
    """float32 inputs (topolosses computes in float32: the same values reach both cores)."""
    if logits:
        x = 3 * torch.randn(shape, generator=gen)
    else:  # smoothed per image (a smoothing over the channels of a 3-channel tensor makes them equal)
        x = torch.stack([probs(shape[2:], gen, "smooth", torch.float32) for _ in range(shape[0] * shape[1])])
    t = torch.stack([probs(shape[2:], gen, "smooth", torch.float32) > 0.5 for _ in range(shape[0] * shape[1])])
    return x.reshape(shape), t.reshape(shape).float()


# topolosses' 3D sphere pads only H and W of a volume (lossforge pads all three axes): 2D only
OPTION_CASES = [pytest.param(shape, ours, theirs, id=f"{len(shape) - 2}d-{sorted(ours)}")
                for shape in [(2, 3, 13, 12), (1, 2, 7, 6, 5)] for ours, theirs in TOPOLOSSES_OPTIONS
                if len(shape) == 4 or not ours.get("sphere")]


@pytest.mark.parametrize("shape, ours, theirs", OPTION_CASES)
def test_loss_options_match_topolosses(shape, ours, theirs, gen, device):
    """Every option of topolosses' BettiMatchingLoss (use_base_loss=False): the same value and the same
    gradient (topolosses: float32 throughout)."""
    x, t = option_inputs(shape, gen, "activation" in ours)
    want, want_grad = topolosses_value_and_grad(x, t, False, **theirs)
    xd = x.to(device).requires_grad_()
    got = lossforge.betti_matching_loss(xd, t.to(device), **ours)
    got.backward()
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(xd.grad.cpu(), want_grad, rtol=2e-4, atol=1e-5)
    module = lnn.BettiMatchingLoss(**ours)
    torch.testing.assert_close(module(x.to(device), t.to(device)).cpu(), got.detach().cpu())
    if "filtration" in theirs:  # topolosses' FiltrationType members are accepted too
        member = sys.modules["_topolosses_ref.utils"].FiltrationType(theirs["filtration_type"])
        kw = dict(ours, filtration=member)
        torch.testing.assert_close(lossforge.betti_matching_loss(x.to(device), t.to(device), **kw), got.detach())


def test_options_change_the_loss(gen):
    """The options matter on these inputs (so the comparison above can fail). (sphere alone adds a frame
    that enters the superlevel filtration last, with the pixels of probability 0: it changes only
    ties at 0; with the sublevel filtration it enters first.)"""
    x, t = option_inputs((2, 3, 13, 12), gen, False)
    base = lossforge.betti_matching_loss(x, t).item()
    for kw in TOPOLOSSES_OPTIONS[1:]:
        if "activation" in kw[0] or kw[0] == {"sphere": True}:
            continue
        assert lossforge.betti_matching_loss(x, t, **kw[0]).item() != pytest.approx(base, rel=1e-3), kw[0]


def test_sphere_pads_every_side_with_background(gen, device):
    """sphere=True is the loss of the images padded with a frame of probability 0 (in 3D on all three
    axes); push_unmatched_to_1_0 and barcode_length_threshold against the formula on the matching."""
    x, t = option_inputs((1, 1, 5, 6, 4), gen, False)
    x, t = x.double().to(device), t.double().to(device)
    pad = lambda a: torch.nn.functional.pad(a, (1, 1, 1, 1, 1, 1), value=0.0)
    torch.testing.assert_close(lossforge.betti_matching_loss(x, t, sphere=True), lossforge.betti_matching_loss(pad(x), pad(t)))
    res = lossforge.betti_matching(x[0, 0], t[0, 0], sphere=True)
    assert as_sets(res, (7, 8, 6)) == as_sets(lossforge.betti_matching(pad(x)[0, 0], pad(t)[0, 0]), (7, 8, 6))
    f, g = 1 - pad(x)[0, 0], 1 - pad(t)[0, 0]
    at = lambda img, c: img[tuple(c.T)]
    want = 0.0
    for k in range(3):
        want += 2 * (((at(f, res.pred_matched_birth[k]) - at(g, res.target_matched_birth[k])) ** 2).sum()
                     + ((at(f, res.pred_matched_death[k]) - at(g, res.target_matched_death[k])) ** 2).sum())
        b, d = at(f, res.pred_unmatched_birth[k]), at(f, res.pred_unmatched_death[k])
        want += (2 * ((b - 1) ** 2 + d ** 2) * ((b - d).abs() > 0.2)).sum()
        want += (2 * ((at(g, res.target_unmatched_birth[k]) - 1) ** 2 + at(g, res.target_unmatched_death[k]) ** 2)).sum()
    got = lossforge.betti_matching_loss(x, t, sphere=True, push_unmatched_to_1_0=True, barcode_length_threshold=0.2)
    torch.testing.assert_close(got, want)


DICE_CASES = [pytest.param(shape, kw, theirs, id=f"{shape}-{sorted(kw)}")
              for shape in [(2, 3, 12, 11), (3, 1, 9, 10), (1, 2, 6, 5, 4)]
              for kw, theirs in [({}, {}), ({"activation": "softmax", "alpha": 0.3}, {"softmax": True, "alpha": 0.3}),
                                 ({"activation": "sigmoid", "filtration": "bothlevels"},
                                  {"sigmoid": True, "filtration_type": "bothlevels"})]
              if shape[1] > 1 or kw.get("activation") != "softmax"]  # softmax needs several channels


@pytest.mark.parametrize("shape, kw, theirs", DICE_CASES)
def test_dice_betti_defaults_match_topolosses(shape, kw, theirs, gen, device):
    """lossforge.nn.DiceBettiMatchingLoss() is topolosses' BettiMatchingLoss() (Dice over every channel +
    0.5 Betti matching without the background channel): same call, same value, same gradient."""
    x, t = option_inputs(shape, gen, "activation" in kw)
    want, want_grad = topolosses_value_and_grad(x, t, True, **theirs)
    xd = x.to(device).requires_grad_()
    got = lnn.DiceBettiMatchingLoss(**kw)(xd, t.to(device))
    got.backward()
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(xd.grad.cpu(), want_grad, rtol=2e-4, atol=1e-5)


def test_dice_betti_reduction_none_and_alpha(gen):
    x, t = option_inputs((2, 3, 10, 9), gen, False)
    per = lnn.DiceBettiMatchingLoss(alpha=0.7, reduction="none")(x, t)
    assert per.shape == (2, 3)
    dice = lnn.DiceBettiMatchingLoss(alpha=0.0, reduction="none")(x, t)
    betti = lossforge.betti_matching_loss(x, t, reduction="none")  # channels 1 and 2
    torch.testing.assert_close(per, dice + 0.7 * torch.cat([torch.zeros(2, 1), betti], 1))
    # alpha >= 1 keeps the Dice term (topolosses drops it there)
    torch.testing.assert_close(lnn.DiceBettiMatchingLoss(alpha=1.0)(x, t), dice.mean() + betti.mean())


# ---- torch.compile ------------------------------------------------------------------------------

COMPILE_ENTRY_POINTS = (
    "lossforge.persistence_barcode",
    "lossforge.betti_matching",
    "lossforge.betti_matching_loss",
    "lossforge.betti_matching_error",
    "lossforge.betti_number_error",
    "lossforge.nn.BettiMatchingLoss",
    "lossforge.nn.DiceBettiMatchingLoss",
)

LOSS_COMPILE_CASES = [
    ("function", (2, 3, 9, 8), {}),
    ("function", (1, 2, 5, 4, 6), {"filtration": "bothlevel", "sphere": True, "dims": (1.0, 0.5, 2.0)}),
    ("function", (2, 1, 8, 7), {"push_unmatched_to_1_0": True, "barcode_length_threshold": 0.1, "activation": "sigmoid"}),
    ("BettiMatchingLoss", (2, 3, 9, 8), {"activation": "softmax", "include_background": True, "relative": True}),
    ("DiceBettiMatchingLoss", (2, 3, 9, 8), {}),
    ("DiceBettiMatchingLoss", (2, 2, 7, 8), {"activation": "softmax", "reduction": "none", "topology_weights": (1.0, 2.0)}),
]


@pytest.mark.parametrize("kind, shape, kw", LOSS_COMPILE_CASES)
def test_losses_compile_fullgraph(kind, shape, kw, gen):
    """The losses go into compiled training steps: fullgraph=True, the eager value and gradient."""
    torch._dynamo.reset()
    x, t = option_inputs(shape, gen, "activation" in kw)
    if kind == "function":
        fn = lambda a, b: lossforge.betti_matching_loss(a, b, **kw)
    else:
        fn = getattr(lnn, kind)(**kw)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = fn(xe, t), compiled(xc, t)
    torch.testing.assert_close(got, want)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    # a second call with other values reuses the graph and follows the data
    x2, t2 = option_inputs(shape, gen, "activation" in kw)
    torch.testing.assert_close(compiled(x2, t2), fn(x2, t2))


@pytest.mark.parametrize("metric", ["betti_matching_error", "betti_number_error"])
@pytest.mark.parametrize("shape", [(2, 2, 9, 8), (1, 1, 5, 6, 4)])
def test_metrics_compile_fullgraph(metric, shape, gen):
    torch._dynamo.reset()
    fn = getattr(lossforge, metric)
    p, t = pair(shape, gen, "smooth", "binary", torch.float32)
    compiled = torch.compile(lambda a, b: fn(a, b, 0.4, relative=True, reduction="none"), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(p, t), fn(p, t, 0.4, relative=True, reduction="none"))


def test_structured_results_compile_with_graph_breaks(gen):
    """persistence_barcode and betti_matching return Python data of a data-dependent size: they compile
    with graph breaks (fullgraph=False; documented) and give the eager results."""
    torch._dynamo.reset()
    p, t = pair((2, 1, 7, 6), gen, "continuous", "binary")
    bm = torch.compile(lambda a, b: lossforge.betti_matching(a, b, strict=True), backend="aot_eager")
    got, want = bm(p, t), lossforge.betti_matching(p, t, strict=True)
    assert [as_sets(r, (7, 6)) for r in got] == [as_sets(r, (7, 6)) for r in want]
    for a, b in zip(got, want):
        for field in dataclasses.fields(a):
            va, vb = getattr(a, field.name), getattr(b, field.name)
            assert va == vb if isinstance(va, str) else all(torch.equal(u, v) for u, v in zip(va, vb))
    torch._dynamo.reset()
    bc = torch.compile(lambda a: lossforge.persistence_barcode(a, include_essential=True), backend="aot_eager")
    got, want = bc(p[0, 0]), lossforge.persistence_barcode(p[0, 0], include_essential=True)
    for name in ("births", "deaths", "birth_coords", "death_coords"):
        assert all(torch.equal(u, v) for u, v in zip(getattr(got, name), getattr(want, name)))


def test_ops_opcheck_host_ops(gen):
    """The host ops behind the entry points (data checks + core): schema and fake tensors."""
    p, t = pair((3, 7, 6), gen, "continuous", "binary")
    for args in ((p, t, "superlevel", False, False, False, True, True), (p, t, "bothlevel", False, True, True, False, False)):
        torch.library.opcheck(ops._betti_matching_rows.default, args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops._persistence_rows.default, (p, True, True, "image"), test_utils=("test_schema", "test_faketensor"))


def test_fake_kernels_check_arguments(gen):
    """The fake kernels check what the C++ kernels check, with the same message: meta tensors (which
    reach only the fakes) and a direct op call under torch.compile fail as in eager."""
    f = torch.rand(2, 5, 6, dtype=torch.float64)
    long0 = torch.zeros(0, 5, dtype=torch.long)
    cases = [
        (lambda f: ops.betti_matching_pairs(f, f[:, :4].contiguous(), False, True), "f and g must have the same shape"),
        (lambda f: ops.betti_matching_pairs(f, f.float(), False, True), "f and g must have the same dtype"),
        (lambda f: ops.betti_matching_pairs(f[0], f[0], False, True), r"must have shape \[N, H, W\] or \[N, D, H, W\]"),
        (lambda f: ops.persistence_pairs(f.half(), False), "float32 or float64"),
        (lambda f: ops.betti_matching_loss_rows(f.reshape(2, -1), f.reshape(2, -1), long0.to(f.device),
                                                torch.ones(2, 3, dtype=torch.float32, device=f.device)),
         "weights must be float64"),
        (lambda f: ops.betti_matching_loss_rows(f.reshape(2, -1), f.reshape(2, -1)[:1], long0.to(f.device),
                                                torch.ones(2, 3, dtype=torch.float64, device=f.device)),
         "target must have pred's shape"),
        (lambda f: ops.betti_matching_loss_rows_backward(torch.ones(3, dtype=f.dtype, device=f.device), f.reshape(2, -1),
                                                         f.reshape(2, -1), long0.to(f.device),
                                                         torch.ones(2, 3, dtype=torch.float64, device=f.device)),
         "grad must have one element per instance"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(f)
        with pytest.raises(RuntimeError, match=message):
            call(f.to("meta"))
        torch._dynamo.reset()
        with pytest.raises(Exception, match=message):
            torch.compile(call, fullgraph=True, backend="aot_eager")(f)


# ---- modules ------------------------------------------------------------------------------------

def test_modules(gen, device):
    p, t = pair((2, 2, 14, 15), gen, "smooth", "binary")
    p, t = p.to(device).requires_grad_(), t.to(device)
    m = lnn.BettiMatchingLoss(filtration="bothlevel", dims=(1.0, 0.5))
    torch.testing.assert_close(m(p, t), lossforge.betti_matching_loss(p, t, filtration="bothlevel", dims=(1.0, 0.5)))
    assert "bothlevel" in repr(m)
    d = lnn.DiceBettiMatchingLoss(alpha=0.3)
    inter = (p * t).sum((2, 3))
    dice = (1 - (2 * inter + 1e-5) / (p.sum((2, 3)) + t.sum((2, 3)) + 1e-5)).mean()
    out = d(p, t)
    torch.testing.assert_close(out, dice + 0.3 * lossforge.betti_matching_loss(p, t))
    out.backward()
    assert p.grad is not None and bool(torch.isfinite(p.grad).all())
    assert lnn.DiceBettiMatchingLoss(alpha=0.0)(p, t).item() == pytest.approx(dice.item())


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_input(gen):
    p, t = pair((1, 1, 6, 6), gen, "continuous", "binary")
    with pytest.raises(ValueError, match="target must have pred's shape"):
        lossforge.betti_matching_loss(p, t[..., :5])
    with pytest.raises(ValueError, match="target must have pred's shape"):
        lossforge.betti_matching(p[0, 0], t[0, 0, :5])
    bad = p.clone()
    bad[0, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="pred contains NaN"):
        lossforge.betti_matching_loss(bad, t)
    with pytest.raises(ValueError, match="target contains NaN"):
        lossforge.betti_matching(t[0, 0], bad[0, 0])
    with pytest.raises(ValueError, match="image contains NaN"):
        lossforge.persistence_barcode(bad)
    with pytest.raises(ValueError, match=r"2D or 3D images.*\(1 dimensions\)"):
        lossforge.persistence_barcode(torch.rand(5))
    with pytest.raises(ValueError, match=r"\(6 dimensions\)"):
        lossforge.betti_matching(torch.rand(1, 1, 2, 3, 3, 3), torch.rand(1, 1, 2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\].*got \(6, 6\)"):
        lossforge.betti_matching_loss(p[0, 0], t[0, 0])
    with pytest.raises(ValueError, match="pred is empty"):
        lossforge.betti_matching_loss(torch.rand(2, 1, 0, 4), torch.rand(2, 1, 0, 4))
    with pytest.raises(ValueError, match="image is empty"):
        lossforge.persistence_barcode(torch.rand(3, 0))
    with pytest.raises(ValueError, match="filtration must be one of"):
        lossforge.betti_matching_loss(p, t, filtration="upper")
    with pytest.raises(ValueError, match="filtration must be one of 'superlevel', 'sublevel'"):
        lossforge.persistence_barcode(p, filtration="bothlevel")
    with pytest.raises(ValueError, match="reduction must be one of"):
        lossforge.betti_matching_loss(p, t, reduction="max")
    with pytest.raises(ValueError, match=r"dims must have one weight per homology dimension 0..1 \(2 values\), got 3"):
        lossforge.betti_matching_loss(p, t, dims=[1, 1, 1])
    with pytest.raises(ValueError, match="finite and non-negative"):
        lossforge.betti_matching_loss(p, t, dims=[1, -1])
    with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
        lossforge.betti_matching_loss(p.numpy(), t)
    with pytest.raises(TypeError, match="floating-point"):
        lossforge.betti_matching_loss((p > 0.5).long(), t)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        lossforge.betti_number_error(p, t, threshold=float("nan"))
    with pytest.raises(ValueError, match="alpha must be a non-negative number"):
        lnn.DiceBettiMatchingLoss(alpha=-1)
    with pytest.raises(ValueError, match="target must have pred's shape"):  # not broadcast by the Dice term
        lnn.DiceBettiMatchingLoss(alpha=0.0)(p.expand(1, 2, 6, 6), t)


@pytest.mark.parametrize("compiled", [False, True])
def test_bad_values_raise_value_error(compiled, gen):
    """Logits passed as probabilities, +-inf, a {0, 255} mask: ValueError naming the argument and the fix
    (they gave a loss: 1.3e7 for the mask); NaN keeps raising; eager and compiled alike (the checks run
    inside the op)."""
    torch._dynamo.reset()
    loss = lossforge.betti_matching_loss
    if compiled:
        loss = torch.compile(loss, fullgraph=True, backend="aot_eager")
    p, t = pair((1, 1, 8, 9), gen, "continuous", "binary", torch.float32)
    logits = torch.randn(1, 1, 8, 9, generator=gen) * 3
    with pytest.raises(ValueError, match=r"pred has values outside \[0, 1\].*activation='sigmoid'"):
        loss(logits, t)
    for bad in (float("inf"), float("-inf")):
        x = p.clone()
        x[0, 0, 3, 4] = bad
        with pytest.raises(ValueError, match=r"pred has values outside \[0, 1\]"):
            loss(x, t)
    mask = (t * 255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"target has values outside \[0, 1\].*\(target > 0\)\.float\(\)"):
        loss(p, mask)
    x = p.clone()
    x[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="pred contains NaN"):
        loss(x, t)
    y = t.clone()
    y[0, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="target contains NaN"):
        loss(p, y)
    # the activation option takes the logits; 0 and 1 themselves are valid
    assert torch.isfinite(loss(logits, t, activation="sigmoid"))
    assert loss((p > 0.5).float(), t).item() >= 0
    torch.testing.assert_close(lossforge.betti_matching_loss(p, mask.bool()), lossforge.betti_matching_loss(p, t))


def test_bad_values_of_modules_and_metrics(gen):
    p, t = pair((2, 2, 7, 8), gen, "continuous", "binary", torch.float32)
    with pytest.raises(ValueError, match="activation="):
        lnn.BettiMatchingLoss()(p * 4 - 2, t)
    with pytest.raises(ValueError, match="target has values outside"):
        lnn.DiceBettiMatchingLoss()(p, t * 255)
    # the metrics threshold both inputs: a {0, 255} mask is a mask there; NaN still raises
    mask = (t * 255).to(torch.uint8)
    torch.testing.assert_close(lossforge.betti_matching_error(p, mask), lossforge.betti_matching_error(p, t))
    torch.testing.assert_close(lossforge.betti_number_error(p, mask), lossforge.betti_number_error(p, t))
    x = p.clone()
    x[1, 0, 2, 2] = float("nan")
    for metric in (lossforge.betti_matching_error, lossforge.betti_number_error):
        with pytest.raises(ValueError, match="pred contains NaN"):
            metric(x, t)
        with pytest.raises(ValueError, match="target contains NaN"):
            metric(t, x)
    # betti_matching and persistence_barcode take any real values (NaN raises)
    lossforge.betti_matching(p * 4 - 2, t)
    with pytest.raises(ValueError, match="image contains NaN"):
        lossforge.persistence_barcode(x)


def test_options_bad_input(gen):
    p, t = pair((1, 2, 6, 6), gen, "continuous", "binary")
    with pytest.raises(ValueError, match="activation must be one of None, 'sigmoid', 'softmax'"):
        lossforge.betti_matching_loss(p, t, activation="relu")
    with pytest.raises(ValueError, match="softmax' needs several channels"):
        lossforge.betti_matching_loss(p[:, :1], t[:, :1], activation="softmax")
    with pytest.raises(ValueError, match="topology_weights must be two finite non-negative weights"):
        lossforge.betti_matching_loss(p, t, topology_weights=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="barcode_length_threshold must be a finite number >= 0"):
        lossforge.betti_matching_loss(p, t, barcode_length_threshold=-0.1)
    with pytest.raises(ValueError, match="choose one"):
        lossforge.betti_matching_loss(p, t, relative=True, sphere=True)
    with pytest.raises(TypeError, match="takes from 2 to 3 positional arguments"):
        lossforge.betti_matching_loss(p, t, "superlevel", True)  # booleans are keyword-only
    with pytest.raises(TypeError, match="positional"):
        lossforge.betti_matching(p, t, "superlevel", True)
    with pytest.raises(TypeError, match="positional"):
        lossforge.persistence_barcode(p, "superlevel", True)
    with pytest.raises(TypeError, match="include_background must be a bool"):
        lossforge.betti_matching_loss(p, t, include_background=1)
    with pytest.raises(ValueError, match="filtration must be one of"):
        lnn.BettiMatchingLoss(filtration="both")
    with pytest.raises(ValueError, match="barcode_length_threshold"):
        lnn.BettiMatchingLoss(barcode_length_threshold=float("nan"))


def test_bad_input_reaches_cpp_checks(gen):
    f = torch.rand(2, 5, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="f and g must have the same shape"):
        ops.betti_matching_pairs(f, f[:, :4].contiguous(), False, True)
    with pytest.raises(RuntimeError, match="must have shape \\[N, H, W\\] or \\[N, D, H, W\\]"):
        ops.betti_matching_pairs(f[0], f[0], False, True)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.persistence_pairs(f.half(), False)
    g = f.clone()
    g[1, 2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="g contains NaN"):
        ops.betti_matching_pairs(f, g, False, True)
    with pytest.raises(RuntimeError, match="empty spatial dimension"):
        ops.persistence_pairs(torch.rand(1, 0, 3), False)
    rows, _ = ops.betti_matching_pairs(f, torch.rand(2, 5, 6, dtype=torch.float64), False, True)
    w = torch.ones(2, 3, dtype=torch.float64)
    bad = rows.clone()
    bad[0, 1] = 10 ** 6
    with pytest.raises(RuntimeError, match="indexes pixel"):
        ops.betti_matching_loss_rows(f.reshape(2, -1), f.reshape(2, -1), bad, w)
    with pytest.raises(RuntimeError, match="weights must be float64"):
        ops.betti_matching_loss_rows(f.reshape(2, -1), f.reshape(2, -1), rows, w.float())
    assert rows[0, 0] // 6 == 0 and rows[-1, 0] // 6 == 1  # both instances have bars: flipping ungroups them
    with pytest.raises(RuntimeError, match="grouped by instance"):
        ops.betti_matching_loss_rows(f.reshape(2, -1), f.reshape(2, -1), rows.flip(0).contiguous(), w)


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.int64, torch.uint8, torch.float32])
def test_metrics_take_any_target_dtype(target_dtype, gen):
    """The metrics binarise both inputs: a float64 pred with a bool, int or float32 target (as the docs allow)
    gives the float64 target's result (it raised a C++ dtype error from betti_matching_pairs)."""
    p = torch.rand(2, 1, 9, 9, generator=gen, dtype=torch.float64)
    t = torch.rand(2, 1, 9, 9, generator=gen) > 0.5
    want_m = lossforge.betti_matching_error(p, t.double())
    want_n = lossforge.betti_number_error(p, t.double())
    torch.testing.assert_close(lossforge.betti_matching_error(p, t.to(target_dtype)), want_m)
    torch.testing.assert_close(lossforge.betti_number_error(p, t.to(target_dtype)), want_n)
