"""Persistent homology of a point cloud and distances between persistence diagrams.

A diagram is an ``(k, 2)`` float64 array of ``(birth, death)`` rows; an infinite death is
``np.inf`` (the one essential H0 class of a connected Vietoris-Rips complex). Conventions:

* **Filtration**: Vietoris-Rips on the pairwise distances (ripser, Bauer 2021; or giotto-ph,
  Perez et al. 2021). H0 is always computed *exactly on all points* from a minimum spanning tree
  (Prim's algorithm on the distance matrix; the H0 deaths of a Rips filtration are the MST edge
  lengths), so ``n_landmarks`` only subsamples the points used for H1 and above.
* **Summaries** (finite bars only; the infinite bar is reported by count, never summed):
  total persistence ``sum (d - b)^p``; persistent entropy ``-sum (l_i / L) log(l_i / L)`` (natural
  log; Chintakunta et al. 2015, Atienza et al. 2019); Betti curve ``#{b <= t < d}``.
* **Distances**: Wasserstein ``W_p`` with the L-infinity ground metric and matching to the diagonal
  (Cohen-Steiner et al. 2010) and bottleneck (``p = inf``). Infinite bars are matched among
  themselves by sorted birth; when the two diagrams hold different numbers of infinite bars the
  distance is ``inf`` (persim #105 silently drops them and returns a finite number).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import numpy as np

from topomon._validate import check_int, check_optional_int
from topomon.metrics.spectral import _check_points

__all__ = [
    "persistence_diagrams",
    "total_persistence",
    "persistent_entropy",
    "max_persistence",
    "betti_curve",
    "wasserstein_distance",
    "bottleneck_distance",
    "topology_metrics",
]

_METRICS = ("euclidean", "cosine", "manhattan", "chebyshev")
_ENGINES = ("auto", "ripser", "giotto")
_DENSE_LIMIT = 8192  # above this many points H0 is computed row by row (O(n d) memory)
_NAN = float("nan")


# ----------------------------------------------------------------------------- distances
def _cdist(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Pairwise distances ``(len(a), len(b))``; euclidean via BLAS with exact small entries."""
    if metric == "euclidean":
        sa = np.einsum("ij,ij->i", a, a)
        sb = np.einsum("ij,ij->i", b, b)
        d2 = a @ b.T
        d2 *= -2.0
        d2 += sa[:, None]
        d2 += sb[None, :]
        np.maximum(d2, 0.0, out=d2)
        # The Gram trick loses relative precision on short distances (duplicates come out as
        # ~1e-8 instead of 0): recompute those entries exactly (row blocks bound the temporaries).
        for start in range(0, len(a), 1024):
            blk = d2[start : start + 1024]
            ii, jj = np.nonzero(blk <= 1e-6 * (sa[start : start + 1024, None] + sb[None, :]))
            if ii.size:
                diff = a[start + ii] - b[jj]
                blk[ii, jj] = np.einsum("ij,ij->i", diff, diff)
        np.sqrt(d2, out=d2)
        return d2
    if metric == "cosine":  # 1 - cos(u, v) = |u - v|^2 / 2 for unit vectors: exact 0 on duplicates
        ua = a / np.linalg.norm(a, axis=1, keepdims=True)
        ub = b / np.linalg.norm(b, axis=1, keepdims=True)
        return np.clip(_cdist(ua, ub, "euclidean") ** 2 / 2.0, 0.0, 2.0)
    from scipy.spatial.distance import cdist

    name = "cityblock" if metric == "manhattan" else metric
    return cdist(a, b, metric=name)


def _pairwise(x: np.ndarray, metric: str) -> np.ndarray:
    d = _cdist(x, x, metric)
    d = np.minimum(d, d.T)  # exactly symmetric
    np.fill_diagonal(d, 0.0)
    return d


