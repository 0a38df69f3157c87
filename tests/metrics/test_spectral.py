from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from topomon.metrics.spectral import (
    AlphaFit,
    alpha_req,
    alpha_req_fit,
    alpha_req_from_spectrum,
    anisotropy,
    eigenspectrum,
    participation_ratio,
    rankme,
    rankme_pca,
    spectral_metrics,
    stable_rank,
    top_pc_share,
)

KEYS = {
    "rankme",
    "rankme_pca",
    "alpha_req",
    "alpha_req_r2",
    "participation_ratio",
    "stable_rank",
    "anisotropy",
    "top_pc_share",
}


# ----------------------------------------------------------------------------- independent references (SVD)
def ref_rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def ref_centred_eigs(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=0)
    return np.linalg.svd(xc, compute_uv=False) ** 2 / (x.shape[0] - 1)


def ref_rankme_pca(x: np.ndarray, eps: float = 1e-7) -> float:
    """Li et al. 2025 / reptrix: p_k = (PCA explained-variance ratio)_k + eps over min(n, d) components."""
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)  # min(n, d) values
    ratio = s**2 / (s**2).sum()
    p = ratio + eps
    p = p[p > 0]  # eps = 0 only: 0 log 0 = 0
    return float(np.exp(-(p * np.log(p)).sum()))


def ref_pr(x: np.ndarray) -> float:
    lam = ref_centred_eigs(x)
    return float(lam.sum() ** 2 / (lam**2).sum())


def ref_stable_rank(x: np.ndarray) -> float:
    return float(np.linalg.norm(x, "fro") ** 2 / np.linalg.norm(x, 2) ** 2)


def ref_mean_cosine(x: np.ndarray) -> float:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = u @ u.T
    n = len(u)
    return float((c.sum() - np.trace(c)) / (n * (n - 1)))


def power_law_cloud(rng: np.random.Generator, n: int, d: int, a: float) -> np.ndarray:
    """Gaussian samples whose population covariance has eigenvalues k^-a, in a random basis."""
    lam = np.arange(1, d + 1.0) ** -a
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * np.sqrt(lam)) @ q.T + 3.0


# ----------------------------------------------------------------------------- agreement with references
@pytest.mark.parametrize(("n", "d"), [(300, 20), (40, 120), (64, 64), (2, 5), (7, 1)])
def test_metrics_match_svd_references(n: int, d: int) -> None:
    rng = np.random.default_rng(n * 1000 + d)
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 3.0, size=d) + rng.standard_normal(d) * 5
    assert rankme(x) == pytest.approx(ref_rankme(x), rel=1e-6)
    assert rankme_pca(x) == pytest.approx(ref_rankme_pca(x), rel=1e-6)
    assert participation_ratio(x) == pytest.approx(ref_pr(x), rel=1e-6)
    assert stable_rank(x) == pytest.approx(ref_stable_rank(x), rel=1e-6)
    assert top_pc_share(x) == pytest.approx(ref_centred_eigs(x)[0] / ref_centred_eigs(x).sum(), rel=1e-6)
    assert anisotropy(x, n_pairs=0) == pytest.approx(ref_mean_cosine(x), rel=1e-9, abs=1e-12)
    ev = eigenspectrum(x)
    assert ev.shape == (min(n, d),)
    ref = np.zeros(min(n, d))
    r = ref_centred_eigs(x)
    ref[: r.size] = r
    np.testing.assert_allclose(ev, ref, rtol=1e-6, atol=1e-9 * ref[0])
    assert np.all(np.diff(ev) <= 0) and ev.min() >= 0


