from __future__ import annotations

import numpy as np
import pytest

from topomon.metrics.preprocess import Prepared, prepare_points, subsample_indices, token_mask
from topomon.metrics.spectral import rankme_pca


def _reference_mask(mask: np.ndarray, exclude_first: bool) -> np.ndarray:
    """Loop-based reference: keep non-pad positions, skip the first non-pad one of each row."""
    out = np.zeros(mask.shape, dtype=bool)
    for b in range(mask.shape[0]):
        seen = False
        for t in range(mask.shape[1]):
            if mask[b, t] == 1:
                if exclude_first and not seen:
                    seen = True
                    continue
                out[b, t] = True
    return out


# ----------------------------------------------------------------------------- token_mask
def test_token_mask_right_and_left_padding() -> None:
    right = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert token_mask(right).tolist() == [[False, True, True, False, False], [False, True, True, True, True]]
    assert token_mask(left).tolist() == [[False, False, False, True, True], [False, True, True, True, True]]
    assert token_mask(left, exclude_first=False).tolist() == (left == 1).tolist()


def test_token_mask_matches_loop_reference_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        b, t = rng.integers(1, 6), rng.integers(1, 9)
        m = (rng.random((b, t)) < 0.6).astype(np.int64)
        m[0] = 0  # an all-pad row must stay all False
        for ex in (True, False):
            np.testing.assert_array_equal(token_mask(m, exclude_first=ex), _reference_mask(m, ex))


def test_token_mask_accepts_bool_and_float_and_does_not_mutate() -> None:
    m = np.array([[True, True, False]])
    before = m.copy()
    assert token_mask(m).tolist() == [[False, True, False]]
    np.testing.assert_array_equal(m, before)
    assert token_mask(m.astype(np.float32)).dtype == np.bool_


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        (np.array([1, 1, 0]), ValueError, "2-D"),
        (np.ones((2, 3, 1)), ValueError, "2-D"),
        (np.array([[0, 2, 1]]), ValueError, "only 0 and 1"),
        (np.array([[0.5, 1.0]]), ValueError, "only 0 and 1"),
        (np.array([["a", "b"]]), TypeError, "attention_mask"),
    ],
)
def test_token_mask_bad_input(bad: np.ndarray, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        token_mask(bad)


# ----------------------------------------------------------------------------- prepare_points
def test_prepare_points_drops_and_counts_nonfinite_and_outliers() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 8))
    x[3, 2] = np.nan
    x[7, 0] = np.inf
    x[10] *= 100.0  # norm ~ 100x the median
    p = prepare_points(x)
    assert isinstance(p, Prepared)
    assert (p.n_nonfinite, p.n_outliers) == (2, 1)
    keep = np.setdiff1d(np.arange(50), [3, 7, 10])
    np.testing.assert_array_equal(p.points, x[keep])
    assert p.points.dtype == np.float64
    assert np.isnan(x[3, 2])  # input untouched


def test_prepare_points_threshold_is_relative_to_median_norm() -> None:
    x = np.zeros((5, 2))
    x[:, 0] = [1.0, 1.0, 1.0, 9.9, 10.1]  # median norm 1
    assert prepare_points(x, outlier_factor=10.0, treatment="cut").n_outliers == 1
    assert prepare_points(x, outlier_factor=5.0, treatment="cut").n_outliers == 2
    assert prepare_points(x, outlier_factor=None, treatment="cut").n_outliers == 0
    # the robust rule also drops the 9.9x token (a massive token: > 3x the median, the MAD is 0)
    assert prepare_points(x, outlier_factor=10.0).n_outliers == 2
    # Median norm 0 (mostly zero rows): no scale, nothing dropped.
    z = np.zeros((5, 2))
    z[0] = 3.0
    assert prepare_points(z).n_outliers == 0