def _mst_deaths(x: np.ndarray, metric: str, dist: np.ndarray | None) -> np.ndarray:
    """Edge lengths of a minimum spanning tree of the complete graph (Prim, O(n^2) time)."""
    n = x.shape[0]
    in_tree = np.zeros(n, dtype=bool)
    in_tree[0] = True

    def row(i: int) -> np.ndarray:
        return dist[i] if dist is not None else _cdist(x[i : i + 1], x, metric)[0]

    best = row(0).copy()
    best[0] = np.inf
    out = np.empty(n - 1)
    for t in range(n - 1):
        masked = np.where(in_tree, np.inf, best)
        j = int(np.argmin(masked))
        out[t] = masked[j]
        in_tree[j] = True
        np.minimum(best, row(j), out=best)
    return np.sort(out)


def _greedy_landmarks(x: np.ndarray, m: int, metric: str, dist: np.ndarray | None, seed: int) -> np.ndarray:
    """Greedy max-min (farthest point) landmarks, as ripser's ``n_perm``; the seed picks the start."""
    n = x.shape[0]

    def row(i: int) -> np.ndarray:
        return dist[i] if dist is not None else _cdist(x[i : i + 1], x, metric)[0]

    idx = np.empty(m, dtype=np.int64)
    idx[0] = int(np.random.default_rng(seed).integers(n))
    mind = row(int(idx[0])).copy()
    for t in range(1, m):
        idx[t] = int(np.argmax(mind))
        np.minimum(mind, row(int(idx[t])), out=mind)
    return idx


def _pca_project(x: np.ndarray, k: int) -> np.ndarray:
    """Centred points projected on their top ``k`` principal components: ``(n, k)``.

    numpy's full ``eigh`` rather than scipy's subset one: at these sizes (d or n in the hundreds)
    both take milliseconds, and importing ``scipy.linalg`` costs about 0.16 s of CPU in every worker
    process, which competes with training on a CPU (bench/RESULTS.md).
    """
    n, d = x.shape
    xc = x - x.mean(axis=0)
    if d <= n:
        c = xc.T @ xc
        _, v = np.linalg.eigh((c + c.T) * 0.5)
        return np.asarray(xc @ v[:, ::-1][:, :k])
    k = min(k, n)
    g = xc @ xc.T
    w, u = np.linalg.eigh((g + g.T) * 0.5)
    w, u = w[::-1][:k], u[:, ::-1][:, :k]
    return np.asarray(u * np.sqrt(np.maximum(w, 0.0)))


def _run_engine(dist: np.ndarray, maxdim: int, engine: str, n_threads: int) -> list[np.ndarray]:
    if engine == "giotto":
        try:
            from gph import ripser_parallel
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "engine='giotto' needs giotto-ph: pip install 'topomon[fast]' (or giotto-ph)"
            ) from e
        res = ripser_parallel(dist, maxdim=maxdim, metric="precomputed", n_threads=n_threads)
        return _as_diagrams(res["dgms"])
    return _ripser_dm(dist, maxdim)


def _as_diagrams(dgms: Any) -> list[np.ndarray]:
    """An engine's diagrams as ``(k, 2)`` float64 arrays."""
    return [np.asarray(d, dtype=np.float64).reshape(-1, 2) for d in dgms]


def _ripser_dm(dist: np.ndarray, maxdim: int) -> list[np.ndarray]:
    """Persistence by ripser of a dense distance matrix (zero diagonal), through its compiled core.

    ``ripser.ripser(dist, distance_matrix=True)`` hands the same float32 condensed (upper-triangle,
    row-major) distances to the same function; importing the ``ripser`` package first imports
    scikit-learn, about 1 s of CPU in every worker process (which competes with training on a CPU).
    Builds without the top-level ``pyRipser`` module use the public function.
    """
    try:
        from pyRipser import doRipsFiltrationDM
    except ImportError:  # pragma: no cover - depends on how ripser was built
        from ripser import ripser

        return _as_diagrams(ripser(dist, maxdim=maxdim, distance_matrix=True)["dgms"])
    # scipy's condensed form (upper triangle, row-major) without importing scipy.spatial (0.15 s)
    condensed = np.ascontiguousarray(dist[np.triu_indices(len(dist), 1)], dtype=np.float32)
    res = doRipsFiltrationDM(condensed, int(maxdim), np.inf, 2, False)
    return _as_diagrams(res["births_and_deaths_by_dim"])


