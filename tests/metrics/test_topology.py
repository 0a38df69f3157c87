from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from ripser import ripser
from scipy.spatial.distance import cdist

from topomon.metrics.topology import (
    betti_curve,
    bottleneck_distance,
    max_persistence,
    persistence_diagrams,
    persistent_entropy,
    topology_metrics,
    total_persistence,
    wasserstein_distance,
)

INF = np.inf


def noisy_circle(
    rng: np.random.Generator, n: int = 100, noise: float = 0.05, radius: float = 1.0
) -> np.ndarray:
    t = rng.uniform(0, 2 * np.pi, n)
    return radius * np.c_[np.cos(t), np.sin(t)] + noise * rng.standard_normal((n, 2))


def lengths(dgm: np.ndarray) -> np.ndarray:
    return np.sort(dgm[:, 1] - dgm[:, 0])[::-1]


# ----------------------------------------------------------------------------- brute-force diagram distances
def _point_cost(u: tuple[float, float], v: tuple[float, float]) -> float:
    """L-inf distance between two diagram points, with inf - inf = 0 for two essential bars."""
    db = abs(u[0] - v[0])
    if math.isinf(u[1]) and math.isinf(v[1]):
        dd = 0.0
    elif math.isinf(u[1]) or math.isinf(v[1]):
        dd = math.inf
    else:
        dd = abs(u[1] - v[1])
    return max(db, dd)


def _diag_cost(u: tuple[float, float]) -> float:
    return math.inf if math.isinf(u[1]) else (u[1] - u[0]) / 2


def brute_force(d1: np.ndarray, d2: np.ndarray, p: float) -> float:
    """Enumerate every partial matching (extra points go to the diagonal); p = inf is bottleneck."""
    a = [tuple(r) for r in np.asarray(d1).reshape(-1, 2)]
    b = [tuple(r) for r in np.asarray(d2).reshape(-1, 2)]
    slots_b: list[tuple[float, float] | None] = [*b, *([None] * len(a))]
    best = math.inf
    for perm in itertools.permutations(range(len(slots_b)), len(a)):
        costs = []
        for i, j in enumerate(perm):
            target = slots_b[j]
            costs.append(_diag_cost(a[i]) if target is None else _point_cost(a[i], target))
        used = {j for j in perm if j < len(b)}
        costs += [_diag_cost(b[j]) for j in range(len(b)) if j not in used]
        if math.isinf(p):
            total = max(costs, default=0.0)
        else:
            total = sum(c**p for c in costs) ** (1 / p)
        best = min(best, total)
    return best


def random_diagram(rng: np.random.Generator, k: int, n_inf: int) -> np.ndarray:
    b = rng.uniform(0, 1, k)
    d = b + rng.exponential(0.4, k)
    fin = np.c_[b, d]
    inf = np.c_[rng.uniform(0, 0.5, n_inf), np.full(n_inf, INF)]
    out = np.vstack([fin, inf])
    return out[rng.permutation(len(out))]


# ----------------------------------------------------------------------------- persistence_diagrams
def test_noisy_circle_has_one_long_h1_bar() -> None:
    x = noisy_circle(np.random.default_rng(0))
    h0, h1 = persistence_diagrams(x)
    ls = lengths(h1)
    assert ls[0] > 1.0  # radius 1: the loop is born ~0.1 and dies ~sqrt(3)
    assert ls[1] < 0.15 * ls[0] if len(ls) > 1 else True
    assert np.isinf(h0[:, 1]).sum() == 1 and len(h0) == 100


def test_two_far_clusters_give_the_gap_as_an_h0_bar() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(-0.5, 0.5, (40, 3))
    b = rng.uniform(-0.5, 0.5, (30, 3)) + np.array([20.0, 0, 0])
    x = np.vstack([a, b])
    h0 = persistence_diagrams(x, maxdim=0)[0]
    gap = cdist(a, b).min()  # the single-linkage merge height of the two clusters
    finite = np.sort(h0[np.isfinite(h0[:, 1]), 1])
    assert finite[-1] == pytest.approx(gap, rel=1e-12)
    assert finite[-2] < 1.0  # every other merge happens inside a cluster
    assert 18.0 < gap < 20.0


