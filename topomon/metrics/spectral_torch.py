"""The spectral metrics of :func:`topomon.metrics.spectral.spectral_metrics`, computed with torch.

Same keys, same definitions, same numerics as the numpy function (read its module docstring):
one centred Gram/covariance product on the smaller side (``d x d`` or ``n x n``), the raw Gram
derived from it without cancellation (``X^T X = Xc^T Xc + n mu mu^T``), two symmetric eigenvalue
solves, eigenvalues below ``max(n, d) * eps * lambda_max`` set to 0, and NaN where a metric divides
by a zero spectrum. The work runs on the tensor's device (a GPU when the tensor lives there), with
no host synchronisation until the eight numbers are copied back together at the end.

Precision: float64 by default wherever the device supports it (CPU, CUDA); float32 on Apple
``mps`` (no float64 there), or when asked with ``dtype=torch.float32`` (faster on most GPUs; the
numerical-rank tolerance then uses float32's eps, ``max(n, d) * 1.2e-7 * lambda_max``). float32 is
not a drop-in: on uncentred points with a large mean, or a spectrum spanning many decades, it zeroes
real eigenvalues and RankMe moves (a 400 x 64 power-law cloud with an offset: 12.3 in float32 against
14.0 in float64); keep float64 for monitoring.

torch is imported when the function is called, not when this module is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from topomon.metrics.spectral import SPECTRAL_KEYS, _check_window

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["spectral_metrics_torch"]


def _compute_dtype(x: torch.Tensor, dtype: Any) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32 if x.device.type == "mps" else torch.float64
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`dtype` must be None, torch.float32 or torch.float64, got {dtype!r}")
    if dtype == torch.float64 and x.device.type == "mps":
        raise TypeError("`dtype` torch.float64 is not supported on the 'mps' device; use torch.float32")
    return dtype


def _check_points_torch(x: Any, dtype: Any) -> torch.Tensor:
    """Validate an ``(n, d)`` tensor and return it in the compute dtype, on its own device."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"`x` must be a torch.Tensor, got {type(x).__name__} "
            "(use topomon.metrics.spectral_metrics for numpy arrays)"
        )
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"`x` must be a real numeric tensor, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"`x` must be 2-D (n_points, dim), got shape {tuple(x.shape)}")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"`x` needs at least 2 points (rows), got shape {tuple(x.shape)}")
    if d == 0:
        raise ValueError(f"`x` needs at least 1 dimension (column), got shape {tuple(x.shape)}")
    out = x.detach().to(_compute_dtype(x, dtype))
    finite = torch.isfinite(out).all(dim=1)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"`x` contains NaN or Inf in {bad} row(s); drop them first "
            "(topomon.metrics.prepare_points does, and counts them)"
        )
    return out