def persistence_diagrams(
    x: np.ndarray,
    *,
    maxdim: int = 1,
    n_landmarks: int | None = None,
    pca_dim: int | None = None,
    metric: str = "euclidean",
    engine: str = "auto",
    seed: int = 0,
    n_threads: int = 1,
) -> list[np.ndarray]:
    """Vietoris-Rips persistence diagrams H0..H_maxdim of a point cloud.

    Pipeline: (1) with ``pca_dim < d``, project the centred points on their top ``pca_dim``
    principal components; (2) H0 exactly on all points from a minimum spanning tree (zero-length
    bars omitted, one infinite bar; equal to ripser's H0); (3) for ``maxdim >= 1``, if
    ``n_landmarks`` is set and smaller than n, keep ``n_landmarks`` greedy max-min landmarks (the
    farthest-point sampling of ripser's ``n_perm``; ``seed`` picks the first landmark), and run
    ripser (or giotto-ph) on their distance matrix for H1..H_maxdim.

    Euclidean distances are translation, rotation and permutation invariant and scale linearly
    (so do the diagrams); ``"cosine"`` is not translation invariant.

    Args:
        x: ``(n, d)`` points, n >= 2, d >= 1, finite (clean them with ``prepare_points`` first).
        maxdim: highest homology dimension, >= 0 (H2 and above get expensive fast).
        n_landmarks: number of landmarks for H1+, >= 2, or None for all points.
        pca_dim: number of principal components to keep, >= 1, or None for no projection.
        metric: one of ``"euclidean"``, ``"cosine"``, ``"manhattan"``, ``"chebyshev"``.
        engine: ``"auto"`` (= ripser), ``"ripser"`` or ``"giotto"`` (giotto-ph, optional).
        seed: non-negative int; chooses the first landmark.
        n_threads: threads for giotto-ph (ignored by ripser).

    Returns:
        ``[H0, H1, ..., H_maxdim]``, each a ``(k, 2)`` float64 array of (birth, death), sorted by
        death within H0.

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: on NaN/Inf (preprocess first), fewer than 2 points, no dimensions, or an
            invalid option (the message names it and the allowed values).
        ImportError: if ``engine="giotto"`` and giotto-ph is not installed.

    Example:
        >>> t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        >>> h0, h1 = persistence_diagrams(np.c_[np.cos(t), np.sin(t)])
        >>> len(h1), bool(h1[0, 1] - h1[0, 0] > 1)
        (1, True)
    """
    maxdim_i = check_int("maxdim", maxdim, 0)
    n_land = check_optional_int("n_landmarks", n_landmarks, 2)
    k_pca = check_optional_int("pca_dim", pca_dim, 1)
    seed_i = check_int("seed", seed, 0)
    n_thr = check_int("n_threads", n_threads, 1)
    if metric not in _METRICS:
        raise ValueError(f"`metric` must be one of {_METRICS}, got {metric!r}")
    if engine not in _ENGINES:
        raise ValueError(f"`engine` must be one of {_ENGINES}, got {engine!r}")
    pts = _check_points(x)
    n, d = pts.shape
    if k_pca is not None and k_pca < d:
        pts = _pca_project(pts, k_pca)
    elif metric == "euclidean":
        pts = pts - pts.mean(axis=0)  # distances unchanged; smaller norms, better precision
    if metric == "cosine" and np.any(np.linalg.norm(pts, axis=1) == 0):
        raise ValueError("`x` has zero-norm rows (after any PCA), for which the cosine distance is undefined")

    dist = _pairwise(pts, metric) if n <= _DENSE_LIMIT else None
    deaths = _mst_deaths(pts, metric, dist)
    deaths = deaths[deaths > 0]
    h0 = np.column_stack([np.zeros(deaths.size + 1), np.append(deaths, np.inf)])
    if maxdim_i == 0:
        return [h0]

    if n_land is not None and n_land < n:
        idx = np.sort(_greedy_landmarks(pts, n_land, metric, dist, seed_i))
        sub = dist[np.ix_(idx, idx)] if dist is not None else _pairwise(pts[idx], metric)
    else:
        if dist is None:
            warnings.warn(
                f"H1 on {n} points without `n_landmarks` needs O(n^2) memory and may not finish; "
                "set n_landmarks (e.g. 512)",
                RuntimeWarning,
                stacklevel=2,
            )
            dist = _pairwise(pts, metric)
        sub = dist
    higher = _run_engine(sub, maxdim_i, "ripser" if engine == "auto" else engine, n_thr)[1:]
    return [h0, *higher]