@pytest.mark.parametrize("metric", ["euclidean", "manhattan", "chebyshev", "cosine"])
def test_h0_by_mst_equals_ripser_h0(metric: str) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((120, 6)) + 0.5
    x[10] = x[11]  # a duplicate: a zero-length bar, omitted by both
    x[20] = x[21]
    ours = persistence_diagrams(x, maxdim=0, metric=metric)[0]
    ref = ripser(x, maxdim=0, metric=metric)["dgms"][0]
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.sort(ours[:, 1]), np.sort(ref[:, 1]), rtol=1e-5)
    np.testing.assert_array_equal(ours[:, 0], 0.0)


def test_h1_equals_plain_ripser_and_h0_from_maxdim1() -> None:
    rng = np.random.default_rng(3)
    x = np.vstack([noisy_circle(rng, 60), noisy_circle(rng, 40, radius=0.4) + 3])
    ours = persistence_diagrams(x, maxdim=1)
    ref = ripser(x, maxdim=1)["dgms"]
    assert len(ours) == 2
    for o, r in zip(ours, ref, strict=True):
        assert bottleneck_distance(o, r) < 1e-5
        assert o.dtype == np.float64 and o.shape[1] == 2
    assert np.sum(lengths(ours[1]) > 0.2) == 2  # two loops


@pytest.mark.parametrize("maxdim", [1, 2])
def test_compiled_core_equals_public_ripser_on_distance_matrices(maxdim: int) -> None:
    """The engine calls ripser's compiled core directly: the same bars as ``ripser.ripser``."""
    from topomon.metrics.topology import _pairwise, _ripser_dm

    rng = np.random.default_rng(11)
    x = np.vstack([noisy_circle(rng, 50), rng.standard_normal((30, 2)) * 0.3 + 4])
    dist = _pairwise(x, "euclidean")
    ours = _ripser_dm(dist, maxdim)
    ref = ripser(dist, maxdim=maxdim, distance_matrix=True)["dgms"]
    assert len(ours) == len(ref) == maxdim + 1
    for o, r in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(o[np.lexsort(o.T)], r[np.lexsort(r.T)])


