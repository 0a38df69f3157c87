"""Zigzag persistence across layers, its descriptors, and layer-pruning hints.

Follows Gardinazzi et al., "Persistent topological features in large language models" (ICLR 2025
submission, ICML 2025; code: github.com/YuriGardinazzi/conferenceProject, files
``src/zigzag/zigzag_DL.py``, ``src/plots/post_process.py``, ``src/benchmark/benchmark.py``):

* **Complexes.** Per layer, the clique (flag) complex of the symmetrised k-nearest-neighbour graph
  of the last-token representations of a fixed text set (:func:`knn_complex`). Vertices are the
  text indices, shared by all layers, so consecutive complexes can be intersected.
* **Zigzag.** ``K_0 ⊇ K_0∩K_1 ⊆ K_1 ⊇ K_1∩K_2 ⊆ ... ⊆ K_{L-1}``, barcodes in H0 and H1
  (:func:`zigzag_barcodes`). The authors ran FastZigzag (``pyfzz``); topomon computes the same
  barcodes with its own engine (``engine="builtin"``, see ``_zigzag_engine``), checked in the tests
  against dionysus and against an independent FastZigzag reduction.
* **Descriptors** (:func:`zigzag_descriptors`), **persistence similarity**
  (:func:`persistence_similarity`) and the **pruning rule** (:func:`prune_candidates`) follow the
  authors' post-processing code; each docstring says which function it mirrors.

Position convention (used by :attr:`ZigzagResult.bars`): layer ``l`` sits at position ``l`` and
the intersection ``K_l ∩ K_{l+1}`` at the half-integer ``l + 0.5``. A bar ``(b, d)`` is alive at
every position ``q`` with ``b <= q < d`` (steps of 0.5); ``d = inf`` means alive at the last layer.
Layer units (:meth:`ZigzagResult.layer_bars`) keep what the layers see: ``[ceil(b), ceil(d))``,
the layers where the class is alive; bars that live only inside one intersection are dropped
(the authors' "effective persistence image" does the same), and an infinite death becomes ``L``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from topomon._validate import check_int

__all__ = [
    "ZigzagResult",
    "knn_complex",
    "zigzag_barcodes",
    "zigzag_descriptors",
    "persistence_similarity",
    "prune_scores",
    "prune_candidates",
    "adjacent_layer_similarity",
]

_ENGINES = ("auto", "builtin", "dionysus")
_NORMALIZE = ("row", "counts", "geometric")


# ----------------------------------------------------------------------------- validation
def _check_cloud(points: Any, name: str) -> np.ndarray:
    arr = np.asarray(points)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise TypeError(f"`{name}` must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D (n_points, dim), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"`{name}` must have at least one feature column, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return arr.astype(np.float64, copy=False)


def _check_layers(layers: Any, k: int) -> list[np.ndarray]:
    if isinstance(layers, np.ndarray) and layers.ndim == 3:
        layers = list(layers)
    if not isinstance(layers, Sequence) or isinstance(layers, (str, bytes)):
        raise TypeError(f"`layers` must be a sequence of (n, d) arrays, got {type(layers).__name__}")
    if len(layers) == 0:
        raise ValueError("`layers` must hold at least one (n, d) array, got an empty sequence")
    clouds = [_check_cloud(x, f"layers[{i}]") for i, x in enumerate(layers)]
    n = clouds[0].shape[0]
    for i, c in enumerate(clouds):
        if c.shape[0] != n:
            raise ValueError(
                f"every layer must hold the same n points (row i = text i in every layer): "
                f"layers[0] has {n} rows, layers[{i}] has {c.shape[0]}"
            )
    if n <= k:
        raise ValueError(f"`k` must be smaller than the number of points: k={k}, n={n}")
    return clouds


# ----------------------------------------------------------------------------- complexes
def knn_complex(points: np.ndarray, k: int, maxdim: int = 2) -> list[tuple[int, ...]]:
    """The clique complex of the symmetrised kNN graph of a point cloud, up to dimension ``maxdim``.

    Each point is joined to its ``k`` nearest other points (Euclidean distance; ties broken by the
    lower index); the graph keeps an edge when either endpoint chose the other, as in the authors'
    ``sklearn.neighbors.kneighbors_graph`` + simplex-tree insertion. Simplices are the cliques.

    Args:
        points: ``(n, d)`` finite real array; row ``i`` is text ``i`` (vertex ``i``).
        k: neighbours per point, ``1 <= k < n``.
        maxdim: largest simplex dimension, 0 (vertices), 1 (edges) or 2 (triangles: enough for H1).

    Returns:
        Vertex tuples sorted by dimension, then lexicographically:
        ``[(0,), ..., (a, b), ..., (a, b, c), ...]``.

    Raises:
        TypeError: for a non-numeric ``points`` or non-int ``k``/``maxdim``.
        ValueError: for a wrong shape, non-finite values, ``k`` out of ``[1, n - 1]`` or ``maxdim``
            outside 0..2.

    Example:
        >>> square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
        >>> knn_complex(square, k=2)  # a 4-cycle: no triangle fills the loop
        [(0,), (1,), (2,), (3,), (0, 1), (0, 3), (1, 2), (2, 3)]
    """
    from topomon.metrics._zigzag_engine import knn_edge_keys, triangle_keys

    k = check_int("k", k, 1, type_error=TypeError)
    maxdim = check_int("maxdim", maxdim, 0, high=2, type_error=TypeError)
    x = _check_cloud(points, "points")
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"`k` must be smaller than the number of points: k={k}, n={n}")
    out: list[tuple[int, ...]] = [(v,) for v in range(n)]
    if maxdim == 0:
        return out
    edges = knn_edge_keys(x, k)
    out += [(int(e // n), int(e % n)) for e in edges.tolist()]
    if maxdim == 2:
        for t in triangle_keys(edges, n).tolist():
            ab, c = divmod(t, n)
            out.append((ab // n, ab % n, c))
    return out


# ----------------------------------------------------------------------------- barcodes
@dataclass
class ZigzagResult:
    """Zigzag barcodes of a sequence of layers.

    Attributes:
        n_layers: number of layers ``L``.
        n_points: number of texts (vertices) ``n``.
        k: neighbours of the kNN graphs.
        maxdim: largest homology dimension computed (0 or 1).
        engine: the engine that computed the bars (``"builtin"`` or ``"dionysus"``).
        bars: homology dimension -> ``(m, 2)`` float array of ``(birth, death)`` positions in
            half-layer units (module docstring); ``death = inf`` for classes alive at the last layer.
            Sorted by birth, then death.
    """

    n_layers: int
    n_points: int
    k: int
    maxdim: int
    engine: str
    bars: dict[int, np.ndarray] = field(default_factory=dict)

    def layer_bars(self, dim: int = 1) -> np.ndarray:
        """Bars in layer units: ``(m, 2)`` int array of ``[birth_layer, death_layer)``.

        A bar ``[b, d)`` is alive at layers ``b .. d - 1``; ``d = n_layers`` means alive at the last
        layer. Bars alive only inside one intersection are dropped.

        Raises:
            ValueError: when ``dim`` was not computed.
        """
        bars = self._bars(dim)
        birth = np.ceil(bars[:, 0])
        death = np.where(np.isinf(bars[:, 1]), self.n_layers, np.ceil(bars[:, 1]))
        keep = death > birth
        return np.stack([birth[keep], death[keep]], axis=1).astype(np.int64)

    def betti(self, dim: int = 1) -> np.ndarray:
        """Number of classes alive at each layer: ``(n_layers,)`` int array (the layer's Betti number)."""
        lb = self.layer_bars(dim)
        layers = np.arange(self.n_layers)
        return ((lb[:, :1] <= layers) & (layers < lb[:, 1:])).sum(axis=0)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able form; infinite deaths become ``None``."""
        return {
            "n_layers": self.n_layers,
            "n_points": self.n_points,
            "k": self.k,
            "maxdim": self.maxdim,
            "engine": self.engine,
            "bars": {
                str(d): [[float(b), None if math.isinf(e) else float(e)] for b, e in arr.tolist()]
                for d, arr in self.bars.items()
            },
        }

    def _bars(self, dim: int) -> np.ndarray:
        if dim not in self.bars:
            raise ValueError(f"`dim` must be one of the computed dimensions {sorted(self.bars)}, got {dim!r}")
        return self.bars[dim]


def zigzag_barcodes(
    layers: Sequence[np.ndarray], k: int = 10, maxdim: int = 1, engine: str = "auto"
) -> ZigzagResult:
    """Zigzag barcodes in H0..H``maxdim`` of the kNN clique complexes of a sequence of layers.

    Computes the barcode of ``K_0 ⊇ K_0∩K_1 ⊆ K_1 ⊇ ... ⊆ K_{L-1}`` over GF(2), where ``K_l`` is
    :func:`knn_complex` of ``layers[l]`` (Gardinazzi et al.; the paper used FastZigzag).

    Args:
        layers: ``L`` arrays of shape ``(n, d_l)``; row ``i`` of every layer is text ``i`` (the
            widths ``d_l`` may differ).
        k: neighbours per point (the paper used 4-10), ``1 <= k < n``.
        maxdim: largest homology dimension, 0 or 1.
        engine: ``"builtin"`` (topomon's engine, pure Python/numpy/scipy), ``"dionysus"``
            (``dionysus.zigzag_homology_persistence``, needs ``pip install dionysus==2.0.10``; 10-100x
            slower) or ``"auto"`` (= ``"builtin"``).

    Returns:
        A :class:`ZigzagResult` (bars in half-layer positions; see the module docstring).

    Raises:
        TypeError: for non-numeric layers or non-int ``k``/``maxdim``.
        ValueError: for an empty sequence, layers with different row counts, non-finite values, ``k``
            outside ``[1, n - 1]``, ``maxdim`` outside 0..1 or an unknown engine.
        ImportError: for ``engine="dionysus"`` when dionysus is not installed.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(30, 3))
        >>> res = zigzag_barcodes([x, x, x], k=4, maxdim=0)
        >>> res.layer_bars(0).tolist()  # one component alive at every layer
        [[0, 3]]
    """
    from topomon.metrics._zigzag_engine import dionysus_intervals, knn_edge_keys, zigzag_intervals

    k = check_int("k", k, 1, type_error=TypeError)
    maxdim = check_int("maxdim", maxdim, 0, high=1, type_error=TypeError)
    if engine not in _ENGINES:
        raise ValueError(f"`engine` must be one of {', '.join(map(repr, _ENGINES))}, got {engine!r}")
    clouds = _check_layers(layers, k)
    n = clouds[0].shape[0]
    edge_keys = [knn_edge_keys(x, k) for x in clouds]
    used = "dionysus" if engine == "dionysus" else "builtin"
    compute = dionysus_intervals if used == "dionysus" else zigzag_intervals
    intervals = compute(edge_keys, n, maxdim)
    bars = {}
    for dim, ivs in intervals.items():
        arr = np.array(
            [[b / 2.0, math.inf if d is None else (d + 1) / 2.0] for b, d in ivs], dtype=np.float64
        ).reshape(-1, 2)
        order = np.lexsort((arr[:, 1], arr[:, 0]))
        bars[dim] = arr[order]
    return ZigzagResult(n_layers=len(clouds), n_points=n, k=k, maxdim=maxdim, engine=used, bars=bars)


# ----------------------------------------------------------------------------- similarity
def _as_layer_bars(bars: ZigzagResult | np.ndarray, n_layers: int | None, dim: int) -> tuple[np.ndarray, int]:
    if isinstance(bars, ZigzagResult):
        if n_layers is not None and n_layers != bars.n_layers:
            raise ValueError(f"`n_layers` ({n_layers}) differs from the result's n_layers ({bars.n_layers})")
        return bars.layer_bars(dim), bars.n_layers
    if n_layers is None:
        raise ValueError("`n_layers` is required when `bars` is an array of layer bars")
    n_layers = check_int("n_layers", n_layers, 1, type_error=TypeError)
    arr = np.asarray(bars)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64), n_layers
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"`bars` must be an (m, 2) int array of [birth, death) layers, got {arr.dtype} {arr.shape}"
        )
    if arr.min() < 0 or arr.max() > n_layers or np.any(arr[:, 1] <= arr[:, 0]):
        raise ValueError(f"`bars` must satisfy 0 <= birth < death <= n_layers={n_layers}")
    return arr.astype(np.int64), n_layers


def persistence_similarity(
    bars: ZigzagResult | np.ndarray,
    n_layers: int | None = None,
    *,
    dim: int = 1,
    normalize: str = "row",
) -> np.ndarray:
    """Persistence similarity of layers: how many features survive, unchanged, from layer i to layer j.

    ``C[i, j]`` counts the ``dim``-bars alive at every layer between ``i`` and ``j`` (both
    included); ``C[i, i]`` is the Betti number of layer ``i``. This is the authors' ``find_ph_sim``
    on the effective persistence image. Normalisations:

    * ``"row"`` (default; the authors' ``inter_layer_persistance`` and the PHSim curves of the
      paper): ``S[i, j] = C[i, j] / C[i, i]``, the fraction of layer ``i``'s features that persist
      to layer ``j``. Ones on the diagonal, values in [0, 1], non-increasing away from the diagonal;
      not symmetric (``S[i, j] C[i, i] = S[j, i] C[j, j]``). Rows of layers without features are NaN.
    * ``"counts"``: ``C`` itself (symmetric).
    * ``"geometric"``: ``C[i, j] / sqrt(C[i, i] C[j, j])`` (symmetric, ones on the diagonal; NaN
      where a layer has no features). Not in the paper; offered for symmetric heatmaps.

    Args:
        bars: a :class:`ZigzagResult`, or an ``(m, 2)`` int array of ``[birth, death)`` layer bars.
        n_layers: number of layers ``L``; required with an array, checked against a result.
        dim: homology dimension (the paper's pruning used H1).
        normalize: ``"row"``, ``"counts"`` or ``"geometric"``.

    Returns:
        ``(L, L)`` float array.

    Raises:
        ValueError: for an unknown ``normalize``, a dimension that was not computed, inconsistent
            ``n_layers`` or malformed bars.

    Example:
        >>> persistence_similarity(np.array([[0, 3], [1, 2]]), n_layers=3, normalize="counts")
        array([[1., 1., 1.],
               [1., 2., 1.],
               [1., 1., 1.]])
    """
    if normalize not in _NORMALIZE:
        raise ValueError(f"`normalize` must be one of {', '.join(map(repr, _NORMALIZE))}, got {normalize!r}")
    lb, n = _as_layer_bars(bars, n_layers, dim)
    layers = np.arange(n)
    # C[i, j] for i <= j: birth <= i and death > j.
    born = (lb[:, :1] <= layers).astype(np.float64)  # (m, L): born by layer i
    alive_past = (lb[:, 1:] > layers).astype(np.float64)  # (m, L): still alive at layer j
    counts = born.T @ alive_past
    upper = np.triu(counts)
    counts = upper + np.triu(upper, 1).T
    if normalize == "counts":
        return counts
    diag = np.diag(counts).copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        if normalize == "row":
            return np.where(diag[:, None] > 0, counts / np.where(diag > 0, diag, 1.0)[:, None], np.nan)
        scale = np.sqrt(np.outer(diag, diag))
        return np.where(scale > 0, counts / np.where(scale > 0, scale, 1.0), np.nan)


def zigzag_descriptors(result: ZigzagResult, *, weight_power: float = 1.0) -> dict[str, np.ndarray]:
    """Per-layer descriptors of a zigzag barcode, for each computed homology dimension ``p``.

    Keys (each an ``(L,)`` float array, suffix ``_h{p}``):

    * ``betti_h{p}``: classes alive at each layer.
    * ``births_h{p}``: classes born at each layer (layer 0 counts every class present at the start).
    * ``births_relative_frequency_h{p}``: ``births / total births`` (sums to 1; NaN if there is no
      bar). The authors' notebook function ``pi_hist`` normalises a births histogram to 1 the same
      way (there optionally weighted by ``persistence^w``; the paper's exact weighting was not
      available to us, so the plain count is used).
    * ``births_rate_h{p}``: ``births / betti`` at the layer, the share of the layer's features
      that are new (NaN where the layer has none).
    * ``inter_layer_persistence_h{p}``: the authors' weighted inter-layer persistence
      ``sum_j S[i, j] |i - j|^w / sum_j |i - j|^w`` with ``S`` the row-normalised
      :func:`persistence_similarity` and ``w = weight_power`` (their notebooks use 1): how far, in
      layers, the features of layer ``i`` persist. NaN where the layer has no feature (the authors
      wrote 0 there) or when ``L = 1``.

    Args:
        result: a :class:`ZigzagResult`.
        weight_power: exponent ``w >= 0`` of the distance weights.

    Returns:
        Name -> ``(L,)`` float array.

    Raises:
        TypeError: when ``result`` is not a :class:`ZigzagResult`.
        ValueError: for a negative or non-finite ``weight_power``.
    """
    if not isinstance(result, ZigzagResult):
        raise TypeError(f"`result` must be a ZigzagResult, got {type(result).__name__}")
    w = float(weight_power)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"`weight_power` must be a finite number >= 0, got {weight_power!r}")
    n = result.n_layers
    dist = np.abs(np.subtract.outer(np.arange(n), np.arange(n))).astype(np.float64)
    weights = dist**w
    np.fill_diagonal(weights, 0.0)
    out: dict[str, np.ndarray] = {}
    for p in sorted(result.bars):
        lb = result.layer_bars(p)
        betti = result.betti(p).astype(np.float64)
        births = np.bincount(lb[:, 0], minlength=n)[:n].astype(np.float64)
        total = births.sum()
        sim = persistence_similarity(result, dim=p)
        with np.errstate(invalid="ignore", divide="ignore"):
            wsum = weights.sum(axis=1)
            weighted = (np.nan_to_num(sim) * weights).sum(axis=1)
            ilp = np.where(wsum > 0, weighted / np.where(wsum > 0, wsum, 1.0), np.nan)
        ilp[betti == 0] = np.nan
        out[f"betti_h{p}"] = betti
        out[f"births_h{p}"] = births
        out[f"births_relative_frequency_h{p}"] = births / total if total > 0 else np.full(n, np.nan)
        out[f"births_rate_h{p}"] = np.where(betti > 0, births / np.where(betti > 0, betti, 1), np.nan)
        out[f"inter_layer_persistence_h{p}"] = ilp
    return out


def _check_similarity(similarity: Any) -> np.ndarray:
    s = np.asarray(similarity)
    if s.dtype == np.bool_ or not np.issubdtype(s.dtype, np.number):
        raise TypeError(f"`similarity` must be a real numeric array, got dtype {s.dtype}")
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"`similarity` must be a non-empty square (L, L) array, got shape {s.shape}")
    return s.astype(np.float64, copy=False)


def prune_scores(similarity: np.ndarray) -> np.ndarray:
    """The authors' pruning score ``r_i = mean_j C[i, j] / C[j, j]`` of every layer.

    With the row-normalised similarity ``S`` of :func:`persistence_similarity`
    (``S[j, i] = C[j, i] / C[j, j]``) this is the column mean ``nanmean(S, axis=0)``: for every
    layer ``j``, the fraction of ``j``'s features that persist unchanged all the way to ``i``,
    averaged over ``j`` (``similarity_persistance`` in the authors' ``benchmark.py``). Rows of
    layers without features (NaN) are left out of the mean.

    Args:
        similarity: ``(L, L)`` row-normalised persistence similarity.

    Returns:
        ``(L,)`` float array in [0, 1]; NaN for a layer whose column is all NaN.

    Raises:
        TypeError: for a non-numeric matrix.
        ValueError: for a non-square or empty matrix.
    """
    s = _check_similarity(similarity)
    valid = ~np.isnan(s)
    col_n = valid.sum(axis=0)
    total = np.where(valid, s, 0.0).sum(axis=0)
    return np.where(col_n > 0, total / np.maximum(col_n, 1), np.nan)


def prune_candidates(similarity: np.ndarray, k: int) -> list[int]:
    """The ``k`` layers whose removal should lose least, ranked, by the authors' persistence rule.

    Layers are ranked by :func:`prune_scores` (descending; ties go to the lower index). A high score
    means the layer sits inside a stretch where the topology of the representations does not
    change, so removing it should cost little. The authors cut every layer with
    ``r_i >= 0.8-0.9 * max(r)`` (never the final-norm output); here the top ``k`` are returned.

    Args:
        similarity: ``(L, L)`` row-normalised persistence similarity (NaN rows are ignored).
        k: how many layers to return, ``1 <= k <= L``.

    Returns:
        Layer indices (positions in ``similarity``), best candidate first. Layers whose score is
        NaN rank last.

    Raises:
        TypeError: for a non-numeric matrix or non-int ``k``.
        ValueError: for a non-square matrix or ``k`` out of range.

    Example:
        >>> s = persistence_similarity(np.array([[0, 3], [1, 3], [2, 3]]), n_layers=3)
        >>> prune_candidates(s, 2)
        [2, 1]
    """
    score = prune_scores(similarity)
    n = score.shape[0]
    k = check_int("k", k, 1, high=n, type_error=TypeError)
    order = np.lexsort((np.arange(n), -np.nan_to_num(score, nan=-np.inf)))
    return [int(i) for i in order[:k]]


# ----------------------------------------------------------------------------- live signal
def adjacent_layer_similarity(layers: Sequence[np.ndarray], k: int = 10) -> np.ndarray:
    """Jaccard overlap of the kNN graphs of adjacent layers: a cheap per-capture zigzag proxy.

    ``J_l = |E_l ∩ E_{l+1}| / |E_l ∪ E_{l+1}|`` with ``E_l`` the edges of the symmetrised kNN graph
    of layer ``l`` (the 1-skeleton of :func:`knn_complex`). The zigzag joins consecutive layers
    through exactly this intersection, so ``J`` is its edge-level summary: 1 when two layers have
    the same neighbourhoods, near ``k / n`` for unrelated ones. It is invariant to rotations,
    translations and uniform scaling of each layer separately (no distance-scale calibration
    across layers is needed, unlike a bottleneck distance between persistence diagrams), and costs
    one ``n x n`` distance matrix per layer (8 layers x 256 points: a few tens of ms).

    Args:
        layers: ``L >= 2`` arrays ``(n, d_l)`` with the same texts as rows.
        k: neighbours per point, ``1 <= k < n``.

    Returns:
        ``(L - 1,)`` float array in [0, 1].

    Raises:
        TypeError / ValueError: as :func:`zigzag_barcodes`; also for fewer than two layers.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(20, 4))
        >>> adjacent_layer_similarity([x, 2.0 * x + 1.0], k=3).tolist()
        [1.0]
    """
    from topomon.metrics._zigzag_engine import knn_edge_keys

    k = check_int("k", k, 1, type_error=TypeError)
    clouds = _check_layers(layers, k)
    if len(clouds) < 2:
        raise ValueError(f"`layers` must hold at least two layers, got {len(clouds)}")
    edges = [knn_edge_keys(x, k) for x in clouds]
    out = np.empty(len(edges) - 1)
    for i in range(len(edges) - 1):
        inter = np.intersect1d(edges[i], edges[i + 1], assume_unique=True).size
        union = edges[i].size + edges[i + 1].size - inter
        out[i] = inter / union
    return out