@pytest.mark.parametrize(("n", "d"), [(500, 30), (40, 120), (64, 64), (3, 7), (9, 1), (200, 2)])
def test_rankme_pca_matches_reference_convention(n: int, d: int) -> None:
    # eps = 1e-7 added to every normalised eigenvalue, zeros included, as in Li et al.'s and reptrix's code
    rng = np.random.default_rng(n + 7 * d)
    x = rng.standard_normal((n, d)) * rng.uniform(0.01, 3.0, size=d) + rng.standard_normal(d)
    assert rankme_pca(x) == pytest.approx(ref_rankme_pca(x), rel=1e-10)
    assert spectral_metrics(x)["rankme_pca"] == pytest.approx(ref_rankme_pca(x), rel=1e-10)
    assert rankme_pca(x, eps=0.0) == pytest.approx(ref_rankme_pca(x, eps=0.0), rel=1e-10)
    if min(n, d) > 2:  # the eps terms matter at the 1e-6 level, not below 1e-10
        assert abs(rankme_pca(x) / rankme_pca(x, eps=0.0) - 1) > 1e-8


def test_eigenspectrum_matches_numpy_covariance() -> None:
    x = np.random.default_rng(5).standard_normal((50, 6))
    ref = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    np.testing.assert_allclose(eigenspectrum(x), ref, rtol=1e-10)


def test_spectral_metrics_equals_single_functions() -> None:
    x = power_law_cloud(np.random.default_rng(6), 800, 150, 1.2)
    m = spectral_metrics(x)
    assert set(m) == KEYS
    assert all(isinstance(v, float) for v in m.values())
    fit = alpha_req_fit(x)
    assert m["rankme"] == pytest.approx(rankme(x), rel=1e-9)
    assert m["rankme_pca"] == pytest.approx(rankme_pca(x), rel=1e-9)
    assert m["alpha_req"] == pytest.approx(fit.alpha, rel=1e-9)
    assert m["alpha_req_r2"] == pytest.approx(fit.r2, rel=1e-9)
    assert m["participation_ratio"] == pytest.approx(participation_ratio(x), rel=1e-9)
    assert m["stable_rank"] == pytest.approx(stable_rank(x), rel=1e-9)
    assert m["top_pc_share"] == pytest.approx(top_pc_share(x), rel=1e-9)
    assert m["anisotropy"] == pytest.approx(anisotropy(x, n_pairs=0), rel=1e-9)
    m2 = spectral_metrics(x, window=(12, 100))
    assert m2["alpha_req"] == pytest.approx(alpha_req(x, window=(12, 100)), rel=1e-9)


# ----------------------------------------------------------------------------- known answers
def test_isotropic_gaussian_has_full_effective_rank() -> None:
    d = 32
    x = np.random.default_rng(7).standard_normal((20000, d))
    assert rankme(x) == pytest.approx(d, rel=0.01)
    assert rankme_pca(x) == pytest.approx(d, rel=0.01)
    assert participation_ratio(x) == pytest.approx(d, rel=0.03)  # Marchenko-Pastur: d / (1 + d/n)
    assert stable_rank(x) == pytest.approx(d, rel=0.1)
    assert top_pc_share(x) == pytest.approx(1 / d, rel=0.15)
    assert abs(anisotropy(x, n_pairs=0)) < 0.01


@pytest.mark.parametrize("k", [1, 3, 10])
def test_rank_k_data_has_effective_rank_at_most_k(k: int) -> None:
    rng = np.random.default_rng(k)
    x = rng.standard_normal((500, k)) @ rng.standard_normal((k, 80))
    for value in (rankme(x), rankme_pca(x), participation_ratio(x), stable_rank(x)):
        assert value <= k * (1 + 1e-3)
    assert rankme(x) > 0.5 * k
    assert np.count_nonzero(eigenspectrum(x)) == k


@pytest.mark.parametrize("a", [0.6, 1.0, 1.5, 2.0])
def test_alpha_req_recovers_sampled_power_law(a: float) -> None:
    x = power_law_cloud(np.random.default_rng(int(a * 10)), 10000, 128, a)
    fit = alpha_req_fit(x)
    assert abs(fit.alpha - a) < 0.05
    assert fit.r2 > 0.99
    assert fit.window == (6, 100)


