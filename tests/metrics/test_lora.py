from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from topomon.metrics.lora import (
    lora_gram_metrics,
    lora_gram_overlap,
    lora_gram_singular_values,
    lora_update_metrics,
    lora_update_singular_values,
    lora_update_subspace,
    subspace_overlap,
)


def _orthonormal(m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(rng.normal(size=(m, k)))[0]


def _numerical_rank(s: np.ndarray, tol: float = 1e-9) -> int:
    return int(np.sum(s > tol * s.max()))


RANDOM_FACTORS = given(
    seed=st.integers(0, 2**32 - 1),
    out=st.integers(1, 12),
    inp=st.integers(1, 12),
    r=st.integers(1, 6),
    scaling=st.floats(-4, 4).filter(lambda s: abs(s) > 1e-3),
)
"""Random factor shapes and scalings: each test draws its own factors from ``seed``."""


@settings(max_examples=60, deadline=None)
@RANDOM_FACTORS
def test_singular_values_match_dense_svd(seed: int, out: int, inp: int, r: int, scaling: float) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(r, inp)), rng.normal(size=(out, r))
    dense = np.linalg.svd(scaling * b @ a, compute_uv=False)
    expected = np.zeros(r)
    expected[: min(r, dense.size)] = dense[:r]
    s = lora_update_singular_values(a, b, scaling)
    assert s.shape == (r,)
    np.testing.assert_allclose(s, expected, atol=1e-10 * max(1.0, dense.max()))


@pytest.mark.parametrize(("true_rank", "r"), [(1, 4), (3, 8), (8, 8)])
def test_update_of_known_rank_reports_that_rank(true_rank: int, r: int) -> None:
    rng = np.random.default_rng(true_rank * 10 + r)
    # B = B1 @ C has rank true_rank even though the adapter has rank r
    b = rng.normal(size=(40, true_rank)) @ rng.normal(size=(true_rank, r))
    a = rng.normal(size=(r, 30))
    s = lora_update_singular_values(a, b, 2.0)
    assert _numerical_rank(s) == true_rank
    u, v = lora_update_subspace(a, b, 2.0)
    assert u.shape == (40, true_rank) and v.shape == (30, true_rank)


@pytest.mark.parametrize("r", [1, 2, 5, 16])
def test_equal_singular_values_give_effective_and_stable_rank_r(r: int) -> None:
    rng = np.random.default_rng(r)
    c, scaling = 3.0, 0.5
    a = c * _orthonormal(50, r, rng).T  # (r, in), orthonormal rows times c
    b = _orthonormal(40, r, rng)  # (out, r), orthonormal columns
    np.testing.assert_allclose(lora_update_singular_values(a, b, scaling), np.full(r, c * scaling))
    exact = lora_update_metrics(a, b, scaling, eps=0.0)
    assert exact["lora_effective_rank"] == pytest.approx(r, rel=1e-12)
    assert exact["lora_stable_rank"] == pytest.approx(r, rel=1e-12)
    assert exact["lora_norm"] == pytest.approx(math.sqrt(r) * c * scaling, rel=1e-12)
    eps = 1e-7
    p = 1.0 / r + eps
    analytic = math.exp(-r * p * math.log(p))  # RankMe with its eps term
    assert lora_update_metrics(a, b, scaling)["lora_effective_rank"] == pytest.approx(analytic, rel=1e-12)


def test_rank_one_update_metrics() -> None:
    rng = np.random.default_rng(7)
    a = np.outer(np.ones(4), rng.normal(size=20))  # 4 identical rows: rank 1
    b = rng.normal(size=(10, 4))
    m = lora_update_metrics(a, b, 1.0, eps=0.0)
    assert m["lora_effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert m["lora_stable_rank"] == pytest.approx(1.0, abs=1e-9)


def test_norm_is_frobenius_norm_of_dense_update() -> None:
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(6, 25)), rng.normal(size=(17, 6))
    m = lora_update_metrics(a, b, -0.25)
    dense = -0.25 * b @ a
    assert m["lora_norm"] == pytest.approx(np.linalg.norm(dense), rel=1e-12)
    s = np.linalg.svd(dense, compute_uv=False)
    assert m["lora_stable_rank"] == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-10)
    assert 1.0 <= m["lora_effective_rank"] <= 6.0


def test_zero_update_at_lora_init_has_nan_ranks_and_empty_subspace() -> None:
    a, b = np.random.default_rng(9).normal(size=(4, 12)), np.zeros((8, 4))
    m = lora_update_metrics(a, b, 2.0)
    assert math.isnan(m["lora_effective_rank"]) and math.isnan(m["lora_stable_rank"])
    assert m["lora_norm"] == 0.0
    u, v = lora_update_subspace(a, b, 2.0)
    assert u.shape == (8, 0) and v.shape == (12, 0)
    assert math.isnan(subspace_overlap(u, u))


