"""Zigzag persistence across layers: engine checked against references, descriptors against definitions."""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topomon.metrics.zigzag import (
    ZigzagResult,
    adjacent_layer_similarity,
    knn_complex,
    persistence_similarity,
    prune_candidates,
    zigzag_barcodes,
    zigzag_descriptors,
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- references
def gf2_rank(rows: list[set[int]]) -> int:
    """Rank over GF(2) of vectors given as sets of coordinates (plain Gaussian elimination)."""
    pivots: dict[int, set[int]] = {}
    rank = 0
    for r in rows:
        v = set(r)
        while v:
            p = max(v)
            if p not in pivots:
                pivots[p] = v
                rank += 1
                break
            v ^= pivots[p]
    return rank


def static_betti(simplices: list[tuple[int, ...]]) -> tuple[int, int]:
    """(beta0, beta1) of a 2-complex from boundary ranks over GF(2)."""
    verts = [s for s in simplices if len(s) == 1]
    edges = [s for s in simplices if len(s) == 2]
    tris = [s for s in simplices if len(s) == 3]
    eidx = {e: i for i, e in enumerate(edges)}
    r1 = gf2_rank([{a, b} for a, b in edges])
    r2 = gf2_rank([{eidx[(a, b)], eidx[(a, c)], eidx[(b, c)]} for a, b, c in tris])
    return len(verts) - r1, len(edges) - r1 - r2


def fzz_reference(complexes: list[set[tuple[int, ...]]], maxdim: int) -> dict[int, Counter]:
    """Zigzag bars by the FastZigzag construction (Dey & Hou 2022) and a plain column reduction.

    Independent of topomon's engine: the zigzag of simplex insertions/deletions is turned into a
    non-zigzag filtration of a Delta-complex (insertions, then cones over the deleted simplices in
    reverse order), reduced by the standard algorithm, and the pairs mapped back to the zigzag.
    Returns bars as Counter of (birth position, death position) in positions 0..2L-2, with death
    = 2L - 1 for classes alive at the end (one past the last position).
    """
    n_pos = 2 * len(complexes) - 1
    pos = [
        complexes[p // 2] if p % 2 == 0 else complexes[p // 2] & complexes[p // 2 + 1] for p in range(n_pos)
    ]
    ops, when, prev = [], [], set()
    for p in range(n_pos + 1):
        cur = pos[p] if p < n_pos else set()
        for s in sorted(prev - cur, key=lambda s: (-len(s), s)):
            ops.append((False, s))
            when.append(p)
        for s in sorted(cur - prev, key=lambda s: (len(s), s)):
            ops.append((True, s))
            when.append(p)
        prev = cur
    current: dict[tuple[int, ...], int] = {}
    dims, bnd = [0], [[]]  # cell 0 is the cone apex
    add_op, dels, del_op = [], [], []
    for i, (ins, s) in enumerate(ops):
        if ins:
            faces = [current[s[:j] + s[j + 1 :]] for j in range(len(s))] if len(s) > 1 else []
            current[s] = len(dims)
            dims.append(len(s) - 1)
            bnd.append(faces)
            add_op.append(i)
        else:
            dels.append(current.pop(s))
            del_op.append(i)
    n = len(add_op)
    cone: dict[int, int] = {}
    for c in reversed(dels):
        cone[c] = len(dims)
        bnd.append([c, 0] if dims[c] == 0 else [c] + [cone[f] for f in bnd[c]])
        dims.append(dims[c] + 1)
    reduced: dict[int, set[int]] = {}
    pairs = []
    for j, col0 in enumerate(bnd):
        col = set(col0)
        while col and max(col) in reduced:
            col ^= reduced[max(col)]
        if col:
            reduced[max(col)] = col
            pairs.append((max(col), j))
    out: dict[int, Counter] = {d: Counter() for d in range(maxdim + 1)}
    for b, d in pairs:
        p = dims[b]
        if d <= n:
            dim, start, end = p, add_op[b - 1], add_op[d - 1]
        elif b > n:
            dim, start, end = p - 1, del_op[2 * n - d], del_op[2 * n - b]
        else:
            a, e = add_op[b - 1], del_op[2 * n - d]
            dim, start, end = (p, a, e) if a < e else (p - 1, e, a)
        if dim <= maxdim and when[start] != when[end]:
            out[dim][(when[start], when[end])] += 1
    return out


def as_position_counter(result: ZigzagResult, dim: int) -> Counter:
    n_pos = 2 * result.n_layers - 1
    return Counter((int(2 * b), n_pos if math.isinf(d) else int(2 * d)) for b, d in result.bars[dim].tolist())


def random_layers(rng: np.random.Generator, n: int, n_layers: int, dim: int = 2) -> list[np.ndarray]:
    """Clustered points drifting across layers, so components and loops appear and vanish."""
    x = rng.normal(size=(n, dim)) + 4.0 * rng.integers(0, 3, size=(n, 1))
    out = []
    for _ in range(n_layers):
        x = x + rng.normal(scale=float(rng.choice([0.1, 0.5, 1.5])), size=x.shape)
        out.append(x.copy())
    return out


def noisy_circle(rng: np.random.Generator, n: int = 40) -> np.ndarray:
    theta = 2 * np.pi * np.arange(n) / n + rng.normal(scale=0.01, size=n)
    r = 1.0 + rng.normal(scale=0.01, size=n)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def open_arc(rng: np.random.Generator, n: int = 40) -> np.ndarray:
    """The circle cut open between points n-1 and 0 and laid on a line: same order, no loop."""
    t = np.arange(n) * (2 * np.pi / n) + rng.normal(scale=0.01, size=n)
    return np.stack([t, rng.normal(scale=0.01, size=n)], axis=1)


# ----------------------------------------------------------------------------- knn_complex
def test_knn_complex_known_square():
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    cx = knn_complex(square, k=2)
    assert cx == [(0,), (1,), (2,), (3,), (0, 1), (0, 3), (1, 2), (2, 3)]
    assert static_betti(cx) == (1, 1)
    assert knn_complex(square, k=3)[-4:] == [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), scale=st.floats(0.1, 10.0))
def test_knn_complex_is_a_flag_complex_invariant_under_similarity_transforms(seed, k, scale):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(25, 3))
    cx = knn_complex(x, k=k)
    edges = {s for s in cx if len(s) == 2}
    # every vertex chose k neighbours, so its degree is at least k
    deg = Counter(v for e in edges for v in e)
    assert min(deg[v] for v in range(25)) >= k
    # the triangles are exactly the 3-cliques of the edges
    cliques = {(a, b, c) for a, b in edges for c in range(b + 1, 25) if (a, c) in edges and (b, c) in edges}
    assert {s for s in cx if len(s) == 3} == cliques
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    assert knn_complex(scale * x @ q + 5.0, k=k) == cx


