from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from topomon.metrics.spectral import spectral_metrics
from topomon.metrics.spectral_torch import spectral_metrics_torch

KEYS = (
    "rankme",
    "rankme_pca",
    "alpha_req",
    "alpha_req_r2",
    "participation_ratio",
    "stable_rank",
    "anisotropy",
    "top_pc_share",
)


def power_law(n: int, d: int, seed: int, a: float = 0.7, offset: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * np.arange(1, d + 1.0) ** -a) @ q.T + offset * rng.standard_normal(d)


def assert_same(
    got: dict[str, float], want: dict[str, float], rtol: float = 1e-9, atol: float = 1e-12
) -> None:
    assert set(got) == set(KEYS) and set(want) == set(KEYS)
    for k in KEYS:
        assert isinstance(got[k], float), k
        if math.isnan(want[k]):
            assert math.isnan(got[k]), f"{k}: numpy NaN, torch {got[k]}"
        else:
            assert got[k] == pytest.approx(want[k], rel=rtol, abs=atol), k


# ----------------------------------------------------------------------------- agreement with numpy
@pytest.mark.parametrize(
    ("n", "d"),
    [(300, 40), (40, 300), (64, 64), (2, 1), (2, 7), (9, 1), (150, 120), (120, 150)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_random_shapes(n: int, d: int, seed: int) -> None:
    x = power_law(n, d, seed)
    assert_same(spectral_metrics_torch(torch.from_numpy(x)), spectral_metrics(x))


@pytest.mark.parametrize("window", [(1, 3), (2, 10), (12, 100), (6, 500)])
def test_matches_numpy_windows(window: tuple[int, int]) -> None:
    x = power_law(200, 80, 3, a=1.0)
    want = spectral_metrics(x, window=window)
    assert_same(spectral_metrics_torch(torch.from_numpy(x), window=window), want)
    assert not math.isnan(want["alpha_req"])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 40),
    d=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(0.0, 10.0),
)
def test_matches_numpy_property(n: int, d: int, seed: int, scale: float, offset: float) -> None:
    x = scale * power_law(n, d, seed, offset=offset)
    assert_same(spectral_metrics_torch(torch.from_numpy(x)), spectral_metrics(x), rtol=1e-7, atol=1e-10)


def test_float32_input_is_computed_in_float64() -> None:
    x = power_law(100, 30, 5).astype(np.float32)
    # numpy upcasts the same float32 values: the results agree to float64 rounding, not float32's
    assert_same(spectral_metrics_torch(torch.from_numpy(x)), spectral_metrics(x))


def test_integer_tensor_equals_float() -> None:
    xi = torch.from_numpy(np.random.default_rng(0).integers(-5, 6, size=(50, 12)))
    assert_same(spectral_metrics_torch(xi), spectral_metrics(xi.numpy()))


def test_float32_compute_close_to_float64_when_well_conditioned() -> None:
    # float32 is only a fair approximation when the spectrum spans few decades: with a large mean or
    # a steep decay its tolerance (max(n, d) * 1.2e-7 * lambda_max) zeroes real eigenvalues
    x = torch.from_numpy(power_law(400, 64, 2, a=0.3, offset=0.0))
    lo = spectral_metrics_torch(x, dtype=torch.float32)
    hi = spectral_metrics_torch(x)
    for k in KEYS:
        assert lo[k] == pytest.approx(hi[k], rel=2e-3, abs=1e-5), k


def test_input_not_modified_and_grad_ignored() -> None:
    x = torch.from_numpy(power_law(30, 10, 0)).requires_grad_(True)
    before = x.detach().clone()
    out = spectral_metrics_torch(x)
    assert torch.equal(x.detach(), before)
    assert_same(out, spectral_metrics(before.numpy()))


# ----------------------------------------------------------------------------- low rank, degenerate
@pytest.mark.parametrize(("n", "d", "k"), [(200, 50, 5), (30, 80, 4), (60, 60, 1)])
def test_low_rank_matches_numpy(n: int, d: int, k: int) -> None:
    rng = np.random.default_rng(k)
    x = rng.standard_normal((n, k)) @ rng.standard_normal((k, d))  # centred rank <= k
    got = spectral_metrics_torch(torch.from_numpy(x), window=(1, 3) if k >= 3 else (6, 100))
    want = spectral_metrics(x, window=(1, 3) if k >= 3 else (6, 100))
    for key in ("rankme", "rankme_pca", "participation_ratio", "stable_rank", "anisotropy", "top_pc_share"):
        assert got[key] == pytest.approx(want[key], rel=1e-7), key
    # rankme_pca: each of the min(n, d) - k zero eigenvalues adds eps = 1e-7 to p (Li et al., reptrix)
    assert got["rankme_pca"] <= k * (1 + 1e-3) and got["participation_ratio"] <= k + 1e-6
    if k == 1:  # one direction: the window has no 3 positive eigenvalues -> NaN fit, as numpy
        assert math.isnan(want["alpha_req"]) and math.isnan(got["alpha_req"])
        assert got["top_pc_share"] == pytest.approx(1.0)
    else:
        assert got["alpha_req"] == pytest.approx(want["alpha_req"], rel=1e-6)