@pytest.mark.parametrize("scaling", [1.5, -1.5])
def test_subspace_reconstructs_update_and_spans_dense_singular_vectors(scaling: float) -> None:
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(5, 30)), rng.normal(size=(20, 5))
    dense = scaling * b @ a
    u, v = lora_update_subspace(a, b, scaling)
    s = lora_update_singular_values(a, b, scaling)
    np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(v.T @ v, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(u @ np.diag(s) @ v.T, dense, atol=1e-10)
    u2, v2 = lora_update_subspace(a, b, scaling, k=2)
    ud, _, vdt = np.linalg.svd(dense)
    assert subspace_overlap(u2, ud[:, :2]) == pytest.approx(1.0, abs=1e-9)
    assert subspace_overlap(v2, vdt[:2].T) == pytest.approx(1.0, abs=1e-9)


def test_overlap_zero_for_orthogonal_updates_and_one_for_identical() -> None:
    rng = np.random.default_rng(11)
    basis = _orthonormal(32, 8, rng)
    a1, a2 = rng.normal(size=(4, 16)), rng.normal(size=(4, 16))
    b1 = basis[:, :4] @ rng.normal(size=(4, 4))  # columns in span(basis[:, :4])
    b2 = basis[:, 4:] @ rng.normal(size=(4, 4))  # columns in the orthogonal span(basis[:, 4:])
    u1, _ = lora_update_subspace(a1, b1, 1.0)
    u2, _ = lora_update_subspace(a2, b2, 1.0)
    assert subspace_overlap(u1, u2) == pytest.approx(0.0, abs=1e-12)
    # the same update written with other factors (B G, G^-1 A) has the same subspaces
    g = rng.normal(size=(4, 4)) + 4 * np.eye(4)
    u1b, v1b = lora_update_subspace(np.linalg.solve(g, a1), b1 @ g, 1.0)
    _, v1 = lora_update_subspace(a1, b1, 1.0)
    assert subspace_overlap(u1, u1b) == pytest.approx(1.0, abs=1e-9)
    assert subspace_overlap(v1, v1b) == pytest.approx(1.0, abs=1e-9)


def test_overlap_known_partial_value_and_basis_invariance() -> None:
    rng = np.random.default_rng(12)
    e = np.eye(6)
    assert subspace_overlap(e[:, :2], e[:, 1:3]) == pytest.approx(0.5)
    assert subspace_overlap(e[:, :1], e[:, :3]) == pytest.approx(1.0)  # nested: normalised by min(k1, k2)
    q = _orthonormal(3, 3, rng)
    u1, u2 = _orthonormal(6, 3, rng), _orthonormal(6, 2, rng)
    assert subspace_overlap(u1 @ q, u2) == pytest.approx(subspace_overlap(u1, u2), rel=1e-12)
    assert subspace_overlap(u1, u2) == pytest.approx(subspace_overlap(u2, u1), rel=1e-12)
    # mean squared cosine of the principal angles
    cosines = np.linalg.svd(u1.T @ u2, compute_uv=False)
    assert subspace_overlap(u1, u2) == pytest.approx(np.mean(cosines**2), rel=1e-12)


@pytest.mark.parametrize(
    ("a", "b", "scaling", "exc", "match"),
    [
        (np.ones((3, 5)), np.ones((4, 2)), 1.0, ValueError, "share the rank"),
        (np.ones(5), np.ones((4, 1)), 1.0, ValueError, r"A must have shape \(r, in\)"),
        (np.ones((2, 5)), np.ones((0, 2)), 1.0, ValueError, "B must not be empty"),
        (np.full((2, 5), np.nan), np.ones((4, 2)), 1.0, ValueError, "A must be finite"),
        (np.ones((2, 5)), np.ones((4, 2)), True, TypeError, "scaling"),
        (np.ones((2, 5)), np.ones((4, 2)), float("inf"), ValueError, "scaling"),
        (np.ones((2, 5)), np.ones((4, 2)).astype(bool), 1.0, TypeError, "B must be a real"),
    ],
)
def test_factor_validation(a: np.ndarray, b: np.ndarray, scaling: float, exc: type, match: str) -> None:
    for fn in (lora_update_singular_values, lora_update_metrics, lora_update_subspace):
        with pytest.raises(exc, match=match):
            fn(a, b, scaling)


def test_k_and_eps_validation() -> None:
    a, b = np.ones((2, 5)), np.ones((4, 2))
    with pytest.raises(ValueError, match="k must be between 1 and"):
        lora_update_subspace(a, b, 1.0, k=3)
    with pytest.raises(ValueError, match="k must be between 1 and"):
        lora_update_subspace(a, b, 1.0, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        lora_update_subspace(a, b, 1.0, k=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        lora_update_metrics(a, b, 1.0, eps=-1.0)


def test_overlap_validation() -> None:
    e = np.eye(5)
    with pytest.raises(ValueError, match="same number of rows"):
        subspace_overlap(e[:, :2], np.eye(4)[:, :2])
    with pytest.raises(ValueError, match="orthonormal"):
        subspace_overlap(2 * e[:, :2], e[:, :2])
    with pytest.raises(ValueError, match=r"U2 must have shape \(m, k\)"):
        subspace_overlap(e, np.ones(5))
    with pytest.raises(ValueError, match="more columns than rows"):
        subspace_overlap(np.ones((2, 3)), e)


@settings(max_examples=60, deadline=None)
@RANDOM_FACTORS
@example(seed=1615, out=3, inp=1, r=3, scaling=1.0)  # rank 1 through r=3: the Grams' zeros are ~1e-8
@example(seed=29140, out=1, inp=1, r=5, scaling=1.0)  # an update far smaller than ||A|| ||B||
def test_the_gram_matrices_give_the_factors_spectrum_and_metrics(
    seed: int, out: int, inp: int, r: int, scaling: float
) -> None:
    # what a capture ships when no earlier stage's subspace is compared: A A^T and B^T B
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(r, inp)), rng.normal(size=(out, r))
    want = lora_update_singular_values(a, b, scaling)
    got = lora_gram_singular_values(a @ a.T, b.T @ b, scaling)
    assert got.shape == (r,)
    np.testing.assert_allclose(got, want, atol=1e-7 * max(1.0, want.max()))
    m, g = lora_update_metrics(a, b, scaling), lora_gram_metrics(a @ a.T, b.T @ b, scaling)
    assert m.keys() == g.keys()
    for k in m:
        assert g[k] == pytest.approx(m[k], rel=1e-6)


def test_the_gram_metrics_of_a_zero_update_and_of_a_known_rank() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 30))
    zero = lora_gram_metrics(a @ a.T, np.zeros((4, 4)), 2.0)  # B = 0 at LoRA initialisation
    assert math.isnan(zero["lora_effective_rank"]) and zero["lora_norm"] == 0.0
    b = rng.normal(size=(40, 2)) @ rng.normal(size=(2, 4))  # rank 2 through a rank-4 adapter
    s = lora_gram_singular_values(a @ a.T, b.T @ b, 1.0)
    assert _numerical_rank(s, tol=1e-6) == 2
    with pytest.raises(ValueError, match="same r"):
        lora_gram_singular_values(np.eye(3), np.eye(4), 1.0)