def test_knn_complex_validation():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="smaller than the number of points"):
        knn_complex(x, k=5)
    with pytest.raises(ValueError, match="maxdim"):
        knn_complex(x, k=2, maxdim=3)
    with pytest.raises(TypeError, match="k"):
        knn_complex(x, k=2.0)
    with pytest.raises(ValueError, match="2-D"):
        knn_complex(np.zeros(5), k=2)
    with pytest.raises(ValueError, match="NaN"):
        knn_complex(np.full((5, 2), np.nan), k=2)


# ----------------------------------------------------------------------------- barcodes
def test_identical_layers_give_bars_spanning_every_layer():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 3))
    res = zigzag_barcodes([x] * 5, k=5, maxdim=1)
    beta0, beta1 = static_betti(knn_complex(x, k=5))
    assert beta1 > 0  # the case is not vacuous
    for dim, beta in ((0, beta0), (1, beta1)):
        bars = res.bars[dim]
        assert len(bars) == beta
        assert np.all(bars[:, 0] == 0) and np.all(np.isinf(bars[:, 1]))
        assert res.layer_bars(dim).tolist() == [[0, 5]] * beta
        assert res.betti(dim).tolist() == [beta] * 5


def test_circle_that_opens_at_layer_k_has_an_h1_bar_ending_at_k():
    rng = np.random.default_rng(0)
    n_layers, k_break = 7, 4
    layers = [noisy_circle(rng) for _ in range(k_break)] + [open_arc(rng) for _ in range(n_layers - k_break)]
    res = zigzag_barcodes(layers, k=4, maxdim=1)
    assert res.layer_bars(1).tolist() == [[0, k_break]]
    assert res.layer_bars(0).tolist() == [[0, n_layers]]
    # the loop dies when the wrap-around edges leave: in the intersection just before layer k
    assert res.bars[1].tolist() == [[0.0, k_break - 0.5]]
    assert res.betti(1).tolist() == [1] * k_break + [0] * (n_layers - k_break)


