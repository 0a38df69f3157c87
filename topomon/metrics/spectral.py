"""Spectral (second-moment) geometry of a point cloud of hidden states.

Every function takes ``x`` of shape ``(n, d)``: n points (tokens or sequences) in d dimensions.
Two spectra appear, and each metric names which one it uses:

* the **raw** spectrum: squared singular values ``s_k^2`` of the uncentred ``x`` (RankMe, stable rank);
* the **centred** spectrum: eigenvalues ``lambda_k`` of the covariance of ``x`` (PCA; effective
  rank, alpha-ReQ, participation ratio, top-PC share).

References:
    * Garrido et al. 2023, "RankMe: assessing the downstream performance of pretrained
      self-supervised representations by their rank" (raw singular values, ``eps = 1e-7``).
    * Agrawal et al. 2022, "alpha-ReQ: assessing representation quality in self-supervised
      learning by measuring eigenspectrum decay" (weighted log-log fit of the covariance spectrum).
    * Li et al. 2025 (arXiv 2509.23024) and the ``reptrix`` package: the PCA-entropy effective rank
      exposed here as :func:`rankme_pca` (their ``p_k = lambda_k / sum(lambda) + 1e-7``).

Numerics: spectra come from the Gram matrix on the smaller side (``d x d`` or ``n x n``) and a
symmetric eigenvalue solver, in float64; eigenvalues below ``max(n, d) * machine-eps * lambda_max``
are set to exactly 0 (the usual numerical-rank tolerance, as in ``numpy.linalg.matrix_rank``).
Metrics that divide by a zero spectrum (all points identical, or all zero) return NaN.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from topomon._validate import check_int, check_number

__all__ = [
    "SPECTRAL_KEYS",
    "rankme",
    "rankme_pca",
    "eigenspectrum",
    "AlphaFit",
    "alpha_req",
    "alpha_req_fit",
    "alpha_req_from_spectrum",
    "participation_ratio",
    "stable_rank",
    "anisotropy",
    "top_pc_share",
    "spectral_metrics",
]

SPECTRAL_KEYS: tuple[str, ...] = (
    "rankme",
    "rankme_pca",
    "alpha_req",
    "alpha_req_r2",
    "participation_ratio",
    "stable_rank",
    "anisotropy",
    "top_pc_share",
)
"""The keys of :func:`spectral_metrics` (and of ``spectral_metrics_torch``), in this order."""

_NAN = float("nan")


# ----------------------------------------------------------------------------- validation
def _check_points(x: np.ndarray, name: str = "x") -> np.ndarray:
    """Validate an ``(n, d)`` point cloud and return it as float64."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"`{name}` must be a real numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"`{name}` must be a real numeric array, got complex dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D (n_points, dim), got shape {arr.shape}")
    n, d = arr.shape
    if n < 2:
        raise ValueError(f"`{name}` needs at least 2 points (rows), got shape {arr.shape}")
    if d == 0:
        raise ValueError(f"`{name}` needs at least 1 dimension (column), got shape {arr.shape}")
    out = arr.astype(np.float64, copy=False)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out).all(axis=1)).sum())
        raise ValueError(
            f"`{name}` contains NaN or Inf in {bad} row(s); drop them first "
            "(topomon.metrics.prepare_points does, and counts them)"
        )
    return out


def _check_window(window: Sequence[int]) -> tuple[int, int]:
    """Validate a 1-based inclusive rank window; never mutates its argument."""
    try:
        lo, hi = window
    except (TypeError, ValueError):
        raise ValueError(f"`window` must be a pair (first_rank, last_rank), got {window!r}") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"`window` ranks must be ints, got {window!r}")
    lo, hi = int(lo), int(hi)
    if lo < 1 or hi < lo + 2:
        raise ValueError(
            f"`window` must satisfy 1 <= first_rank and last_rank >= first_rank + 2 "
            f"(at least 3 ranks, 1-based, inclusive), got {window!r}"
        )
    return lo, hi


# ----------------------------------------------------------------------------- spectra
def _clean_eigs(w: np.ndarray, n: int, d: int) -> np.ndarray:
    """Sort descending, clip negatives, and zero eigenvalues under the numerical-rank tolerance."""
    w = np.sort(w)[::-1].copy()
    w[w < 0] = 0.0
    if w.size and w[0] > 0:
        w[w <= w[0] * max(n, d) * np.finfo(np.float64).eps] = 0.0
    return w


