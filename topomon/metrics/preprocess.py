"""Preprocessing of captured hidden states before any metric sees them.

Two pitfalls measured on real models motivate this module (see ``RESEARCH.md``):

* **Massive activations** (Sun et al. 2024, "Massive activations in large language models"): the
  first non-pad position (BOS) and a few other tokens carry hidden states whose norm is up to
  ~100x the median. A single such row collapses any covariance-based effective rank to ~1.
  :func:`token_mask` excludes the first position; :func:`prepare_points` drops rows whose norm
  exceeds a multiple of the median norm, and *counts* them (their emergence is a signal too).
* **Deterministic subsampling**: topological activity between captures is only meaningful on the
  same probe tokens and the same subsample, so :func:`subsample_indices` is a pure function of
  ``(n, k, seed)``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from topomon._validate import check_int

__all__ = ["token_mask", "Prepared", "prepare_points", "subsample_indices"]


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
class Prepared:
    """Cleaned points and what was removed on the way.

    Attributes:
        points: ``(m, d)`` float64 points that passed the filters (``m <= n``).
        n_outliers: rows dropped because their L2 norm exceeded ``outlier_factor`` x the median.
        n_nonfinite: rows dropped because they held NaN or Inf.
    """

    points: np.ndarray
    n_outliers: int
    n_nonfinite: int


def prepare_points(
    x: np.ndarray,
    *,
    outlier_factor: float | None = 10.0,
    normalize: bool = False,
    center: bool = False,
) -> Prepared:
    """Drop non-finite and norm-outlier rows, then optionally normalise and centre.

    Steps, in order: (1) rows with any NaN/Inf are dropped; (2) rows whose L2 norm is strictly
    greater than ``outlier_factor`` x the median row norm (of the finite rows) are dropped;
    when the median norm is 0 (most rows are zero) no scale exists and no row is dropped;
    (3) with ``normalize`` each row is divided by its L2 norm (zero rows stay zero);
    (4) with ``center`` the column mean is subtracted.

    Args:
        x: ``(n, d)`` numeric array (n may be 0).
        outlier_factor: threshold as a multiple of the median row norm, > 0; None disables the
            filter.
        normalize: per-row L2 normalisation.
        center: subtract the mean row (after normalisation).

    Returns:
        A :class:`Prepared` with float64 ``(m, d)`` points and the drop counts.

    Raises:
        TypeError: if ``x`` is not numeric (bool and complex are refused).
        ValueError: if ``x`` is not 2-D or ``outlier_factor`` is not a positive finite number.

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
    pts = arr.astype(np.float64, copy=True)
    finite = np.isfinite(pts).all(axis=1)
    n_nonfinite = int((~finite).sum())
    pts = pts[finite]
    n_outliers = 0
    if outlier_factor is not None and len(pts):
        norms = np.linalg.norm(pts, axis=1)
        med = float(np.median(norms))
        if med > 0:
            keep = norms <= outlier_factor * med
            n_outliers = int((~keep).sum())
            pts = pts[keep]
    if normalize and len(pts):
        norms = np.linalg.norm(pts, axis=1, keepdims=True)
        pts = np.divide(pts, norms, out=np.zeros_like(pts), where=norms > 0)
    if center and len(pts):
        pts = pts - pts.mean(axis=0, keepdims=True)
    return Prepared(points=pts, n_outliers=n_outliers, n_nonfinite=n_nonfinite)


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