def test_alpha_req_exact_spectrum_construction() -> None:
    """Data whose sample covariance has exactly lambda_k = 2 k^-1.3: alpha is exact, R^2 = 1."""
    rng = np.random.default_rng(8)
    n, d, a = 400, 120, 1.3
    lam = 2.0 * np.arange(1, d + 1.0) ** -a
    z = rng.standard_normal((n, d))
    z -= z.mean(axis=0)
    u, _ = np.linalg.qr(z)  # (n, d) orthonormal columns, each orthogonal to the ones vector
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x = (u * np.sqrt((n - 1) * lam)) @ v.T + 10.0
    np.testing.assert_allclose(eigenspectrum(x), lam, rtol=1e-8)
    for weighted in (True, False):
        fit = alpha_req_fit(x, weighted=weighted)
        assert fit.alpha == pytest.approx(a, abs=1e-8)
        assert fit.r2 == pytest.approx(1.0, abs=1e-10)
        assert fit.intercept == pytest.approx(math.log(2.0), abs=1e-7)


def test_alpha_req_weighted_fit_matches_polyfit() -> None:
    rng = np.random.default_rng(9)
    lam = np.arange(1, 301.0) ** -1.1 * np.exp(rng.normal(0, 0.2, 300))
    lam = np.sort(lam)[::-1]
    k = np.arange(6, 101)
    y = np.log(lam[5:100])
    # polyfit minimises sum (w_i * resid_i)^2: w = sqrt(1/k) gives weights 1/k on squared residuals.
    slope_w, c_w = np.polyfit(np.log(k), y, 1, w=np.sqrt(1.0 / k))
    slope_u, c_u = np.polyfit(np.log(k), y, 1)
    fw = alpha_req_from_spectrum(lam, (6, 100), True)
    fu = alpha_req_from_spectrum(lam, (6, 100), False)
    assert fw.alpha == pytest.approx(-slope_w, rel=1e-10) and fw.intercept == pytest.approx(c_w, rel=1e-10)
    assert fu.alpha == pytest.approx(-slope_u, rel=1e-10) and fu.intercept == pytest.approx(c_u, rel=1e-10)
    resid = y - (c_u + slope_u * np.log(k))
    assert fu.r2 == pytest.approx(1 - (resid**2).sum() / ((y - y.mean()) ** 2).sum(), rel=1e-10)
    assert fw.alpha != pytest.approx(fu.alpha, rel=1e-4)  # the weighting matters


def test_alpha_req_excludes_ranks_beyond_nonzero_eigenvalues() -> None:
    lam = np.zeros(200)
    lam[:40] = np.arange(1, 41.0) ** -0.9
    fit = alpha_req_from_spectrum(lam[::-1].copy(), (6, 100), True)  # any input order
    assert fit.alpha == pytest.approx(0.9, abs=1e-10)
    assert fit.window == (6, 40)
    # Exactly 3 usable ranks still fit; 2 do not.
    assert not math.isnan(alpha_req_from_spectrum(lam[:8], (6, 100)).alpha)
    short = alpha_req_from_spectrum(lam[:7], (6, 100))
    assert math.isnan(short.alpha) and math.isnan(short.r2) and short.window == (6, 100)


def test_alpha_req_window_is_never_mutated() -> None:
    x = power_law_cloud(np.random.default_rng(10), 2000, 120, 1.0)
    window = [6, 100]
    first = alpha_req(x, window=window)  # type: ignore[arg-type]
    second = alpha_req(x, window=window)  # type: ignore[arg-type]
    assert window == [6, 100]
    assert first == second
    assert isinstance(alpha_req_fit(x), AlphaFit)


def test_alpha_req_nan_when_too_few_points() -> None:
    x = np.random.default_rng(11).standard_normal((8, 50))  # 7 non-zero centred eigenvalues
    assert math.isnan(alpha_req(x))
    assert math.isnan(spectral_metrics(x)["alpha_req"])
    assert not math.isnan(alpha_req(x, window=(1, 100)))


def test_anisotropy_known_cases() -> None:
    rng = np.random.default_rng(12)
    v = rng.standard_normal(16)
    same = np.outer(rng.uniform(0.5, 2.0, 30), v)
    assert anisotropy(same, n_pairs=0) == pytest.approx(1.0)
    assert anisotropy(same) == pytest.approx(1.0)
    opposite = np.vstack([v, -v])
    assert anisotropy(opposite, n_pairs=0) == pytest.approx(-1.0)
    x = rng.standard_normal((300, 8)) + 1.0
    with_zeros = np.vstack([x, np.zeros((20, 8))])
    assert anisotropy(with_zeros, n_pairs=0) == pytest.approx(anisotropy(x, n_pairs=0), rel=1e-12)
    exact = ref_mean_cosine(x)
    assert anisotropy(x, n_pairs=20000, seed=3) == pytest.approx(exact, abs=0.02)
    assert anisotropy(x, seed=4) == anisotropy(x, seed=4)