# ----------------------------------------------------------------------------- summaries
def _check_dgm(dgm: np.ndarray, name: str = "dgm") -> np.ndarray:
    arr = np.asarray(dgm)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"`{name}` must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.size == 0:
        return np.empty((0, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"`{name}` must have shape (k, 2) (birth, death), got {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"`{name}` contains NaN")
    if not np.isfinite(arr[:, 0]).all():
        raise ValueError(f"`{name}` births must be finite")
    if (arr[:, 1] < arr[:, 0]).any():
        raise ValueError(f"`{name}` has a bar with death < birth")
    return arr


def _finite_lengths(dgm: np.ndarray) -> np.ndarray:
    arr = _check_dgm(dgm)
    fin = np.isfinite(arr[:, 1])
    return arr[fin, 1] - arr[fin, 0]


def total_persistence(dgm: np.ndarray, p: float = 1.0) -> float:
    """Total persistence ``sum (death - birth)^p`` over the finite bars.

    Infinite bars are excluded (their length is infinite; they are counted, not summed).

    Args:
        dgm: ``(k, 2)`` diagram.
        p: positive finite exponent.

    Returns:
        A float >= 0 (0.0 for an empty diagram).

    Raises:
        ValueError: on an invalid diagram or ``p``.

    Example:
        >>> total_persistence(np.array([[0, 1.0], [0, 2.0], [0, np.inf]]))
        3.0
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0 < p < np.inf):
        raise ValueError(f"`p` must be a positive finite number, got {p!r}")
    return float(np.sum(_finite_lengths(dgm) ** p))


def persistent_entropy(dgm: np.ndarray) -> float:
    """Persistent entropy ``-sum (l_i / L) log(l_i / L)`` (natural log) of the finite bars.

    Only finite bars with positive length enter (``L`` is their total length). ``n`` equal bars
    give ``log n``; the value is at most ``log`` of the number of bars.

    Args:
        dgm: ``(k, 2)`` diagram.

    Returns:
        The entropy in nats; NaN when no finite bar has positive length (it is undefined, not 0).

    Raises:
        ValueError: on an invalid diagram.
    """
    lengths = _finite_lengths(dgm)
    lengths = lengths[lengths > 0]
    if lengths.size == 0:
        return _NAN
    q = lengths / lengths.sum()
    return float(-np.sum(q * np.log(q)))


def max_persistence(dgm: np.ndarray) -> float:
    """Length of the longest finite bar.

    Args:
        dgm: ``(k, 2)`` diagram.

    Returns:
        A float >= 0; 0.0 when the diagram has no finite bar.

    Raises:
        ValueError: on an invalid diagram.
    """
    lengths = _finite_lengths(dgm)
    return float(lengths.max()) if lengths.size else 0.0


def betti_curve(dgm: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Betti numbers ``beta(t) = #{bars with birth <= t < death}`` at the given times.

    Infinite bars count at every ``t >= birth``.

    Args:
        dgm: ``(k, 2)`` diagram.
        ts: ``(m,)`` times (any order, no NaN).

    Returns:
        ``(m,)`` int64 counts.

    Raises:
        ValueError: on an invalid diagram or ``ts`` that is not 1-D or holds NaN.
    """
    arr = _check_dgm(dgm)
    t = np.asarray(ts, dtype=np.float64)
    if t.ndim != 1:
        raise ValueError(f"`ts` must be 1-D, got shape {t.shape}")
    if np.isnan(t).any():
        raise ValueError("`ts` contains NaN")
    alive = (arr[None, :, 0] <= t[:, None]) & (t[:, None] < arr[None, :, 1])
    return alive.sum(axis=1).astype(np.int64)


# ----------------------------------------------------------------------------- diagram distances
def _split(dgm: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    arr = _check_dgm(dgm, name)
    fin = np.isfinite(arr[:, 1])
    return arr[fin], np.sort(arr[~fin, 0])


def _linf_cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(a[:, None, 0] - b[None, :, 0]), np.abs(a[:, None, 1] - b[None, :, 1]))


def wasserstein_distance(d1: np.ndarray, d2: np.ndarray, p: float = 1.0) -> float:
    """Wasserstein distance ``W_p`` between two persistence diagrams.

    ``W_p = (min over matchings of sum ||u - v||_inf^p)^(1/p)``, where a point may be matched to
    its projection on the diagonal at cost ``((d - b) / 2)^p``. The finite part is solved exactly
    by ``scipy.optimize.linear_sum_assignment`` on the standard ``(n + m) x (n + m)`` augmented cost
    matrix. Infinite bars are matched among themselves by sorted birth (cost ``|b1 - b2|^p``);
    different numbers of infinite bars give ``inf``.

    Args:
        d1: ``(n, 2)`` diagram (may be empty).
        d2: ``(m, 2)`` diagram (may be empty).
        p: order, ``1 <= p < inf`` (use :func:`bottleneck_distance` for ``p = inf``).

    Returns:
        The distance (``inf`` when the infinite bars cannot be matched).

    Raises:
        ValueError: on an invalid diagram or ``p``.

    Example:
        >>> wasserstein_distance(np.array([[0.0, 2.0]]), np.empty((0, 2)))
        1.0
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (1 <= p < np.inf):
        raise ValueError(f"`p` must be a finite number >= 1, got {p!r}")
    fa, ia = _split(d1, "d1")
    fb, ib = _split(d2, "d2")
    if ia.size != ib.size:
        return float("inf")
    total = float(np.sum(np.abs(ia - ib) ** p))
    n, m = len(fa), len(fb)
    if n + m:
        diag_a = ((fa[:, 1] - fa[:, 0]) / 2.0) ** p
        diag_b = ((fb[:, 1] - fb[:, 0]) / 2.0) ** p
        cost = np.zeros((n + m, m + n))
        cost[:n, :m] = _linf_cost(fa, fb) ** p
        cost[:n, m:] = np.inf
        cost[np.arange(n), m + np.arange(n)] = diag_a
        cost[n:, :m] = np.inf
        cost[n + np.arange(m), np.arange(m)] = diag_b
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cost)
        total += float(cost[rows, cols].sum())
    return float(total ** (1.0 / p))


def _bottleneck_finite(fa: np.ndarray, fb: np.ndarray) -> float:
    from scipy.optimize import linear_sum_assignment

    n, m = len(fa), len(fb)
    diag_a = (fa[:, 1] - fa[:, 0]) / 2.0
    diag_b = (fb[:, 1] - fb[:, 0]) / 2.0
    if n == 0 or m == 0:
        return float(max(diag_a.max(initial=0.0), diag_b.max(initial=0.0)))
    cost = _linf_cost(fa, fb)
    upper = max(diag_a.max(), diag_b.max())  # everything to the diagonal is always a matching
    lower = max(np.minimum(diag_a, cost.min(axis=1)).max(), np.minimum(diag_b, cost.min(axis=0)).max())
    cand = np.unique(np.concatenate([cost.ravel(), diag_a, diag_b]))
    cand = cand[(cand >= lower) & (cand <= upper)]
    # the augmented matching problem: a to b (cost), a to its diagonal copy, b's diagonal copy to b,
    # diagonal to diagonal (free); other pairs are forbidden
    big = np.full((n + m, m + n), np.inf)
    big[:n, :m] = cost
    big[np.arange(n), m + np.arange(n)] = diag_a
    big[n + np.arange(m), np.arange(m)] = diag_b
    big[n:, m:] = 0.0

    def feasible(t: float) -> bool:
        # a perfect matching using only edges <= t exists iff the min-cost assignment of the 0/1
        # "edge > t" matrix costs 0. linear_sum_assignment (Jonker-Volgenant) is polynomial;
        # scipy's maximum_bipartite_matching can take exponential time on these graphs (scipy
        # #26147: it did not return within minutes on two 255-bar H0 diagrams of SmolLM2 states)
        bad = (big > t).astype(np.float64)
        rows, cols = linear_sum_assignment(bad)
        return bool(bad[rows, cols].sum() == 0)

    lo, hi = 0, len(cand) - 1  # cand[hi] == upper is feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(float(cand[mid])):
            hi = mid
        else:
            lo = mid + 1
    return float(cand[lo])


def bottleneck_distance(d1: np.ndarray, d2: np.ndarray) -> float:
    """Exact bottleneck distance ``W_inf`` between two persistence diagrams.

    Binary search over the candidate values (pairwise L-infinity costs and distances to the
    diagonal) with a perfect-matching test on the augmented bipartite graph, by
    ``scipy.optimize.linear_sum_assignment`` on the 0/1 matrix of edges above the threshold.
    Infinite bars are matched among themselves by sorted birth (cost ``|b1 - b2|``); different
    numbers of infinite bars give ``inf``.

    Args:
        d1: ``(n, 2)`` diagram (may be empty).
        d2: ``(m, 2)`` diagram (may be empty).

    Returns:
        The distance (``inf`` when the infinite bars cannot be matched).

    Raises:
        ValueError: on an invalid diagram.

    Example:
        >>> bottleneck_distance(np.array([[0.0, 2.0], [0.0, np.inf]]), np.array([[0.5, np.inf]]))
        1.0
    """
    fa, ia = _split(d1, "d1")
    fb, ib = _split(d2, "d2")
    if ia.size != ib.size:
        return float("inf")
    inf_part = float(np.abs(ia - ib).max(initial=0.0))
    return max(inf_part, _bottleneck_finite(fa, fb))


# ----------------------------------------------------------------------------- one call per layer
def topology_metrics(x: np.ndarray, **persistence_kwargs: Any) -> tuple[dict[str, float], list[np.ndarray]]:
    """Persistence summaries of one point cloud, plus its diagrams.

    Args:
        x: ``(n, d)`` points (see :func:`persistence_diagrams`).
        **persistence_kwargs: forwarded to :func:`persistence_diagrams` (``maxdim``, ``n_landmarks``,
            ``pca_dim``, ``metric``, ``engine``, ``seed``, ``n_threads``).

    Returns:
        ``(metrics, diagrams)``: metrics ``h0_total_persistence``, ``h1_total_persistence``
        (finite bars, p = 1), ``h0_entropy``, ``h1_entropy`` (nats; NaN without a positive finite
        bar), ``h1_max_persistence`` (0.0 without a bar), ``h1_count`` (number of finite H1 bars);
        the H1 entries are NaN when ``maxdim=0``.

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: as :func:`persistence_diagrams`.
    """
    dgms = persistence_diagrams(x, **persistence_kwargs)
    h0 = dgms[0]
    out = {
        "h0_total_persistence": total_persistence(h0),
        "h0_entropy": persistent_entropy(h0),
        "h1_total_persistence": _NAN,
        "h1_entropy": _NAN,
        "h1_max_persistence": _NAN,
        "h1_count": _NAN,
    }
    if len(dgms) > 1:
        h1 = dgms[1]
        out["h1_total_persistence"] = total_persistence(h1)
        out["h1_entropy"] = persistent_entropy(h1)
        out["h1_max_persistence"] = max_persistence(h1)
        out["h1_count"] = float(np.isfinite(h1[:, 1]).sum())
    return out, dgms