def test_a_loop_that_appears_mid_way_is_born_there():
    rng = np.random.default_rng(1)
    layers = [open_arc(rng) for _ in range(3)] + [noisy_circle(rng) for _ in range(3)]
    res = zigzag_barcodes(layers, k=4)
    assert res.layer_bars(1).tolist() == [[3, 6]]
    assert math.isinf(res.bars[1][0, 1])


@pytest.mark.parametrize("seed", range(4))
def test_builtin_engine_matches_an_independent_fastzigzag_reduction(seed):
    rng = np.random.default_rng(seed)
    for _ in range(8):
        n, n_layers, k = int(rng.integers(6, 22)), int(rng.integers(2, 6)), int(rng.integers(1, 5))
        layers = random_layers(rng, n, n_layers)
        res = zigzag_barcodes(layers, k=min(k, n - 1))
        ref = fzz_reference([set(knn_complex(x, k=min(k, n - 1))) for x in layers], maxdim=1)
        for dim in (0, 1):
            assert as_position_counter(res, dim) == ref[dim]


def test_builtin_engine_matches_dionysus():
    if os.environ.get("TOPOMON_CI"):
        import dionysus  # noqa: F401 - CI builds it (make setup-dionysus): missing, this fails, never skips
    else:
        pytest.importorskip("dionysus", reason="make setup-dionysus builds it (needs libboost-dev)")
    rng = np.random.default_rng(11)
    nontrivial = 0
    for _ in range(15):
        n, n_layers, k = int(rng.integers(6, 30)), int(rng.integers(2, 7)), int(rng.integers(1, 5))
        layers = random_layers(rng, n, n_layers)
        ours = zigzag_barcodes(layers, k=min(k, n - 1), engine="builtin")
        theirs = zigzag_barcodes(layers, k=min(k, n - 1), engine="dionysus")
        assert theirs.engine == "dionysus"
        for dim in (0, 1):
            assert as_position_counter(ours, dim) == as_position_counter(theirs, dim)
        nontrivial += len(ours.bars[1]) > 0 and len(ours.bars[0]) > 1
    assert nontrivial >= 3


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_barcode_of_the_reversed_sequence_is_the_mirror_image(seed):
    rng = np.random.default_rng(seed)
    n_layers = int(rng.integers(2, 6))
    layers = random_layers(rng, int(rng.integers(8, 20)), n_layers)
    fwd = zigzag_barcodes(layers, k=3)
    bwd = zigzag_barcodes(layers[::-1], k=3)
    last = n_layers - 0.5  # one half-step past the last layer
    for dim in (0, 1):
        f = np.where(np.isinf(fwd.bars[dim]), last, fwd.bars[dim])
        b = np.where(np.isinf(bwd.bars[dim]), last, bwd.bars[dim])
        mirrored = sorted((n_layers - 1 + 0.5 - d, n_layers - 1 + 0.5 - s) for s, d in f.tolist())
        assert mirrored == sorted(map(tuple, b.tolist()))


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(0.5, 20.0))
def test_barcodes_are_invariant_to_per_layer_rotations_and_text_relabelling(seed, scale):
    rng = np.random.default_rng(seed)
    layers = random_layers(rng, 18, 4)
    base = zigzag_barcodes(layers, k=3)
    perm = rng.permutation(18)
    moved = []
    for x in layers:
        q, _ = np.linalg.qr(rng.normal(size=(2, 2)))
        moved.append(scale * x[perm] @ q - 3.0)
    other = zigzag_barcodes(moved, k=3)
    for dim in (0, 1):
        np.testing.assert_array_equal(base.bars[dim], other.bars[dim])