@settings(max_examples=80, deadline=None)
@RANDOM_FACTORS
def test_the_overlap_from_grams_and_projections_equals_the_factors_subspace_overlap(
    seed: int, out: int, inp: int, r: int, scaling: float
) -> None:
    # what a later stage ships: A A^T, B^T B and the factors projected on the earlier bases
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(r, inp)), rng.normal(size=(out, r))
    if seed % 3 == 0:
        b[:, 0] = 0.0  # a rank-deficient update
    u, v = lora_update_subspace(a, b, scaling)
    k = int(rng.integers(1, min(out, inp) + 1))
    refs = [(_orthonormal(out, k, rng), _orthonormal(inp, k, rng))]
    if u.shape[1]:
        refs.append((u[:, : max(1, u.shape[1] // 2)], v[:, : max(1, v.shape[1] // 2)]))  # inside it
    for u_ref, v_ref in refs:
        got = lora_gram_overlap(a @ a.T, b.T @ b, a @ v_ref, b.T @ u_ref)
        if not u.shape[1]:
            assert math.isnan(got)
            continue
        want = 0.5 * (subspace_overlap(u, u_ref) + subspace_overlap(v, v_ref))
        assert got == pytest.approx(want, abs=1e-8)
    if u.shape[1]:
        assert got == pytest.approx(1.0, abs=1e-8)  # a reference inside the update's subspace


def test_the_gram_overlap_of_a_zero_update_an_empty_reference_and_bad_shapes() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 8)), rng.normal(size=(9, 3))
    u_ref, v_ref = _orthonormal(9, 2, rng), _orthonormal(8, 2, rng)
    assert math.isnan(lora_gram_overlap(a @ a.T, np.zeros((3, 3)), a @ v_ref, np.zeros((3, 2))))
    assert math.isnan(lora_gram_overlap(a @ a.T, b.T @ b, np.zeros((3, 0)), np.zeros((3, 0))))
    with pytest.raises(ValueError, match="one k_ref"):
        lora_gram_overlap(a @ a.T, b.T @ b, a @ v_ref, (b.T @ u_ref)[:, :1])