def test_persistent_homology_does_not_import_scikit_learn_or_scipy() -> None:
    """``import ripser`` imports scikit-learn (about 1 s of CPU in every worker) and scipy's linalg
    and spatial modules cost 0.3 s more; the engine (PCA, distances, ripser's core) needs neither."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from topomon.metrics.topology import topology_metrics\n"
        "topology_metrics(np.random.default_rng(0).standard_normal((60, 8)), pca_dim=4)\n"
        "print(sorted(m for m in ('sklearn', 'ripser', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_maxdim2_returns_three_diagrams() -> None:
    rng = np.random.default_rng(4)
    v = rng.standard_normal((60, 3))
    sphere = v / np.linalg.norm(v, axis=1, keepdims=True)
    dgms = persistence_diagrams(sphere, maxdim=2)
    assert len(dgms) == 3
    assert lengths(dgms[2])[0] > 0.5  # the 2-sphere's void


def test_landmarks_keep_the_circle_and_are_deterministic() -> None:
    x = noisy_circle(np.random.default_rng(5), 250, noise=0.03)
    full = persistence_diagrams(x)
    a = persistence_diagrams(x, n_landmarks=60, seed=0)
    b = persistence_diagrams(x, n_landmarks=60, seed=0)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a[0], full[0])  # H0 is always exact on all points
    assert len(lengths(a[1])) >= 1 and lengths(a[1])[0] > 1.0
    assert abs(lengths(a[1])[0] - lengths(full[1])[0]) < 0.3
    # More landmarks than points: the plain computation.
    c = persistence_diagrams(x, n_landmarks=250)
    assert bottleneck_distance(c[1], full[1]) == 0.0


def test_landmarks_are_farthest_point_samples() -> None:
    """Greedy max-min landmarks of a 1-D grid plus a far point always include that far point."""
    x = np.vstack([np.c_[np.linspace(0, 1, 50), np.zeros(50)], [[10.0, 0.0]]])
    for seed in range(5):
        h0, h1 = persistence_diagrams(x, n_landmarks=3, seed=seed)
        assert len(h1) == 0
        assert h0[np.isfinite(h0[:, 1]), 1].max() == pytest.approx(9.0)


def test_pca_dim_is_exact_for_data_in_a_subspace() -> None:
    rng = np.random.default_rng(6)
    low = noisy_circle(rng, 80)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    high = np.c_[low, np.zeros((80, 38))] @ q.T + rng.standard_normal(40)
    ref = persistence_diagrams(low)
    for k in (2, 5, 200):
        got = persistence_diagrams(high, pca_dim=k)
        for g, r in zip(got, ref, strict=True):
            assert bottleneck_distance(g, r) < 1e-5
    wide = np.c_[low[:30], np.zeros((30, 98))] @ np.linalg.qr(rng.standard_normal((100, 100)))[0]
    got = persistence_diagrams(wide, pca_dim=2)  # n < d: the Gram side
    assert bottleneck_distance(got[0], persistence_diagrams(low[:30])[0]) < 1e-5


def test_giotto_engine_agrees_with_ripser() -> None:
    pytest.importorskip("gph")
    x = noisy_circle(np.random.default_rng(7), 80)
    r = persistence_diagrams(x, engine="ripser")
    g = persistence_diagrams(x, engine="giotto", n_threads=2)
    for u, v in zip(r, g, strict=True):
        assert bottleneck_distance(u, v) < 1e-5


def test_many_points_without_landmarks_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import topomon.metrics.topology as topo

    monkeypatch.setattr(topo, "_DENSE_LIMIT", 50)
    x = noisy_circle(np.random.default_rng(8), 80)
    with pytest.warns(RuntimeWarning, match="n_landmarks"):
        dgms = persistence_diagrams(x)
    ref = ripser(x)["dgms"]
    assert bottleneck_distance(dgms[0], ref[0]) < 1e-5  # row-by-row MST path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        land = persistence_diagrams(x, n_landmarks=40)  # row-by-row landmarks, no warning
    assert len(land) == 2


# ----------------------------------------------------------------------------- summaries
def test_total_and_max_persistence_known_answers() -> None:
    dgm = np.array([[0.0, 1.0], [0.5, 2.5], [0.0, INF]])
    assert total_persistence(dgm) == 3.0
    assert total_persistence(dgm, p=2) == 5.0
    assert max_persistence(dgm) == 2.0
    assert total_persistence(np.empty((0, 2))) == 0.0
    assert max_persistence(np.empty((0, 2))) == 0.0
    assert max_persistence(np.array([[0.0, INF]])) == 0.0


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_persistent_entropy_of_equal_bars_is_log_n(n: int) -> None:
    dgm = np.vstack([np.c_[np.arange(n), np.arange(n) + 0.3], [[0.0, INF]], [[1.0, 1.0]]])
    assert persistent_entropy(dgm) == pytest.approx(math.log(n), abs=1e-12)


def test_persistent_entropy_nan_and_bounds() -> None:
    assert math.isnan(persistent_entropy(np.empty((0, 2))))
    assert math.isnan(persistent_entropy(np.array([[1.0, 1.0], [0.0, INF]])))
    rng = np.random.default_rng(9)
    d = random_diagram(rng, 20, 0)
    h = persistent_entropy(d)
    assert 0 < h <= math.log(20)
    one_dominant = np.array([[0.0, 100.0], [0.0, 0.01], [0.0, 0.01]])
    assert persistent_entropy(one_dominant) < 0.01


def test_betti_curve_matches_naive_count() -> None:
    dgm = np.array([[0.0, 1.0], [0.5, 2.0], [1.0, INF], [0.2, 0.2]])
    ts = np.array([-1.0, 0.0, 0.2, 0.5, 0.99, 1.0, 1.5, 2.0, 100.0])
    expected = [sum(1 for b, d in dgm if b <= t < d) for t in ts]
    got = betti_curve(dgm, ts)
    assert got.tolist() == expected == [0, 1, 1, 2, 2, 2, 2, 1, 1]
    assert got.dtype == np.int64
    assert betti_curve(np.empty((0, 2)), ts).tolist() == [0] * len(ts)


# ----------------------------------------------------------------------------- distances
def test_distances_match_brute_force_on_small_diagrams() -> None:
    rng = np.random.default_rng(10)
    for trial in range(40):
        n_inf = int(rng.integers(0, 3))
        d1 = random_diagram(rng, int(rng.integers(0, 4)), n_inf)
        d2 = random_diagram(rng, int(rng.integers(0, 4)), n_inf if trial % 5 else int(rng.integers(0, 3)))
        for p in (1.0, 2.0):
            assert wasserstein_distance(d1, d2, p) == pytest.approx(
                brute_force(d1, d2, p), rel=1e-12, abs=1e-12
            )
        assert bottleneck_distance(d1, d2) == pytest.approx(brute_force(d1, d2, INF), rel=1e-12, abs=1e-12)


def test_distances_known_answers_and_infinite_bars() -> None:
    empty = np.empty((0, 2))
    a = np.array([[0.0, 2.0], [1.0, 2.0]])
    assert wasserstein_distance(a, empty) == 1.5  # (2 - 0)/2 + (2 - 1)/2
    assert wasserstein_distance(a, empty, p=2) == pytest.approx(math.sqrt(1.0 + 0.25))
    assert bottleneck_distance(a, empty) == 1.0
    assert wasserstein_distance(empty, empty) == 0.0 and bottleneck_distance(empty, empty) == 0.0
    x = np.array([[0.0, INF], [0.0, 1.0]])
    y = np.array([[0.3, INF], [0.0, 1.0]])
    assert wasserstein_distance(x, y) == pytest.approx(0.3)
    assert bottleneck_distance(x, y) == pytest.approx(0.3)
    # Different numbers of essential classes: infinitely far (persim #105 reports a finite number).
    z = np.array([[0.0, 1.0]])
    assert wasserstein_distance(x, z) == INF and bottleneck_distance(x, z) == INF
    assert bottleneck_distance(np.array([[0.0, INF]]), empty) == INF


def test_bottleneck_agrees_with_persim_on_finite_diagrams() -> None:
    from persim import bottleneck

    rng = np.random.default_rng(11)
    for _ in range(10):
        d1 = random_diagram(rng, int(rng.integers(1, 30)), 0)
        d2 = random_diagram(rng, int(rng.integers(1, 30)), 0)
        assert bottleneck_distance(d1, d2) == pytest.approx(bottleneck(d1, d2), rel=1e-9)


def test_distances_accept_ripser_output_and_lists() -> None:
    x = noisy_circle(np.random.default_rng(12), 50)
    d = persistence_diagrams(x)
    assert bottleneck_distance(d[0], d[0]) == 0.0 and wasserstein_distance(d[1], d[1]) == 0.0
    assert bottleneck_distance([[0.0, 1.0]], [[0.0, 1.0]]) == 0.0  # type: ignore[arg-type]
    assert wasserstein_distance(np.array([]), np.array([[0.0, 2.0]])) == 1.0


# ----------------------------------------------------------------------------- topology_metrics
def test_topology_metrics_keys_and_values() -> None:
    x = noisy_circle(np.random.default_rng(13), 80)
    m, dgms = topology_metrics(x, maxdim=1)
    assert set(m) == {
        "h0_total_persistence",
        "h1_total_persistence",
        "h0_entropy",
        "h1_entropy",
        "h1_max_persistence",
        "h1_count",
    }
    assert m["h0_total_persistence"] == pytest.approx(total_persistence(dgms[0]))
    assert m["h1_max_persistence"] == pytest.approx(max_persistence(dgms[1])) and m["h1_max_persistence"] > 1
    assert m["h1_count"] == float(len(dgms[1]))
    assert m["h0_entropy"] == pytest.approx(persistent_entropy(dgms[0]))
    m0, d0 = topology_metrics(x, maxdim=0)
    assert len(d0) == 1 and math.isnan(m0["h1_count"]) and math.isnan(m0["h1_entropy"])
    # A cloud without loops: no H1 bar, entropy undefined, max persistence 0.
    m2, _ = topology_metrics(np.c_[np.linspace(0, 1, 20), np.zeros(20)])
    assert m2["h1_count"] == 0.0 and m2["h1_max_persistence"] == 0.0 and math.isnan(m2["h1_entropy"])


def test_identical_points_have_one_infinite_bar() -> None:
    m, dgms = topology_metrics(np.ones((10, 3)))
    assert dgms[0].tolist() == [[0.0, INF]]
    assert len(dgms[1]) == 0
    assert m["h0_total_persistence"] == 0.0 and math.isnan(m["h0_entropy"])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("x", "kwargs", "exc", "match"),
    [
        (np.array([[0.0, np.nan], [1.0, 1.0]]), {}, ValueError, "prepare_points"),
        (np.ones((1, 3)), {}, ValueError, "at least 2 points"),
        (np.empty((0, 3)), {}, ValueError, "at least 2 points"),
        (np.ones((3, 0)), {}, ValueError, "at least 1 dimension"),
        (np.ones(5), {}, ValueError, "2-D"),
        (np.array([["a"], ["b"]]), {}, TypeError, "`x`"),
        (np.eye(3), {"maxdim": -1}, ValueError, "maxdim"),
        (np.eye(3), {"maxdim": 1.5}, ValueError, "maxdim"),
        (np.eye(3), {"n_landmarks": 1}, ValueError, "n_landmarks"),
        (np.eye(3), {"pca_dim": 0}, ValueError, "pca_dim"),
        (np.eye(3), {"metric": "minkowski"}, ValueError, "metric"),
        (np.eye(3), {"engine": "gudhi"}, ValueError, "engine"),
        (np.eye(3), {"seed": -2}, ValueError, "seed"),
        (np.array([[0.0, 0.0], [1.0, 1.0]]), {"metric": "cosine"}, ValueError, "cosine"),
    ],
)
def test_persistence_bad_input(x: np.ndarray, kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        persistence_diagrams(x, **kwargs)


@pytest.mark.parametrize(
    ("dgm", "match"),
    [
        (np.ones((3, 3)), "shape"),
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[1.0, 0.5]]), "death < birth"),
        (np.array([[-INF, 1.0]]), "births must be finite"),
        (np.array([[INF, INF]]), "births must be finite"),
    ],
)
def test_bad_diagrams(dgm: np.ndarray, match: str) -> None:
    ok = np.array([[0.0, 1.0]])
    for call in (
        lambda: total_persistence(dgm),
        lambda: persistent_entropy(dgm),
        lambda: max_persistence(dgm),
        lambda: betti_curve(dgm, np.array([0.5])),
        lambda: wasserstein_distance(dgm, ok),
        lambda: bottleneck_distance(ok, dgm),
    ):
        with pytest.raises(ValueError, match=match):
            call()


def test_bad_distance_and_summary_parameters() -> None:
    d = np.array([[0.0, 1.0]])
    for p in (0.5, 0, -1, INF, float("nan")):
        with pytest.raises(ValueError, match="`p`"):
            wasserstein_distance(d, d, p=p)
    with pytest.raises(ValueError, match="`p`"):
        total_persistence(d, p=0)
    with pytest.raises(ValueError, match="ts"):
        betti_curve(d, np.ones((2, 2)))


def _perfect_matching_within(fa, fb, t):
    """Independent check (networkx Hopcroft-Karp): a perfect matching of the augmented graph using
    only pairs at L-inf cost <= t (a to b, a to its diagonal, b to its diagonal, diagonal to diagonal)."""
    import networkx as nx

    n, m = len(fa), len(fb)
    g = nx.Graph()
    left = [("a", i) for i in range(n)] + [("db", j) for j in range(m)]
    right = [("b", j) for j in range(m)] + [("da", i) for i in range(n)]
    g.add_nodes_from(left, bipartite=0)
    g.add_nodes_from(right, bipartite=1)
    for i in range(n):
        for j in range(m):
            if max(abs(fa[i, 0] - fb[j, 0]), abs(fa[i, 1] - fb[j, 1])) <= t:
                g.add_edge(("a", i), ("b", j))
        if (fa[i, 1] - fa[i, 0]) / 2 <= t:
            g.add_edge(("a", i), ("da", i))
    for j in range(m):
        if (fb[j, 1] - fb[j, 0]) / 2 <= t:
            g.add_edge(("db", j), ("b", j))
        for i in range(n):
            g.add_edge(("db", j), ("da", i))
    match = nx.bipartite.hopcroft_karp_matching(g, top_nodes=left)
    return all(node in match for node in left)


def test_bottleneck_finishes_on_a_pair_that_hung_scipys_matching_and_is_exact():
    # two 255-bar H0 diagrams of SmolLM2-135M hidden states on which scipy's
    # maximum_bipartite_matching did not return within minutes (scipy #26147)
    import os

    z = np.load(os.path.join(os.path.dirname(__file__), "data", "bottleneck_hard_pair_h0.npz"))
    a, b = z["a"], z["b"]
    d = bottleneck_distance(a, b)
    fa, fb = a[np.isfinite(a[:, 1])], b[np.isfinite(b[:, 1])]
    assert np.isinf(a[:, 1]).sum() == np.isinf(b[:, 1]).sum() == 1
    inf_part = abs(a[np.isinf(a[:, 1]), 0][0] - b[np.isinf(b[:, 1]), 0][0])
    assert d >= inf_part
    if d > inf_part:  # the finite part decides: feasible at d, not just below
        assert _perfect_matching_within(fa, fb, d)
        assert not _perfect_matching_within(fa, fb, np.nextafter(d, 0.0) - 1e-12)
