"""What LoRA updates look like: spectrum, rank, size and subspace of ``Delta W = scaling * B @ A``.

Part of the sequential post-training measurement suite (RESEARCH.md paper 4, arXiv 2605.30524), whose
interventions include LoRA update decorrelation between stages. A LoRA update (Hu et al. 2021) of a
``(out, in)`` weight is ``Delta W = scaling * B @ A`` with ``B (out, r)`` and ``A (r, in)``
(``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rsLoRA). Nothing here materialises the
``(out, in)`` matrix: with thin QR factorisations ``B = Q_B R_B`` and ``A^T = Q_A R_A``,
``Delta W = scaling * Q_B (R_B R_A^T) Q_A^T``, so its singular values and vectors come from the SVD of the
small ``r x r`` core ``R_B R_A^T`` (cost ``O((out + in) r^2)``).

Conventions:

- Singular values are returned sorted in decreasing order, always ``r`` of them (zero-padded when
  ``min(out, in) < r``).
- Effective rank is RankMe's (Garrido et al. 2023): ``p_k = s_k / sum(s) + eps`` with ``eps = 1e-7``,
  ``exp(-sum p_k log p_k)`` over the ``r`` singular values (the singular values themselves, not their
  squares). For ``r`` equal singular values it is ``r`` up to the ``eps`` term (exactly ``r`` with
  ``eps = 0``). Stable rank is ``sum s^2 / max s^2``. Both are NaN for a zero update (as at LoRA
  initialisation, ``B = 0``): it has no spectrum to normalise.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np
import numpy.typing as npt

__all__ = [
    "lora_update_metrics",
    "lora_update_singular_values",
    "lora_gram_metrics",
    "lora_gram_singular_values",
    "lora_gram_overlap",
    "lora_update_subspace",
    "subspace_overlap",
    "load_lora_subspaces",
    "LORA_SUBSPACE_FORMAT",
]


def _matrix(x: npt.ArrayLike, name: str, shape_doc: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape {shape_doc} (2-D), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(arr)))} non-finite values")
    return arr


def _factors(a: npt.ArrayLike, b: npt.ArrayLike, scaling: float) -> tuple[np.ndarray, np.ndarray, float]:
    am = _matrix(a, "A", "(r, in)")
    bm = _matrix(b, "B", "(out, r)")
    if am.shape[0] != bm.shape[1]:
        raise ValueError(f"A (r, in) and B (out, r) must share the rank r, got A {am.shape} and B {bm.shape}")
    return am, bm, _scaling(scaling)


def _scaling(scaling: float) -> float:
    """A LoRA scaling checked as a finite real number."""
    if isinstance(scaling, (bool, np.bool_)) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {scaling!r}")
    if not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be finite, got {scaling!r}")
    return float(scaling)


def _core_svd(
    am: np.ndarray, bm: np.ndarray, scaling: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``Q_B, U, s, Vt, Q_A`` with ``Delta W = Q_B U diag(s) Vt Q_A^T`` (s >= 0, decreasing)."""
    q_b, r_b = np.linalg.qr(bm)  # (out, kb), (kb, r)
    q_a, r_a = np.linalg.qr(am.T)  # (in, ka), (ka, r)
    u, s, vt = np.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (kb, ka)
    if scaling < 0:
        u = -u
    return q_b, u, abs(scaling) * s, vt, q_a


def lora_update_singular_values(A: npt.ArrayLike, B: npt.ArrayLike, scaling: float) -> np.ndarray:
    """Singular values of ``scaling * B @ A`` without forming it (thin QR of ``B`` and ``A^T``).

    Args:
        A: LoRA down-projection, shape ``(r, in)``.
        B: LoRA up-projection, shape ``(out, r)``.
        scaling: the adapter's scaling (``lora_alpha / r`` in PEFT); its sign does not matter.

    Returns:
        Shape ``(r,)``, float64, non-negative and decreasing; zero-padded when ``min(out, in) < r``.

    Raises:
        ValueError: on wrong ndim, empty or non-finite factors, or mismatched ranks.
        TypeError: on non-numeric factors or a non-real ``scaling``.

    Example:
        >>> lora_update_singular_values(np.eye(2, 5), 3.0 * np.eye(4, 2), 0.5)
        array([1.5, 1.5])
    """
    am, bm, sc = _factors(A, B, scaling)
    s = _core_svd(am, bm, sc)[2]
    r = am.shape[0]
    out = np.zeros(r)
    out[: s.shape[0]] = s
    return out