def _clean_eigs(w: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """Sort descending, clip negatives, zero eigenvalues under the numerical-rank tolerance."""
    import torch

    w = torch.sort(w, descending=True).values.clamp_min(0.0)
    tol = w[0] * (max(n, d) * torch.finfo(w.dtype).eps)
    return torch.where(w <= tol, torch.zeros_like(w), w)


def _nan_unless(ok: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.where(ok, value, torch.full_like(value, float("nan")))


def _alpha_fit(lam: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted (1/k) log-log fit over ranks ``lo..hi`` of the positive part of ``lam`` (descending).

    Mirrors :func:`topomon.metrics.spectral.alpha_req_from_spectrum` with ``weighted=True``: ranks
    beyond the last positive eigenvalue get weight 0 (a mask, not a data-dependent slice, so no
    device synchronisation); fewer than 3 usable ranks give NaN; a flat spectrum gives NaN ``r2``.
    """
    import torch

    nan = torch.full((), float("nan"), dtype=lam.dtype, device=lam.device)
    last = min(hi, lam.shape[0])
    if last - lo + 1 < 3:
        return nan, nan
    k = torch.arange(lo, last + 1, dtype=lam.dtype, device=lam.device)
    vals = lam[lo - 1 : last]
    use = vals > 0  # the positive eigenvalues are a prefix (sorted descending)
    w = torch.where(use, 1.0 / k, torch.zeros_like(k))
    y = torch.log(torch.where(use, vals, torch.ones_like(vals)))
    t = torch.log(k)
    sw = w.sum()
    safe_sw = torch.where(sw > 0, sw, torch.ones_like(sw))
    tm = (w * t).sum() / safe_sw
    ym = (w * y).sum() / safe_sw
    stt = (w * (t - tm) ** 2).sum()
    sty = (w * (t - tm) * (y - ym)).sum()
    enough = use.sum() >= 3
    slope = sty / torch.where(enough, stt, torch.ones_like(stt))
    intercept = ym - slope * tm
    resid = y - (intercept + slope * t)
    ss_res = (w * resid**2).sum()
    ss_tot = (w * (y - ym) ** 2).sum()
    r2 = 1.0 - ss_res / torch.where(ss_tot > 0, ss_tot, torch.ones_like(ss_tot))
    return _nan_unless(enough, -slope), _nan_unless(enough & (ss_tot > 0), r2)


def spectral_metrics_torch(
    x: torch.Tensor, *, window: tuple[int, int] = (6, 100), dtype: torch.dtype | None = None
) -> dict[str, float]:
    """All spectral metrics of one point cloud, with torch on the tensor's device.

    The torch twin of :func:`topomon.metrics.spectral.spectral_metrics`: the same keys and
    definitions (RankMe of Garrido et al. 2023 on the raw singular values, ``eps = 1e-7``; PCA-entropy
    effective rank of Li et al. 2025 and reptrix, ``eps = 1e-7``; alpha-ReQ of Agrawal et al. 2022,
    weighted ``1/k`` fit over ``window`` with its R^2; participation ratio; stable rank; exact mean
    pairwise cosine; top-PC share), the same NaN cases. It agrees with the numpy function to
    rounding in float64.

    Args:
        x: ``(n, d)`` tensor, n >= 2, d >= 1, finite, any real dtype, on any device; not modified
            (detached, converted to the compute dtype).
        window: alpha-ReQ rank window, 1-based inclusive (reptrix ``(6, 100)``; Li et al. ``(12, 100)``).
        dtype: compute dtype, ``torch.float64`` or ``torch.float32``; None picks float64 where the
            device supports it (CPU, CUDA) and float32 on ``mps``.

    Returns:
        ``{"rankme", "rankme_pca", "alpha_req", "alpha_req_r2", "participation_ratio",
        "stable_rank", "anisotropy", "top_pc_share"}`` -> Python float (NaN where undefined: an
        all-zero ``x`` for rankme / stable rank, identical points for the centred metrics, fewer
        than 2 non-zero rows for anisotropy, fewer than 3 positive eigenvalues in the window for
        alpha-ReQ).

    Raises:
        TypeError: if ``x`` is not a real numeric ``torch.Tensor`` or ``dtype`` is not allowed.
        ValueError: on wrong shape, fewer than 2 points, no dimensions, NaN/Inf, or an invalid
            ``window``.

    Example:
        >>> import torch
        >>> m = spectral_metrics_torch(torch.randn(2000, 8, generator=torch.Generator().manual_seed(0)))
        >>> 7.5 < m["rankme_pca"] <= 8 and 7.5 < m["participation_ratio"] <= 8
        True
    """
    import torch

    lo, hi = _check_window(window)
    pts = _check_points_torch(x, dtype)
    n, d = pts.shape
    mu = pts.mean(dim=0)
    xc = pts - mu
    if d <= n:
        scat = xc.T @ xc  # (d, d) centred scatter
        scat = (scat + scat.T) * 0.5
        raw_g = scat + n * torch.outer(mu, mu)  # X^T X = Xc^T Xc + n mu mu^T
    else:
        scat = xc @ xc.T  # (n, n) centred Gram
        scat = (scat + scat.T) * 0.5
        a = xc @ mu  # X X^T = Kc + a 1^T + 1 a^T + |mu|^2 1 1^T
        raw_g = scat + a[:, None] + a[None, :] + mu @ mu
    cen = _clean_eigs(torch.linalg.eigvalsh(scat), n, d)
    raw = _clean_eigs(torch.linalg.eigvalsh(raw_g), n, d)
    one = torch.ones((), dtype=pts.dtype, device=pts.device)

    # RankMe (raw singular values s = sqrt(raw), p = s / sum s + eps)
    s = torch.sqrt(raw)
    s_tot = s.sum()
    p = s / torch.where(s_tot > 0, s_tot, one) + 1e-7
    rankme = _nan_unless(s_tot > 0, torch.exp(-(p * torch.log(p)).sum()))

    # centred spectrum: PCA-entropy rank (p = lambda / sum lambda + eps, as Li et al. and reptrix),
    # participation ratio, top-PC share
    c_tot = cen.sum()
    has_var = c_tot > 0
    q = cen / torch.where(has_var, c_tot, one) + 1e-7
    rankme_pca = _nan_unless(has_var, torch.exp(-(q * torch.log(q)).sum()))
    pr = _nan_unless(has_var, c_tot**2 / torch.where(has_var, (cen**2).sum(), one))
    top = _nan_unless(has_var, cen[0] / torch.where(has_var, c_tot, one))
    alpha, r2 = _alpha_fit(cen / (n - 1), lo, hi)

    # stable rank: sum s^2 / max s^2 of the raw spectrum
    stable = _nan_unless(raw[0] > 0, raw.sum() / torch.where(raw[0] > 0, raw[0], one))

    # anisotropy: exact mean cosine over distinct pairs of non-zero rows
    norms = torch.linalg.vector_norm(pts, dim=1)
    keep = norms > 0
    m = keep.sum().to(pts.dtype)
    u = torch.where(keep[:, None], pts / torch.where(keep, norms, one)[:, None], torch.zeros_like(pts))
    tot = u.sum(dim=0)
    pairs = m * (m - 1)
    aniso = _nan_unless(m >= 2, (tot @ tot - (u * u).sum()) / torch.where(m >= 2, pairs, one))

    values = torch.stack([rankme, rankme_pca, alpha, r2, pr, stable, aniso, top]).cpu().tolist()
    return {k: float(v) for k, v in zip(SPECTRAL_KEYS, values, strict=True)}
