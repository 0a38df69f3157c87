"""Preprocessing of captured hidden states before any metric sees them.

Two pitfalls measured on real models motivate this module (see ``RESEARCH.md``):

* **Massive activations** (Sun et al. 2024, "Massive activations in large language models"): the
  first non-pad position (BOS) and a few other tokens carry hidden states whose norm is up to
  ~100x the median. A single such row collapses any covariance-based effective rank to ~1.
  :func:`token_mask` excludes the first position; :func:`prepare_points` drops rows whose norm
  exceeds a multiple of the median norm, and *counts* them (their emergence is a signal too).
* **The next tier of massive activations** (issue 25, ``docs/METRICS.md``): in a fine-tuning that
  creates massive activations, dozens of tokens sit *below* a fixed ``10 x median`` cut, all along
  the same few feature dimensions, and dominate the covariance at one capture and not the next.
  :func:`massive_part` finds the massive tokens (a robust rule on log norms: median + ``token_z``
  MADs) and the massive dimensions (peak magnitude above ``dim_factor`` x the median magnitude);
  :func:`prepare_points` removes them according to its ``treatment`` and reports their count and
  share of the variance (a signal of its own).
* **Deterministic subsampling**: topological activity between captures is only meaningful on the
  same probe tokens and the same subsample, so :func:`subsample_indices` is a pure function of
  ``(n, k, seed)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from topomon._validate import check_int

__all__ = [
    "TREATMENTS",
    "DEFAULT_TREATMENT",
    "MASSIVE_TOKEN_Z",
    "MASSIVE_TOKEN_MIN_FACTOR",
    "MASSIVE_DIM_FACTOR",
    "MassivePart",
    "massive_part",
    "token_mask",
    "Prepared",
    "prepare_points",
    "prepare_aligned",
    "subsample_indices",
]

TREATMENTS: tuple[str, ...] = ("robust", "cut", "robust_dims", "dims")
"""What :func:`prepare_points` removes before the metrics (``MonitorConfig.massive_treatment``).

* ``"robust"``: the massive tokens of :func:`massive_part` (robust rule on log norms), and any
  token above ``outlier_factor`` x the median norm;