def test_prepare_points_normalize_and_center() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 5)) * 3 + 7
    x[0] = 0.0
    p = prepare_points(x, outlier_factor=None, normalize=True)
    norms = np.linalg.norm(p.points, axis=1)
    np.testing.assert_allclose(norms[1:], 1.0)
    assert norms[0] == 0.0  # zero rows stay zero, no NaN
    c = prepare_points(x, outlier_factor=None, normalize=True, center=True).points
    np.testing.assert_allclose(c.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(c, p.points - p.points.mean(axis=0))


def test_prepare_points_empty_is_fine() -> None:
    p = prepare_points(np.empty((0, 4)))
    assert p.points.shape == (0, 4) and p.n_outliers == 0 and p.n_nonfinite == 0


@pytest.mark.parametrize(
    ("bad", "kwargs", "exc", "match"),
    [
        (np.ones(4), {}, ValueError, "2-D"),
        (np.ones((2, 2, 2)), {}, ValueError, "2-D"),
        (np.array([["a"]]), {}, TypeError, "`x`"),
        (np.ones((3, 2), dtype=bool), {}, TypeError, "`x`"),
        (np.ones((3, 2), dtype=complex), {}, TypeError, "complex"),
        (np.ones((3, 2)), {"outlier_factor": 0.0}, ValueError, "outlier_factor"),
        (np.ones((3, 2)), {"outlier_factor": -1.0}, ValueError, "outlier_factor"),
        (np.ones((3, 2)), {"outlier_factor": float("nan")}, ValueError, "outlier_factor"),
    ],
)
def test_prepare_points_bad_input(bad: np.ndarray, kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        prepare_points(bad, **kwargs)


# ----------------------------------------------------------------------------- massive activations
def test_planted_massive_activations_collapse_rank_unless_filtered() -> None:
    """A few huge-norm tokens (Sun et al. 2024) collapse the centred effective rank; the filter fixes it."""
    rng = np.random.default_rng(3)
    n, d, n_planted = 600, 64, 5
    clean = rng.standard_normal((n, d))
    x = clean.copy()
    rows = rng.choice(n, size=n_planted, replace=False)
    direction = np.zeros(d)
    direction[[3, 17]] = [1.0, -0.5]  # massive activations live in a few fixed channels
    x[rows] += 150.0 * np.sqrt(d) * direction * rng.uniform(0.8, 1.2, size=(n_planted, 1))
    reference = rankme_pca(clean)
    assert reference > 0.8 * d
    assert rankme_pca(x) < 0.1 * reference  # collapse without the filter
    p = prepare_points(x)
    assert p.n_outliers == n_planted
    assert rankme_pca(p.points) > 0.95 * reference


def test_bos_position_removed_by_token_mask() -> None:
    """Massive first-position states in a left-padded batch: token_mask alone restores the rank."""
    rng = np.random.default_rng(4)
    b, t, d = 24, 20, 32
    h = rng.standard_normal((b, t, d))
    mask = np.ones((b, t), dtype=np.int64)
    pads = rng.integers(0, 6, size=b)
    for i, k in enumerate(pads):
        mask[i, :k] = 0
        h[i, k, 0] = 5000.0  # the first real token
    kept = h[token_mask(mask)]
    all_real = h[mask == 1]
    assert kept.shape[0] == int(mask.sum()) - b
    assert rankme_pca(all_real) < 2.0
    assert rankme_pca(kept) > 0.8 * d


# ----------------------------------------------------------------------------- subsample_indices
def test_subsample_indices_contract() -> None:
    idx = subsample_indices(1000, 64, seed=7)
    assert idx.dtype == np.int64 and idx.shape == (64,)
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < 1000
    np.testing.assert_array_equal(idx, subsample_indices(1000, 64, seed=7))
    assert not np.array_equal(idx, subsample_indices(1000, 64, seed=8))
    np.testing.assert_array_equal(subsample_indices(5, 5, 0), np.arange(5))
    np.testing.assert_array_equal(subsample_indices(5, 50, 3), np.arange(5))
    assert subsample_indices(5, 0, 0).shape == (0,)


def test_subsample_indices_is_roughly_uniform() -> None:
    counts = np.zeros(20)
    for s in range(400):
        counts[subsample_indices(20, 5, s)] += 1
    # Each index is chosen with probability 1/4: 100 expected, sd ~ 8.7.
    assert counts.min() > 60 and counts.max() < 140


@pytest.mark.parametrize(("n", "k", "seed"), [(-1, 2, 0), (5, -2, 0), (5, 2, -1), (5.0, 2, 0), (5, True, 0)])
def test_subsample_indices_bad_input(n: object, k: object, seed: object) -> None:
    with pytest.raises(ValueError, match="non-negative int"):
        subsample_indices(n, k, seed)  # type: ignore[arg-type]