def test_zigzag_validation():
    x = np.zeros((6, 2))
    with pytest.raises(ValueError, match="same n points"):
        zigzag_barcodes([x, np.zeros((7, 2))], k=2)
    with pytest.raises(ValueError, match="maxdim"):
        zigzag_barcodes([x], k=2, maxdim=2)
    with pytest.raises(ValueError, match="engine"):
        zigzag_barcodes([x], k=2, engine="pyfzz")
    with pytest.raises(ValueError, match="empty"):
        zigzag_barcodes([], k=2)
    with pytest.raises(TypeError, match="sequence"):
        zigzag_barcodes(x, k=2)
    with pytest.raises(ValueError, match="smaller than the number of points"):
        zigzag_barcodes([x, x], k=6)


# ----------------------------------------------------------------------------- similarity
bars_strategy = st.integers(1, 7).flatmap(
    lambda n_layers: st.tuples(
        st.just(n_layers),
        st.lists(
            st.tuples(st.integers(0, n_layers - 1), st.integers(1, n_layers)).filter(lambda t: t[1] > t[0]),
            max_size=30,
        ),
    )
)


@SETTINGS
@given(data=bars_strategy)
def test_persistence_similarity_counts_and_normalisations(data):
    n_layers, bars = data
    arr = np.array(bars, dtype=np.int64).reshape(-1, 2)
    counts = persistence_similarity(arr, n_layers, normalize="counts")
    brute = np.array(
        [
            [sum(1 for b, d in bars if b <= min(i, j) and d > max(i, j)) for j in range(n_layers)]
            for i in range(n_layers)
        ]
    )
    np.testing.assert_array_equal(counts, brute)
    betti = np.diag(counts)
    row = persistence_similarity(arr, n_layers)
    for i in range(n_layers):
        if betti[i] == 0:
            assert np.all(np.isnan(row[i]))
            continue
        assert row[i, i] == 1.0
        assert np.all((row[i] >= 0) & (row[i] <= 1))
        assert np.all(np.diff(row[i, i:]) <= 0) and np.all(np.diff(row[i, : i + 1]) >= 0)
        for j in range(n_layers):
            if betti[j] > 0:
                assert row[i, j] * betti[i] == pytest.approx(row[j, i] * betti[j])
    geo = persistence_similarity(arr, n_layers, normalize="geometric")
    np.testing.assert_array_equal(np.isnan(geo), np.isnan(geo.T))
    np.testing.assert_allclose(np.nan_to_num(geo), np.nan_to_num(geo.T))


def test_similarity_of_identical_layers_is_all_ones_and_accepts_a_result():
    x = noisy_circle(np.random.default_rng(2))
    res = zigzag_barcodes([x] * 4, k=4)
    np.testing.assert_array_equal(persistence_similarity(res, dim=1), np.ones((4, 4)))
    with pytest.raises(ValueError, match="n_layers"):
        persistence_similarity(res, 5)
    with pytest.raises(ValueError, match="computed dimensions"):
        persistence_similarity(res, dim=2)
    with pytest.raises(ValueError, match="normalize"):
        persistence_similarity(res, normalize="col")
    with pytest.raises(ValueError, match="n_layers"):
        persistence_similarity(np.array([[0, 1]]))
    with pytest.raises(ValueError, match="birth < death"):
        persistence_similarity(np.array([[2, 1]]), 3)