def test_identical_points() -> None:
    x = np.tile(np.array([[1.0, -2.0, 3.0]]), (6, 1))
    got = spectral_metrics_torch(torch.from_numpy(x))
    assert_same(got, spectral_metrics(x))
    for k in ("rankme_pca", "alpha_req", "alpha_req_r2", "participation_ratio", "top_pc_share"):
        assert math.isnan(got[k]), k
    assert got["rankme"] == pytest.approx(1.0, abs=1e-5)  # one raw direction
    assert got["stable_rank"] == pytest.approx(1.0)
    assert got["anisotropy"] == pytest.approx(1.0)


def test_all_zero_is_all_nan() -> None:
    got = spectral_metrics_torch(torch.zeros(5, 4))
    assert all(math.isnan(v) for v in got.values())
    assert_same(got, spectral_metrics(np.zeros((5, 4))))


def test_one_nonzero_row_has_no_anisotropy() -> None:
    x = np.zeros((4, 3))
    x[2] = [1.0, 2.0, 2.0]
    got = spectral_metrics_torch(torch.from_numpy(x))
    assert math.isnan(got["anisotropy"])
    assert_same(got, spectral_metrics(x))


def test_zero_rows_excluded_from_anisotropy() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    got = spectral_metrics_torch(torch.from_numpy(x))
    # pairs of the 3 non-zero rows: cos = 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2 / 3
    assert got["anisotropy"] == pytest.approx(math.sqrt(2) / 3)
    assert_same(got, spectral_metrics(x))


def test_identity_known_values() -> None:
    got = spectral_metrics_torch(torch.eye(4, dtype=torch.float64))
    assert got["rankme"] == pytest.approx(4.0, rel=1e-5)
    assert got["stable_rank"] == pytest.approx(4.0)
    assert got["anisotropy"] == pytest.approx(0.0, abs=1e-15)
    assert got["rankme_pca"] == pytest.approx(3.0, rel=1e-5)  # centred: 3 equal variances (+ eps terms)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("x", "exc", "match"),
    [
        (np.ones((4, 3)), TypeError, "torch.Tensor"),
        ([[1.0, 2.0], [3.0, 4.0]], TypeError, "torch.Tensor"),
        (torch.ones(4, 3, dtype=torch.bool), TypeError, "real numeric"),
        (torch.ones(4, 3, dtype=torch.complex64), TypeError, "real numeric"),
        (torch.ones(5), ValueError, "2-D"),
        (torch.ones(2, 3, 4), ValueError, "2-D"),
        (torch.ones(1, 3), ValueError, "at least 2 points"),
        (torch.ones(3, 0), ValueError, "at least 1 dimension"),
        (torch.tensor([[1.0, float("nan")], [1.0, 2.0], [0.0, float("inf")]]), ValueError, "2 row"),
    ],
)
def test_rejects_bad_x(x: object, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        spectral_metrics_torch(x)  # type: ignore[arg-type]


@pytest.mark.parametrize("window", [(0, 10), (5, 6), (5,), "6-100", (6.0, 100), (True, 100)])
def test_rejects_bad_window(window: object) -> None:
    with pytest.raises(ValueError, match="window"):
        spectral_metrics_torch(torch.ones(4, 3), window=window)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64, "float64"])
def test_rejects_bad_dtype(dtype: object) -> None:
    with pytest.raises(TypeError, match="dtype"):
        spectral_metrics_torch(torch.ones(4, 3), dtype=dtype)  # type: ignore[arg-type]


def test_window_not_mutated() -> None:
    window = [6, 100]
    spectral_metrics_torch(torch.from_numpy(power_law(50, 20, 0)), window=window)  # type: ignore[arg-type]
    assert window == [6, 100]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_numpy() -> None:
    x = power_law(500, 120, 7)
    assert_same(spectral_metrics_torch(torch.from_numpy(x).cuda()), spectral_metrics(x), rtol=1e-8)