def _raw_and_centred(x: np.ndarray, need_raw: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw squared singular values and centred scatter eigenvalues of ``x`` from one Gram product.

    Returns:
        ``(raw, centred, mean)``: ``raw`` are the ``min(n, d)`` values ``s_k^2`` of ``x``
        (descending; empty when ``need_raw`` is False), ``centred`` the ``min(n, d)`` eigenvalues
        of ``xc^T xc`` (scatter, not yet divided by ``n - 1``), ``mean`` the ``(d,)`` column mean.
    """
    n, d = x.shape
    mu = x.mean(axis=0)
    xc = x - mu
    if d <= n:
        scat = xc.T @ xc  # (d, d) centred scatter
        scat = (scat + scat.T) * 0.5
        raw_g = scat + n * np.outer(mu, mu) if need_raw else None  # X^T X = Xc^T Xc + n mu mu^T
    else:
        scat = xc @ xc.T  # (n, n) centred Gram
        scat = (scat + scat.T) * 0.5
        if need_raw:
            a = xc @ mu  # X X^T = Kc + a 1^T + 1 a^T + |mu|^2 1 1^T
            raw_g = scat + a[:, None] + a[None, :] + float(mu @ mu)
        else:
            raw_g = None
    centred = _clean_eigs(np.linalg.eigvalsh(scat), n, d)
    raw = _clean_eigs(np.linalg.eigvalsh(raw_g), n, d) if raw_g is not None else np.empty(0)
    return raw, centred, mu


def _raw_eigs(x: np.ndarray) -> np.ndarray:
    """The ``min(n, d)`` squared singular values of the uncentred ``x``, descending."""
    n, d = x.shape
    g = x.T @ x if d <= n else x @ x.T
    return _clean_eigs(np.linalg.eigvalsh((g + g.T) * 0.5), n, d)


def _rankme_from_raw(raw: np.ndarray, eps: float) -> float:
    s = np.sqrt(raw)
    total = s.sum()
    if total <= 0:
        return _NAN
    p = s / total + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def _entropy_rank(lam: np.ndarray, eps: float) -> float:
    total = lam.sum()
    if total <= 0:
        return _NAN
    p = lam / total + eps
    p = p[p > 0]  # only with eps = 0: 0 log 0 = 0
    return float(np.exp(-np.sum(p * np.log(p))))


def _pr(lam: np.ndarray) -> float:
    total = lam.sum()
    if total <= 0:
        return _NAN
    return float(total**2 / np.sum(lam**2))


def _stable(raw: np.ndarray) -> float:
    if raw.size == 0 or raw[0] <= 0:
        return _NAN
    return float(raw.sum() / raw[0])


def _top_share(lam: np.ndarray) -> float:
    total = lam.sum()
    if total <= 0:
        return _NAN
    return float(lam[0] / total)


# ----------------------------------------------------------------------------- public metrics
def rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe of Garrido et al. (2023): entropy-based effective rank of the *raw* singular values.

    ``p_k = s_k / sum(s) + eps`` over the ``min(n, d)`` singular values of the uncentred ``x``;
    ``RankMe = exp(-sum p_k log p_k)``. Invariant to rotations of the feature space and to scale;
    not translation invariant (no centring, as in the paper).

    Args:
        x: ``(n, d)`` points, n >= 2, d >= 1, finite.
        eps: the paper's smoothing constant, >= 0.

    Returns:
        A float in about ``[1, min(n, d)]``; NaN when ``x`` is all zeros.

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: on wrong shape, fewer than 2 points, no dimensions, NaN/Inf, or a negative eps.

    Example:
        >>> round(rankme(np.eye(4)), 3)
        4.0
    """
    eps = check_number("eps", eps, 0)
    pts = _check_points(x)
    raw = _raw_eigs(pts)
    return _rankme_from_raw(raw, eps)


def rankme_pca(x: np.ndarray, eps: float = 1e-7) -> float:
    """Effective rank of the centred PCA spectrum, as Li et al. (2025) and ``reptrix`` compute it.

    ``exp(-sum p_k log p_k)`` with ``p_k = lambda_k / sum(lambda) + eps``: ``lambda_k / sum(lambda)``
    are the explained-variance ratios of the centred ``x`` (normalised ``s^2`` of the centred data)
    over all ``min(n, d)`` eigenvalues, zeros included, and ``eps = 1e-7`` is added to each. This is,
    to rounding, ``rankme(get_eigenspectrum(x))`` in the code of Li et al. 2025 (arXiv 2509.23024;
    ``utils/powerlaw.py`` of github.com/melodylizx/Tracing-the-representation-geometry-of-language-models)
    and ``get_rank(get_eigenspectrum(x))`` in ``reptrix`` (``reptrix/rankme.py``): both take
    sklearn's ``PCA(n_components=min(2048, n, d)).explained_variance_ratio_`` of the centred
    features, so they agree with this function while ``min(n, d) <= 2048``. Invariant to rotation,
    translation and scale. Differs from :func:`rankme` (Garrido et al. 2023: raw, uncentred ``s``,
    not ``s^2``).

    Args:
        x: ``(n, d)`` points, n >= 2, d >= 1, finite.
        eps: smoothing constant added to each normalised eigenvalue, >= 0 (``1e-7`` as in the
            reference code; ``0`` gives the plain entropy, with ``0 log 0 = 0``).

    Returns:
        A float in about ``[1, min(n - 1, d)]`` (the eps terms move it by about ``1e-6`` relative);
        NaN when all points are identical (no variance).

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: on wrong shape, fewer than 2 points, no dimensions, NaN/Inf, or a negative eps.

    Example:
        >>> round(rankme_pca(np.eye(4)), 3)
        3.0
    """
    eps = check_number("eps", eps, 0)
    pts = _check_points(x)
    _, cen, _ = _raw_and_centred(pts, need_raw=False)
    return _entropy_rank(cen, eps)


def eigenspectrum(x: np.ndarray) -> np.ndarray:
    """Eigenvalues of the centred covariance ``xc^T xc / (n - 1)``, descending, clipped at 0.

    Computed on the smaller Gram side (``d x d`` or ``n x n``), so ``min(n, d)`` values are returned
    (the remaining eigenvalues of the ``d x d`` covariance are exactly 0). Values below the
    numerical-rank tolerance are set to 0.

    Args:
        x: ``(n, d)`` points, n >= 2, d >= 1, finite.

    Returns:
        ``(min(n, d),)`` float64 array, descending, non-negative.

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: on wrong shape, fewer than 2 points, no dimensions, or NaN/Inf.
    """
    pts = _check_points(x)
    _, cen, _ = _raw_and_centred(pts, need_raw=False)
    return cen / (pts.shape[0] - 1)


@dataclass(frozen=True)
class AlphaFit:
    """A power-law fit ``lambda_k ~ exp(intercept) * k^-alpha`` of an eigenspectrum.

    Attributes:
        alpha: decay exponent (NaN when fewer than 3 usable ranks).
        r2: weighted coefficient of determination of the log-log fit, with the fit's weights
            (NaN when undefined: no fit, or a perfectly flat spectrum).
        intercept: ``c`` in ``log lambda_k = -alpha log k + c`` (natural log).
        window: the 1-based inclusive ranks actually used, ``(first, last)``; the requested window
            when no fit was possible.
    """

    alpha: float
    r2: float
    intercept: float
    window: tuple[int, int]


def alpha_req_from_spectrum(
    eigvals: np.ndarray, window: tuple[int, int] = (6, 100), weighted: bool = True
) -> AlphaFit:
    """alpha-ReQ (Agrawal et al. 2022) from a precomputed eigenspectrum.

    Least squares of ``log lambda_k = -alpha log k + c`` over ranks ``window[0]..window[1]``
    (1-based, inclusive), with weights ``1/k`` on the squared residuals when ``weighted`` (the
    authors' recipe, also ``reptrix``). Ranks beyond the last strictly positive eigenvalue are
    excluded; fewer than 3 usable ranks gives a NaN fit. ``window`` is never modified.

    Args:
        eigvals: ``(m,)`` non-negative eigenvalues (any order; sorted descending here).
        window: ``(first_rank, last_rank)`` with ``1 <= first_rank`` and ``last_rank >= first_rank + 2``.
        weighted: use weights ``1/k`` (True) or ordinary least squares (False).

    Returns:
        An :class:`AlphaFit`.

    Raises:
        ValueError: if ``eigvals`` is not 1-D, holds NaN/Inf or negative values below rounding,
            or ``window`` is invalid.

    Example:
        >>> k = np.arange(1, 201.0)
        >>> round(alpha_req_from_spectrum(k**-1.5).alpha, 6)
        1.5
    """
    lo, hi = _check_window(window)
    lam = np.asarray(eigvals, dtype=np.float64)
    if lam.ndim != 1:
        raise ValueError(f"`eigvals` must be 1-D, got shape {lam.shape}")
    if not np.isfinite(lam).all():
        raise ValueError("`eigvals` contains NaN or Inf")
    lam = np.sort(lam)[::-1]
    if lam.size and lam.min() < -1e-12 * max(abs(lam[0]), 1e-300):
        raise ValueError(f"`eigvals` must be non-negative (a covariance spectrum), got min {lam.min()!r}")
    n_pos = int((lam > 0).sum())
    last = min(hi, n_pos)
    if last - lo + 1 < 3:
        return AlphaFit(alpha=_NAN, r2=_NAN, intercept=_NAN, window=(lo, hi))
    k = np.arange(lo, last + 1, dtype=np.float64)
    y = np.log(lam[lo - 1 : last])
    t = np.log(k)
    w = 1.0 / k if weighted else np.ones_like(k)
    sw = w.sum()
    tm = (w * t).sum() / sw
    ym = (w * y).sum() / sw
    stt = (w * (t - tm) ** 2).sum()
    sty = (w * (t - tm) * (y - ym)).sum()
    slope = sty / stt
    intercept = ym - slope * tm
    resid = y - (intercept + slope * t)
    ss_res = float((w * resid**2).sum())
    ss_tot = float((w * (y - ym) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else _NAN
    return AlphaFit(alpha=float(-slope), r2=float(r2), intercept=float(intercept), window=(lo, last))


def alpha_req_fit(x: np.ndarray, window: tuple[int, int] = (6, 100), weighted: bool = True) -> AlphaFit:
    """alpha-ReQ fit of the centred covariance spectrum of ``x`` (Agrawal et al. 2022).

    See :func:`alpha_req_from_spectrum` for the fit. Invariant to rotation and translation;
    ``alpha`` is scale invariant (only the intercept moves).

    Args:
        x: ``(n, d)`` points, n >= 2, d >= 1, finite.
        window: 1-based inclusive rank window (reptrix: ``(6, 100)``; Li et al.: ``(12, 100)``).
        weighted: weights ``1/k`` as in the authors' recipe.

    Returns:
        An :class:`AlphaFit` (NaN fields when fewer than 3 ranks of the window have non-zero
        eigenvalues, e.g. all points identical or ``min(n - 1, d) < window[0] + 2``).

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: on invalid ``x`` or ``window``.
    """
    _check_window(window)
    return alpha_req_from_spectrum(eigenspectrum(x), window, weighted)


def alpha_req(x: np.ndarray, window: tuple[int, int] = (6, 100), weighted: bool = True) -> float:
    """alpha-ReQ exponent of ``x``: the ``alpha`` of :func:`alpha_req_fit`.

    Args:
        x: ``(n, d)`` points, n >= 2, d >= 1, finite.
        window: 1-based inclusive rank window.
        weighted: weights ``1/k`` as in the authors' recipe.

    Returns:
        The decay exponent (larger = faster decay = more compressed); NaN when undefined.

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: on invalid ``x`` or ``window``.
    """
    return alpha_req_fit(x, window, weighted).alpha


def participation_ratio(x: np.ndarray) -> float:
    """Participation ratio ``(sum lambda)^2 / sum lambda^2`` of the centred covariance spectrum.

    Args:
        x: ``(n, d)`` points, n >= 2, d >= 1, finite.

    Returns:
        A float in ``[1, min(n - 1, d)]``; NaN when all points are identical.

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: on wrong shape, fewer than 2 points, no dimensions, or NaN/Inf.
    """
    pts = _check_points(x)
    _, cen, _ = _raw_and_centred(pts, need_raw=False)
    return _pr(cen)


def stable_rank(x: np.ndarray) -> float:
    """Stable rank ``sum s^2 / max s^2 = ||x||_F^2 / ||x||_2^2`` of the raw (uncentred) ``x``.

    Args:
        x: ``(n, d)`` points, n >= 2, d >= 1, finite.

    Returns:
        A float in ``[1, min(n, d)]``; NaN when ``x`` is all zeros.

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: on wrong shape, fewer than 2 points, no dimensions, or NaN/Inf.
    """
    pts = _check_points(x)
    raw = _raw_eigs(pts)
    return _stable(raw)


def _exact_mean_cosine(u: np.ndarray) -> float:
    """Mean cosine over all ordered distinct pairs of unit rows: ``(|sum u|^2 - m) / (m (m - 1))``."""
    m = u.shape[0]
    s = u.sum(axis=0)
    return float((s @ s - np.einsum("ij,ij->", u, u)) / (m * (m - 1)))


def anisotropy(x: np.ndarray, n_pairs: int = 2048, seed: int = 0) -> float:
    """Anisotropy: mean cosine similarity of distinct pairs of the uncentred rows.

    Zero-norm rows are excluded. With ``n_pairs > 0``, ``n_pairs`` random pairs ``(i, j)``, ``i != j``,
    are drawn with ``np.random.default_rng(seed)`` (with replacement among pairs); with
    ``n_pairs == 0`` the exact mean over *all* distinct pairs is returned, computed in ``O(n d)`` as
    ``(|sum_i u_i|^2 - m) / (m (m - 1))`` for the unit rows ``u_i`` (this is what
    :func:`spectral_metrics` reports: no sampling noise, and cheaper).

    Args:
        x: ``(n, d)`` points, n >= 2, d >= 1, finite.
        n_pairs: number of sampled pairs, >= 0 (0 = exact over all pairs).
        seed: seed of the pair sampler.

    Returns:
        A float in ``[-1, 1]`` (about 0 for an isotropic cloud centred at 0); NaN when fewer than 2
        rows have non-zero norm.

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: on invalid ``x``, a negative ``n_pairs`` or a negative ``seed``.
    """
    check_int("n_pairs", n_pairs, 0, expected="an int >= 0 (0 = exact over all pairs)")
    check_int("seed", seed, 0, expected="a non-negative int")
    pts = _check_points(x)
    norms = np.linalg.norm(pts, axis=1)
    keep = norms > 0
    m = int(keep.sum())
    if m < 2:
        return _NAN
    u = pts[keep] / norms[keep, None]
    if n_pairs == 0:
        return _exact_mean_cosine(u)
    rng = np.random.default_rng(int(seed))
    i = rng.integers(0, m, size=int(n_pairs))
    j = rng.integers(0, m - 1, size=int(n_pairs))
    j = j + (j >= i)  # uniform over j != i
    return float(np.einsum("ij,ij->i", u[i], u[j]).mean())


def top_pc_share(x: np.ndarray) -> float:
    """Share of the variance on the first principal component: ``lambda_1 / sum(lambda)``.

    Args:
        x: ``(n, d)`` points, n >= 2, d >= 1, finite.

    Returns:
        A float in ``[1 / min(n - 1, d), 1]``; NaN when all points are identical.

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: on wrong shape, fewer than 2 points, no dimensions, or NaN/Inf.
    """
    pts = _check_points(x)
    _, cen, _ = _raw_and_centred(pts, need_raw=False)
    return _top_share(cen)


def spectral_metrics(x: np.ndarray, *, window: tuple[int, int] = (6, 100)) -> dict[str, float]:
    """All spectral metrics of one point cloud from a single Gram product, in float64.

    One centred Gram/covariance product on the smaller side; the raw Gram follows from it without
    cancellation (``X^T X = Xc^T Xc + n mu mu^T``); two symmetric eigenvalue solves (raw and centred
    spectra) then feed every metric. ``anisotropy`` is the exact mean over all distinct pairs
    (``anisotropy(x, n_pairs=0)``); the others equal their single-metric functions.

    Args:
        x: ``(n, d)`` points, n >= 2, d >= 1, finite (clean them with ``prepare_points`` first).
        window: alpha-ReQ rank window, 1-based inclusive.

    Returns:
        ``{"rankme", "rankme_pca", "alpha_req", "alpha_req_r2", "participation_ratio",
        "stable_rank", "anisotropy", "top_pc_share"}`` -> float (NaN where undefined).

    Raises:
        TypeError: if ``x`` is not a real numeric array.
        ValueError: on invalid ``x`` or ``window``.

    Example:
        >>> m = spectral_metrics(np.random.default_rng(0).standard_normal((2000, 8)))
        >>> 7.5 < m["rankme_pca"] <= 8 and 7.5 < m["participation_ratio"] <= 8
        True
    """
    _check_window(window)
    pts = _check_points(x)
    raw, cen, _ = _raw_and_centred(pts)
    fit = alpha_req_from_spectrum(cen / (pts.shape[0] - 1), window, True)
    norms = np.linalg.norm(pts, axis=1)
    keep = norms > 0
    aniso = _exact_mean_cosine(pts[keep] / norms[keep, None]) if keep.sum() >= 2 else _NAN
    return {
        "rankme": _rankme_from_raw(raw, 1e-7),
        "rankme_pca": _entropy_rank(cen, 1e-7),
        "alpha_req": fit.alpha,
        "alpha_req_r2": fit.r2,
        "participation_ratio": _pr(cen),
        "stable_rank": _stable(raw),
        "anisotropy": aniso,
        "top_pc_share": _top_share(cen),
    }