def test_top_pc_share_known_answer() -> None:
    rng = np.random.default_rng(13)
    x = rng.standard_normal((50000, 5)) * np.sqrt([10.0, 1, 1, 1, 1])
    assert top_pc_share(x) == pytest.approx(10 / 14, rel=0.02)


# ----------------------------------------------------------------------------- degenerate and bad input
def test_identical_points_give_documented_values() -> None:
    x = np.tile(np.array([1.0, -2.0, 3.0]), (10, 1))
    m = spectral_metrics(x)
    for key in ("rankme_pca", "participation_ratio", "top_pc_share", "alpha_req", "alpha_req_r2"):
        assert math.isnan(m[key]), key
    assert m["rankme"] == pytest.approx(1.0, abs=1e-5)  # raw spectrum: rank one
    assert m["stable_rank"] == pytest.approx(1.0)
    assert m["anisotropy"] == pytest.approx(1.0)
    assert np.all(eigenspectrum(x) == 0)


def test_all_zero_points_are_nan_not_crash() -> None:
    m = spectral_metrics(np.zeros((5, 4)))
    assert all(math.isnan(v) for v in m.values())
    assert math.isnan(anisotropy(np.zeros((5, 4))))


ALL_FUNCTIONS = [
    rankme,
    rankme_pca,
    eigenspectrum,
    alpha_req,
    participation_ratio,
    stable_rank,
    anisotropy,
    top_pc_share,
    spectral_metrics,
]


@pytest.mark.parametrize("fn", ALL_FUNCTIONS)
@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        (np.empty((0, 3)), ValueError, "at least 2 points"),
        (np.ones((1, 3)), ValueError, "at least 2 points"),
        (np.ones((4, 0)), ValueError, "at least 1 dimension"),
        (np.ones(5), ValueError, "2-D"),
        (np.ones((2, 3, 4)), ValueError, "2-D"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError, "NaN or Inf"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), ValueError, "prepare_points"),
        (np.array([["a", "b"], ["c", "d"]]), TypeError, "`x`"),
        (np.ones((3, 3), dtype=bool), TypeError, "`x`"),
    ],
)
def test_bad_input_raises_naming_x(
    fn: Callable[[np.ndarray], object], bad: np.ndarray, exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        fn(bad)


@pytest.mark.parametrize("window", [(0, 100), (6, 7), (10, 5), (6.0, 100), (6,), "ab", None])
def test_bad_window(window: object) -> None:
    x = np.random.default_rng(0).standard_normal((20, 5))
    with pytest.raises(ValueError, match="window"):
        alpha_req(x, window=window)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        spectral_metrics(x, window=window)  # type: ignore[arg-type]


def test_other_bad_arguments() -> None:
    x = np.random.default_rng(0).standard_normal((20, 5))
    with pytest.raises(ValueError, match="eps"):
        rankme(x, eps=-1.0)
    with pytest.raises(ValueError, match="n_pairs"):
        anisotropy(x, n_pairs=-3)
    with pytest.raises(ValueError, match="seed"):
        anisotropy(x, seed=-1)
    with pytest.raises(ValueError, match="eigvals"):
        alpha_req_from_spectrum(np.ones((3, 3)))
    with pytest.raises(ValueError, match="eigvals"):
        alpha_req_from_spectrum(np.array([1.0, np.nan, 0.5]))
    with pytest.raises(ValueError, match="non-negative"):
        alpha_req_from_spectrum(np.array([1.0, -0.5, 0.2]))


def test_integer_input_is_accepted() -> None:
    x = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=np.int32)
    assert rankme(x) == pytest.approx(ref_rankme(x.astype(float)), rel=1e-6)