* ``"cut"``: tokens above ``outlier_factor`` x the median norm only (topomon <= 0.x's rule);
* ``"robust_dims"``: as ``"robust"``, and the massive feature dimensions (columns) too;
* ``"dims"``: as ``"cut"``, and the massive feature dimensions.
"""

DEFAULT_TREATMENT = "robust"
"""The treatment the monitor uses unless told otherwise (chosen by measurement: docs/METRICS.md)."""

MASSIVE_TOKEN_Z = 5.0
"""A token is massive when its log norm exceeds the median log norm by this many MADs (x 1.4826) ..."""

MASSIVE_TOKEN_MIN_FACTOR = 3.0
"""... and its norm is at least this multiple of the median norm (a tight cloud flags no ordinary token)."""

MASSIVE_DIM_FACTOR = 100.0
"""A feature dimension is massive when its largest magnitude exceeds this multiple of the median
magnitude of all entries (Sun et al. 2024 call activations ~1,000x the median massive)."""


def token_mask(attention_mask: np.ndarray, *, exclude_first: bool = True) -> np.ndarray:
    """Positions of a padded batch that count as tokens for the metrics.

    Works for left and right padding alike: a position counts when its attention-mask entry is 1
    and, with ``exclude_first``, it is not the first non-pad position of its sequence (the BOS /
    massive-activation position).

    Args:
        attention_mask: ``(B, T)`` array of 0/1 (or bool) values, 1 for real tokens.
        exclude_first: drop the first non-pad position of every sequence.

    Returns:
        ``(B, T)`` bool array, True where the position counts.

    Raises:
        TypeError: if ``attention_mask`` is not numeric or bool.
        ValueError: if ``attention_mask`` is not 2-D or holds values other than 0 and 1.

    Example:
        >>> token_mask(np.array([[0, 1, 1, 1], [1, 1, 1, 0]])).astype(int).tolist()
        [[0, 0, 1, 1], [0, 1, 1, 0]]
    """
    m = np.asarray(attention_mask)
    if m.dtype != np.bool_ and not np.issubdtype(m.dtype, np.number):
        raise TypeError(f"`attention_mask` must be a numeric or bool array, got dtype {m.dtype}")
    if m.ndim != 2:
        raise ValueError(f"`attention_mask` must be 2-D (batch, time), got shape {m.shape}")
    if m.dtype != np.bool_:
        if np.issubdtype(m.dtype, np.complexfloating) or not np.all((m == 0) | (m == 1)):
            bad = m[~((m == 0) | (m == 1))]
            raise ValueError(f"`attention_mask` must hold only 0 and 1, got value {bad.flat[0]!r}")
        m = m == 1
    out = m.copy()
    if exclude_first and out.size:
        has_token = out.any(axis=1)
        first = np.argmax(out, axis=1)
        rows = np.nonzero(has_token)[0]
        out[rows, first[rows]] = False
    return out


@dataclass(frozen=True)
class MassivePart:
    """The massive part of a point cloud (:func:`massive_part`).

    Attributes:
        tokens: ``(n,)`` bool, True for a massive token (row).
        dims: ``(d,)`` bool, True for a massive feature dimension (column).
        share: the share of the cloud's variance (squared deviations from the column means, all
            rows) in the massive rows and columns, in [0, 1]; NaN when the cloud has no variance.
    """

    tokens: np.ndarray
    dims: np.ndarray
    share: float


def _check_positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not np.isfinite(float(value))
        or float(value) <= 0
    ):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")
    return float(value)


def massive_part(
    x: np.ndarray,
    *,
    token_z: float = MASSIVE_TOKEN_Z,
    token_min_factor: float = MASSIVE_TOKEN_MIN_FACTOR,
    dim_factor: float = MASSIVE_DIM_FACTOR,
) -> MassivePart:
    """Find the massive tokens and massive feature dimensions of finite points.

    A token (row) is massive when ``log ||x_i|| > median + token_z * 1.4826 * MAD`` of the rows' log
    norms *and* ``||x_i|| >= token_min_factor * median ||x||`` (the MAD of a tight cloud is tiny; the
    floor keeps its ordinary tokens). A dimension (column) is massive when ``max_i |x_ij|`` exceeds
    ``dim_factor`` x the median of all ``|x_ij|``. Scale-free: multiplying ``x`` by a constant
    changes nothing.

    Args:
        x: ``(n, d)`` finite points (:func:`prepare_points` drops non-finite rows first).
        token_z: MADs above the median log norm.
        token_min_factor: the least norm of a massive token, as a multiple of the median norm.
        dim_factor: the least peak magnitude of a massive dimension, as a multiple of the median
            magnitude.

    Returns:
        A :class:`MassivePart`.

    Raises:
        ValueError: if ``x`` is not 2-D or a threshold is not a positive finite number.

    Example:
        >>> x = np.random.default_rng(0).standard_normal((200, 16))
        >>> x[:3, 5] += 1000.0
        >>> m = massive_part(x)
        >>> int(m.tokens.sum()), np.flatnonzero(m.dims).tolist(), round(m.share, 2)
        (3, [5], 1.0)
    """
    token_z = _check_positive("token_z", token_z)
    token_min_factor = _check_positive("token_min_factor", token_min_factor)
    dim_factor = _check_positive("dim_factor", dim_factor)
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"`x` must be 2-D (n_points, dim), got shape {arr.shape}")
    n, d = arr.shape
    tokens = np.zeros(n, dtype=bool)
    dims = np.zeros(d, dtype=bool)
    if n == 0 or d == 0:
        return MassivePart(tokens, dims, math.nan)
    norms = np.linalg.norm(arr, axis=1)
    med = float(np.median(norms))
    if med > 0:
        positive = norms > 0
        logs = np.log(norms[positive])
        centre = float(np.median(logs))
        mad = 1.4826 * float(np.median(np.abs(logs - centre)))
        limit = max(centre + token_z * mad, math.log(token_min_factor * med))
        tokens[positive] = logs > limit
    mag = np.abs(arr)
    med_mag = float(np.median(mag))
    if med_mag > 0:
        dims = mag.max(axis=0) > dim_factor * med_mag
    dev = np.square(arr - arr.mean(axis=0, keepdims=True))
    total = float(dev.sum())
    if total > 0:
        inside = float(dev[tokens].sum() + dev[~tokens][:, dims].sum())
        share = min(max(inside / total, 0.0), 1.0)
    else:
        share = math.nan
    return MassivePart(tokens, dims, share)


@dataclass(frozen=True)
class Prepared:
    """Cleaned points and what was removed on the way.

    Attributes:
        points: ``(m, d')`` float64 points that passed the filters (``m <= n``; ``d' < d`` when
            the treatment removes massive dimensions).
        n_outliers: rows dropped as norm outliers (massive tokens, or above ``outlier_factor`` x
            the median norm).
        n_nonfinite: rows dropped because they held NaN or Inf.
        massive_tokens: massive tokens of :func:`massive_part` (whatever the treatment removed).
        massive_dims: massive feature dimensions of :func:`massive_part`.
        massive_share: the share of the variance the massive part carries (NaN: no variance).
        dims: ``(d',)`` indices of the columns kept.
        rows: ``(m,)`` indices of the rows of ``x`` kept, in order.
    """

    points: np.ndarray
    n_outliers: int
    n_nonfinite: int
    massive_tokens: int = 0
    massive_dims: int = 0
    massive_share: float = math.nan
    dims: np.ndarray | None = None
    rows: np.ndarray | None = None


def prepare_points(
    x: np.ndarray,
    *,
    outlier_factor: float | None = 10.0,
    normalize: bool = False,
    center: bool = False,
    treatment: str = DEFAULT_TREATMENT,
) -> Prepared:
    """Drop non-finite rows and the massive part, then optionally normalise and centre.

    The one preprocessing of every metric (spectral, topology, the zigzag layer analysis). Steps,
    in order: (1) rows with any NaN/Inf are dropped; (2) the massive part of the finite rows is
    found (:func:`massive_part`) and, by ``treatment`` (:data:`TREATMENTS`), removed: the massive
    tokens (``"robust"``, ``"robust_dims"``) and rows whose L2 norm is strictly greater than
    ``outlier_factor`` x the median row norm (every treatment; none when the median norm is 0), then
    the massive dimensions (``"robust_dims"``, ``"dims"``); (3) with ``normalize`` each row is
    divided by its L2 norm (zero rows stay zero); (4) with ``center`` the column mean is subtracted.

    Args:
        x: ``(n, d)`` numeric array (n may be 0).
        outlier_factor: threshold as a multiple of the median row norm, > 0; None keeps every
            finite row, whatever the treatment (the massive part is still counted).
        normalize: per-row L2 normalisation.
        center: subtract the mean row (after normalisation).
        treatment: one of :data:`TREATMENTS`.

    Returns:
        A :class:`Prepared` with float64 points, the drop counts and the massive part's size.

    Raises:
        TypeError: if ``x`` is not numeric (bool and complex are refused).
        ValueError: if ``x`` is not 2-D, ``outlier_factor`` is not a positive finite number or
            ``treatment`` is unknown.

    Example:
        >>> x = np.ones((5, 3)); x[0] *= 1000
        >>> p = prepare_points(x)
        >>> p.points.shape, p.n_outliers, p.n_nonfinite
        ((4, 3), 1, 0)
    """
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"`x` must be a real numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"`x` must be a real numeric array, got complex dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"`x` must be 2-D (n_points, dim), got shape {arr.shape}")
    if outlier_factor is not None:
        if (
            isinstance(outlier_factor, bool)
            or not isinstance(outlier_factor, numbers.Real)
            or not np.isfinite(outlier_factor)
            or outlier_factor <= 0
        ):
            raise ValueError(
                f"`outlier_factor` must be a positive finite number or None, got {outlier_factor!r}"
            )
    if treatment not in TREATMENTS:
        raise ValueError(f"`treatment` must be one of {list(TREATMENTS)}, got {treatment!r}")
    pts = arr.astype(np.float64, copy=True)
    finite = np.isfinite(pts).all(axis=1)
    n_nonfinite = int((~finite).sum())
    pts = pts[finite]
    rows = np.flatnonzero(finite)
    massive = massive_part(pts)
    drop = np.zeros(len(pts), dtype=bool)
    if outlier_factor is not None and treatment in ("robust", "robust_dims"):
        drop |= massive.tokens
    if outlier_factor is not None and len(pts):
        norms = np.linalg.norm(pts, axis=1)
        med = float(np.median(norms))
        if med > 0:
            drop |= norms > outlier_factor * med
    pts = pts[~drop]
    rows = rows[~drop]
    kept = np.arange(arr.shape[1])
    if treatment in ("robust_dims", "dims") and massive.dims.any():
        kept = np.flatnonzero(~massive.dims)
        pts = pts[:, kept]
    if normalize and len(pts):
        norms = np.linalg.norm(pts, axis=1, keepdims=True)
        pts = np.divide(pts, norms, out=np.zeros_like(pts), where=norms > 0)
    if center and len(pts):
        pts = pts - pts.mean(axis=0, keepdims=True)
    return Prepared(
        points=pts,
        n_outliers=int(drop.sum()),
        n_nonfinite=n_nonfinite,
        massive_tokens=int(massive.tokens.sum()),
        massive_dims=int(massive.dims.sum()),
        massive_share=massive.share,
        dims=kept,
        rows=rows,
    )


def prepare_aligned(
    layers: Sequence[np.ndarray],
    *,
    outlier_factor: float | None = 10.0,
    normalize: bool = False,
    treatment: str = DEFAULT_TREATMENT,
) -> tuple[list[np.ndarray], np.ndarray]:
    """:func:`prepare_points` on each layer of the same rows, keeping the rows that pass in every layer.

    For analyses whose points must stay the same across layers (the zigzag layer analysis: one
    vertex per text in every layer): a row dropped in one layer (non-finite, massive token) is
    dropped from all.

    Args:
        layers: ``(n, d_l)`` arrays, the same ``n`` rows in each.
        outlier_factor: as in :func:`prepare_points`.
        normalize: as in :func:`prepare_points`.
        treatment: as in :func:`prepare_points`.

    Returns:
        ``(points, rows)``: per layer the prepared ``(m, d_l')`` points, and the ``(m,)`` indices of
        the rows kept.

    Raises:
        ValueError: if the layers do not have the same number of rows, or as :func:`prepare_points`.

    Example:
        >>> a = np.random.default_rng(0).standard_normal((20, 4)); b = a.copy(); b[3] *= 1000
        >>> pts, rows = prepare_aligned([a, b])
        >>> [p.shape for p in pts], 3 in rows
        ([(19, 4), (19, 4)], False)
    """
    arrays = [np.asarray(x) for x in layers]
    if len({a.shape[0] if a.ndim else -1 for a in arrays}) > 1:
        raise ValueError(f"every layer must have the same rows, got shapes {[a.shape for a in arrays]}")
    preps = [
        prepare_points(a, outlier_factor=outlier_factor, normalize=normalize, treatment=treatment)
        for a in arrays
    ]
    common = np.arange(arrays[0].shape[0]) if arrays else np.zeros(0, np.int64)
    for p in preps:
        assert p.rows is not None
        common = np.intersect1d(common, p.rows)
    points = [p.points[np.isin(p.rows, common)] for p in preps if p.rows is not None]
    return points, common


def subsample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """Deterministic choice of ``k`` of ``n`` indices, identical on every machine.

    Uses ``np.random.default_rng(seed)`` (PCG64, platform-independent) and sorts the result, so
    the same ``(n, k, seed)`` always selects the same points: topological activity between two
    captures compares like with like.

    Args:
        n: population size, >= 0.
        k: number of indices wanted, >= 0; all ``n`` are returned when ``k >= n``.
        seed: non-negative integer seed.

    Returns:
        ``(min(k, n),)`` sorted int64 array of distinct indices in ``[0, n)``.

    Raises:
        ValueError: if ``n``, ``k`` or ``seed`` is not a non-negative int.

    Example:
        >>> subsample_indices(5, 10, 0).tolist()
        [0, 1, 2, 3, 4]
    """
    n = check_int("n", n, 0, expected="a non-negative int")
    k = check_int("k", k, 0, expected="a non-negative int")
    seed = check_int("seed", seed, 0, expected="a non-negative int")
    if k >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=k, replace=False)
    return np.sort(idx).astype(np.int64)