def lora_update_metrics(
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    scaling: float,
    eps: float = 1e-7,
) -> dict[str, float]:
    """Rank and size of a LoRA update ``scaling * B @ A``.

    Args:
        A: shape ``(r, in)``.
        B: shape ``(out, r)``.
        scaling: the adapter's scaling.
        eps: RankMe's smoothing term added to each normalised singular value (``1e-7`` as in Garrido et
            al. 2023); 0 gives the plain exponential entropy.

    Returns:
        ``lora_effective_rank`` (RankMe of the ``r`` singular values, in ``(0, r]`` up to ``eps``),
        ``lora_stable_rank`` (``||Delta W||_F^2 / ||Delta W||_2^2``, in ``[1, r]``) and ``lora_norm``
        (``||Delta W||_F``). The two ranks are NaN for a zero update.

    Raises:
        ValueError: on invalid factors (see :func:`lora_update_singular_values`) or a negative or non-finite
            ``eps``.
        TypeError: on non-numeric factors or a non-real ``scaling``.

    Example:
        >>> m = lora_update_metrics(np.eye(2, 5), np.eye(4, 2), 1.0, eps=0.0)
        >>> m["lora_effective_rank"], m["lora_stable_rank"]
        (2.0, 2.0)
    """
    return _spectrum_metrics(lora_update_singular_values(A, B, scaling), eps)


_GRAM_RTOL = 1e-7
"""Directions of a factor, or of the update, below this fraction of the largest singular value are
not resolved from Gram matrices (their squares sit at float64's rounding of the largest)."""


def lora_gram_singular_values(gram_a: npt.ArrayLike, gram_b: npt.ArrayLike, scaling: float) -> np.ndarray:
    """Singular values of ``scaling * B @ A`` from the Gram matrices ``A A^T`` and ``B^T B`` alone.

    The squared singular values are the eigenvalues of ``B^T B A A^T``, computed as those of the
    symmetric ``H (B^T B) H`` with ``H = (A A^T)^(1/2)``. Singular values at or below ``1e-7`` of
    ``||A|| ||B||`` are returned as 0: they are square roots of eigenvalues at float64's rounding (a
    rank-deficient update's zeros would come back as about ``1e-8`` of it), so the ranks and the
    norm of :func:`lora_gram_metrics` equal the factor path's.

    Args:
        gram_a: ``A A^T``, shape ``(r, r)``.
        gram_b: ``B^T B``, shape ``(r, r)``.
        scaling: the adapter's scaling; its sign does not matter.

    Returns:
        Shape ``(r,)``, float64, non-negative and decreasing, as :func:`lora_update_singular_values`.

    Example:
        >>> a, b = np.eye(2, 5), 3.0 * np.eye(4, 2)
        >>> lora_gram_singular_values(a @ a.T, b.T @ b, 0.5)
        array([1.5, 1.5])
    """
    ga, gb = _grams(gram_a, gram_b)
    sc = _scaling(scaling)
    (sa, wa), (sb, _) = _resolved(ga), _resolved(gb)
    if not (sa.size and sb.size):
        return np.zeros(ga.shape[0])
    half = (wa * sa) @ wa.T
    s = np.sqrt(np.clip(np.linalg.eigvalsh(half @ gb @ half), 0.0, None))[::-1]
    s[s <= sa[-1] * sb[-1] * _GRAM_RTOL] = 0.0  # below the resolution of ||A|| ||B||
    return abs(sc) * s


def lora_gram_metrics(
    gram_a: npt.ArrayLike, gram_b: npt.ArrayLike, scaling: float, eps: float = 1e-7
) -> dict[str, float]:
    """:func:`lora_update_metrics` from the Gram matrices ``A A^T`` and ``B^T B`` of the factors.

    Example:
        >>> a, b = np.eye(2, 5), np.eye(4, 2)
        >>> m = lora_gram_metrics(a @ a.T, b.T @ b, 1.0, eps=0.0)
        >>> m["lora_effective_rank"], m["lora_stable_rank"]
        (2.0, 2.0)
    """
    return _spectrum_metrics(lora_gram_singular_values(gram_a, gram_b, scaling), eps)