def test_prune_candidates_follows_the_authors_column_mean_rule():
    # layers 0..4; bars: a long-lived stretch over layers 1-3, short features elsewhere
    bars = np.array([[1, 4], [1, 4], [1, 4], [0, 1], [4, 5], [2, 3]])
    sim = persistence_similarity(bars, 5)
    # r_i = mean_j C[i, j] / C[j, j], computed by hand from the counts
    counts = persistence_similarity(bars, 5, normalize="counts")
    r = np.array([np.mean([counts[i, j] / counts[j, j] for j in range(5)]) for i in range(5)])
    expected = sorted(range(5), key=lambda i: (-r[i], i))
    assert prune_candidates(sim, 5) == expected
    assert prune_candidates(sim, 2) == expected[:2]
    assert set(expected[:3]) == {1, 2, 3}  # the stable stretch ranks first
    with pytest.raises(ValueError, match="k"):
        prune_candidates(sim, 6)
    with pytest.raises(ValueError, match="square"):
        prune_candidates(sim[:2], 1)


def test_prune_candidates_ranks_layers_without_features_last():
    sim = persistence_similarity(np.array([[0, 2]]), 3)  # layer 2 has no feature: NaN row and column
    assert prune_candidates(sim, 3)[-1] == 2


# ----------------------------------------------------------------------------- descriptors
def test_descriptors_on_a_hand_made_barcode():
    bars = {
        0: np.array([[0.0, math.inf]]),
        1: np.array([[0.0, 2.0], [1.0, math.inf], [1.5, 2.5], [2.5, 3.0]]),  # the last lives in 2.5 only
    }
    res = ZigzagResult(n_layers=4, n_points=10, k=3, maxdim=1, engine="builtin", bars=bars)
    assert res.layer_bars(1).tolist() == [[0, 2], [1, 4], [2, 3]]
    d = zigzag_descriptors(res)
    np.testing.assert_array_equal(d["betti_h1"], [1, 2, 2, 1])
    np.testing.assert_array_equal(d["births_h1"], [1, 1, 1, 0])
    np.testing.assert_allclose(d["births_relative_frequency_h1"], [1 / 3, 1 / 3, 1 / 3, 0])
    np.testing.assert_allclose(d["births_rate_h1"], [1, 0.5, 0.5, 0])
    # layer 0: its one feature reaches layer 1 (weight 1) and dies before 2 and 3 -> 1 / (1 + 2 + 3)
    sim = persistence_similarity(res)
    w = np.abs(np.subtract.outer(np.arange(4), np.arange(4)))
    np.testing.assert_allclose(d["inter_layer_persistence_h1"], (sim * w).sum(1) / w.sum(1))
    assert d["inter_layer_persistence_h1"][0] == pytest.approx(1 / 6)
    np.testing.assert_array_equal(d["inter_layer_persistence_h0"], np.ones(4))


def test_descriptors_undefined_values_are_nan():
    res = ZigzagResult(n_layers=3, n_points=5, k=2, maxdim=1, engine="builtin", bars={1: np.zeros((0, 2))})
    d = zigzag_descriptors(res)
    assert np.all(np.isnan(d["births_relative_frequency_h1"]))
    assert np.all(np.isnan(d["inter_layer_persistence_h1"]))
    with pytest.raises(ValueError, match="weight_power"):
        zigzag_descriptors(res, weight_power=-1)
    with pytest.raises(TypeError, match="ZigzagResult"):
        zigzag_descriptors({"bars": {}})


# ----------------------------------------------------------------------------- live signal
@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 50.0))
def test_adjacent_similarity_is_the_jaccard_of_knn_edges_and_similarity_invariant(seed, scale):
    rng = np.random.default_rng(seed)
    layers = [rng.normal(size=(30, 5)) for _ in range(3)]
    got = adjacent_layer_similarity(layers, k=4)
    edges = [{s for s in knn_complex(x, k=4, maxdim=1) if len(s) == 2} for x in layers]
    expected = [len(a & b) / len(a | b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    np.testing.assert_allclose(got, expected)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    np.testing.assert_allclose(adjacent_layer_similarity([scale * x @ q + 1.0 for x in layers], k=4), got)
    np.testing.assert_array_equal(adjacent_layer_similarity([layers[0]] * 3, k=4), [1.0, 1.0])
    with pytest.raises(ValueError, match="two layers"):
        adjacent_layer_similarity(layers[:1], k=4)