def _grams(gram_a: npt.ArrayLike, gram_b: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``A A^T`` and ``B^T B`` checked as finite ``(r, r)`` matrices of one ``r``, symmetrised."""
    ga = _matrix(gram_a, "gram_A", "(r, r)")
    gb = _matrix(gram_b, "gram_B", "(r, r)")
    if ga.shape[0] != ga.shape[1] or ga.shape != gb.shape:
        raise ValueError(f"gram_A and gram_B must be (r, r) of the same r, got {ga.shape} and {gb.shape}")
    return 0.5 * (ga + ga.T), 0.5 * (gb + gb.T)


def _resolved(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A factor's singular values (ascending) and vectors from its Gram matrix, the resolved ones.

    Directions at or below :data:`_GRAM_RTOL` of the largest are left out: float64 rounding.
    """
    lam, w = np.linalg.eigh(gram)
    keep = lam > max(lam[-1] if lam.size else 0.0, 0.0) * _GRAM_RTOL**2
    return np.sqrt(lam[keep]), w[:, keep]


def lora_gram_overlap(
    gram_a: npt.ArrayLike,
    gram_b: npt.ArrayLike,
    av_ref: npt.ArrayLike,
    btu_ref: npt.ArrayLike,
) -> float:
    """The update's subspace overlap with a reference, from ``r x r`` and ``r x k`` numbers only.

    ``0.5 * (subspace_overlap(U, U_ref) + subspace_overlap(V, V_ref))`` where ``U`` and ``V`` are the
    left and right singular vectors of ``B @ A`` (:func:`lora_update_subspace`), computed from the
    Gram matrices ``A A^T``, ``B^T B`` and the projections ``A V_ref`` and ``B^T U_ref``: with
    ``B^T B = W_B L_B W_B^T``, ``Q_B = B W_B L_B^(-1/2)`` is an orthonormal basis of ``B``'s columns,
    ``B A = Q_B (L_B^(1/2) W_B^T W_A L_A^(1/2)) Q_A^T``, and ``U^T U_ref = U_m^T L_B^(-1/2) W_B^T
    (B^T U_ref)`` for the small core's left singular vectors ``U_m`` (and the same on the right).
    Directions below ``1e-7`` of ``||A|| ||B||`` are left out (the factor path keeps them down to
    about ``1e-12``; they are rounding noise of float32 factors).

    Args:
        gram_a: ``A A^T``, shape ``(r, r)``.
        gram_b: ``B^T B``, shape ``(r, r)``.
        av_ref: ``A V_ref``, shape ``(r, k_ref)``, for the reference's right basis ``V_ref (in, k_ref)``.
        btu_ref: ``B^T U_ref``, shape ``(r, k_ref)``, for its left basis ``U_ref (out, k_ref)``.

    Returns:
        The overlap in ``[0, 1]``; NaN for a zero update or an empty reference.

    Example:
        >>> a, b = np.eye(2, 5), np.eye(4, 2)
        >>> u_ref, v_ref = np.eye(4)[:, 1:2], np.eye(5)[:, 1:2]  # one of the update's two directions
        >>> lora_gram_overlap(a @ a.T, b.T @ b, a @ v_ref, b.T @ u_ref)
        1.0
    """
    ga, gb = _grams(gram_a, gram_b)
    r = ga.shape[0]
    av = _matrix(av_ref, "av_ref", "(r, k_ref)") if np.size(av_ref) else np.zeros((r, 0))
    bu = _matrix(btu_ref, "btu_ref", "(r, k_ref)") if np.size(btu_ref) else np.zeros((r, 0))
    if av.shape[0] != r or bu.shape[0] != r or av.shape[1] != bu.shape[1]:
        raise ValueError(
            f"av_ref and btu_ref must be (r, k_ref) with r = {r} and one k_ref, got {av.shape} and {bu.shape}"
        )

    (sa, wa), (sb, wb) = _resolved(ga), _resolved(gb)
    if not (sa.size and sb.size and av.shape[1]):
        return math.nan
    um, s, vmt = np.linalg.svd((sb[:, None] * (wb.T @ wa)) * sa[None, :], full_matrices=False)
    k = int(np.sum(s > sa[-1] * sb[-1] * _GRAM_RTOL))  # resolved relative to ||A|| ||B||
    if k == 0:
        return math.nan
    kmin = min(k, av.shape[1])
    left = um[:, :k].T @ ((wb.T @ bu) / sb[:, None])
    right = vmt[:k] @ ((wa.T @ av) / sa[:, None])
    return float(0.5 * (min(np.sum(left**2) / kmin, 1.0) + min(np.sum(right**2) / kmin, 1.0)))


def _spectrum_metrics(s: np.ndarray, eps: float) -> dict[str, float]:
    """Effective rank, stable rank and Frobenius norm of an update with singular values ``s`` (decreasing)."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a non-negative real number, got {eps!r}")
    if not (math.isfinite(float(eps)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative finite number, got {eps!r}")
    total = float(np.sum(s))
    norm = float(np.sqrt(np.sum(s**2)))
    if total == 0.0:
        return {"lora_effective_rank": math.nan, "lora_stable_rank": math.nan, "lora_norm": norm}
    p = s / total + eps
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return {
        "lora_effective_rank": float(np.exp(-np.sum(plogp))),
        "lora_stable_rank": float(np.sum(s**2) / s[0] ** 2),
        "lora_norm": norm,
    }


def lora_update_subspace(
    A: npt.ArrayLike,
    B: npt.ArrayLike,
    scaling: float,
    k: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` left and right singular vectors of ``Delta W = scaling * B @ A``, from the small SVD.

    Args:
        A: shape ``(r, in)``.
        B: shape ``(out, r)``.
        scaling: the adapter's scaling.
        k: number of singular directions, ``1 <= k <= min(r, out, in)``. ``None`` keeps the numerical rank:
            the singular values above ``s_max * max(out, in) * machine_eps`` (``np.linalg.matrix_rank``'s
            tolerance), so a zero update gives ``k = 0`` (empty bases).

    Returns:
        ``(U, V)``: ``U`` of shape ``(out, k)`` and ``V`` of shape ``(in, k)`` with orthonormal columns, such
        that ``Delta W = U diag(s[:k]) V^T`` when ``k`` is the rank (``s`` from
        :func:`lora_update_singular_values`).

    Raises:
        ValueError: on invalid factors or ``k`` out of range.
        TypeError: on non-numeric factors, a non-real ``scaling`` or a non-int ``k``.

    Example:
        >>> u, v = lora_update_subspace(np.eye(2, 5), np.eye(4, 2), 1.0)
        >>> u.shape, v.shape
        ((4, 2), (5, 2))
    """
    am, bm, sc = _factors(A, B, scaling)
    q_b, u, s, vt, q_a = _core_svd(am, bm, sc)
    max_k = s.shape[0]
    if k is None:
        tol = (s[0] if max_k else 0.0) * max(bm.shape[0], am.shape[1]) * np.finfo(np.float64).eps
        k = int(np.sum(s > tol))
    else:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int or None, got {k!r}")
        if not 1 <= k <= max_k:
            raise ValueError(f"k must be between 1 and min(r, out, in) = {max_k}, got {k}")
    left = q_b @ u[:, :k]
    right = q_a @ vt[:k].T
    return left, right


def subspace_overlap(U1: npt.ArrayLike, U2: npt.ArrayLike) -> float:
    """Mean squared cosine of the principal angles between two subspaces.

    ``||U1^T U2||_F^2 / min(k1, k2)``: 0 for orthogonal subspaces, 1 when the smaller one lies inside the
    larger one (identical subspaces included). Invariant to the choice of orthonormal bases.

    Args:
        U1: shape ``(m, k1)``, orthonormal columns.
        U2: shape ``(m, k2)``, orthonormal columns, same ambient dimension ``m``.

    Returns:
        The overlap in ``[0, 1]``; NaN when ``k1`` or ``k2`` is 0 (an empty subspace: a zero update).

    Raises:
        ValueError: on wrong ndim, ``m = 0``, non-finite entries, different ``m``, or columns that are not
            orthonormal (tolerance ``1e-3`` on ``U^T U - I``, enough for float32 bases).
        TypeError: on non-numeric arrays.

    Example:
        >>> subspace_overlap(np.eye(4)[:, :2], np.eye(4)[:, 1:3])
        0.5
    """
    bases = []
    for name, u in (("U1", U1), ("U2", U2)):
        arr = np.asarray(u)
        if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
            raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise ValueError(f"{name} must have shape (m, k) with m >= 1, got shape {arr.shape}")
        arr = arr.astype(np.float64, copy=False)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite")
        if arr.shape[1] > arr.shape[0]:
            raise ValueError(
                f"{name} has more columns than rows ({arr.shape}): columns cannot be orthonormal"
            )
        err = float(np.max(np.abs(arr.T @ arr - np.eye(arr.shape[1])), initial=0.0))
        if err > 1e-3:
            raise ValueError(f"{name} must have orthonormal columns, got max |U^T U - I| = {err:.3g}")
        bases.append(arr)
    u1, u2 = bases
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(
            "U1 and U2 must have the same number of rows (ambient dimension), "
            f"got {u1.shape[0]} and {u2.shape[0]}"
        )
    kmin = min(u1.shape[1], u2.shape[1])
    if kmin == 0:
        return math.nan
    return float(min(np.sum((u1.T @ u2) ** 2) / kmin, 1.0))


LORA_SUBSPACE_FORMAT = "topomon.lora_subspaces/1"


def load_lora_subspaces(path: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read LoRA update subspaces saved by ``save_lora_subspaces`` (``allow_pickle=False``).

    Args:
        path: the ``.npz`` file.

    Returns:
        ``{module_name: (U (out, k), V (in, k))}``, float64.

    Raises:
        ValueError: a file that is not a topomon subspace file, or one holding pickled objects.
    """
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if "__format__" not in keys or str(z["__format__"]) != LORA_SUBSPACE_FORMAT:
            raise ValueError(
                f"{os.fspath(path)!r} is not a topomon LoRA subspace file (format {LORA_SUBSPACE_FORMAT})"
            )
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        i = 0
        while f"name_{i}" in keys:
            out[str(z[f"name_{i}"])] = (z[f"U_{i}"].astype(np.float64), z[f"V_{i}"].astype(np.float64))
            i += 1
    return out
