"""What the model predicts: entropy, confidence, accuracy, calibration and likelihood of next tokens.

The sequential post-training collapse paper (RESEARCH.md paper 4, arXiv 2605.30524) links excess
representation concentration to poorer calibration; these metrics measure the predictions directly.
They consume the per-token arrays of :func:`topomon.capture.logit_stats.reduce_logits` (computed on
the training process, so only ``O(tokens)`` numbers cross to the worker, never ``(B, T, V)`` logits).

Conventions:

- Entropies and likelihoods use the natural log (nats).
- ECE (expected calibration error, Guo et al. 2017, "On Calibration of Modern Neural Networks") uses
  ``n_bins`` equal-width confidence bins ``(k/n_bins, (k+1)/n_bins]`` (a confidence of exactly 0 falls
  in the first bin) and is ``sum_b (n_b / n) * |acc_b - conf_b|`` (the L1, count-weighted variant).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from topomon._validate import check_int

__all__ = [
    "LOGIT_STAT_KEYS",
    "expected_calibration_error",
    "logit_metrics",
    "predictive_entropy",
]

#: Keys that :func:`logit_metrics` reads (the output of ``reduce_logits``).
LOGIT_STAT_KEYS: tuple[str, ...] = ("entropy", "top1_prob", "correct", "nll")


def _bool_vector(x: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a boolean (or 0/1) array, got dtype {arr.dtype}")
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must contain only booleans or 0/1, got values outside {{0, 1}}")
    return arr.astype(bool)


def _float_vector(x: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(arr)))} non-finite values")
    return arr


def predictive_entropy(logits: npt.ArrayLike) -> np.ndarray:
    """Entropy (nats) of ``softmax(logits)`` along the last axis, computed stably.

    Args:
        logits: array of shape ``(..., V)`` with ``V >= 1``; ``-inf`` entries (masked tokens) are allowed
            as long as each row has at least one finite entry.

    Returns:
        Array of shape ``(...)``, float64, in ``[0, log V]``.

    Raises:
        ValueError: if ``logits`` is 0-D, has an empty last axis, or holds NaN or ``+inf``.

    Example:
        >>> float(predictive_entropy(np.zeros(4)))  # uniform over 4 tokens: log 4
        1.3862943611198906
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got shape {x.shape}")
    if np.any(np.isnan(x)) or np.any(x == np.inf):
        raise ValueError("logits must not contain NaN or +inf")
    m = np.max(x, axis=-1, keepdims=True)
    if np.any(~np.isfinite(m)):
        raise ValueError("logits must have at least one finite entry per row")
    z = x - m
    e = np.exp(z)
    s = np.sum(e, axis=-1, keepdims=True)
    logp = z - np.log(s)
    p = e / s
    plogp = np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0)
    return np.asarray(-np.sum(plogp, axis=-1))


def expected_calibration_error(confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width bins (Guo et al. 2017).

    ``ECE = sum_b (n_b / n) * |accuracy_b - mean_confidence_b|`` over bins ``(k/n_bins, (k+1)/n_bins]``.

    Args:
        confidence: shape ``(n,)``, the predicted probability of the predicted class, in ``[0, 1]``.
        correct: shape ``(n,)``, bool (0/1 numbers accepted): whether the prediction was right.
        n_bins: number of equal-width bins, a positive int.

    Returns:
        The ECE, a float in ``[0, 1]``.

    Raises:
        ValueError: on wrong ndim, mismatched or zero lengths, confidences outside ``[0, 1]`` or non-finite,
            ``correct`` values other than 0/1, or ``n_bins < 1``.
        TypeError: on non-numeric arrays or a non-int ``n_bins``.

    Example:
        >>> expected_calibration_error([0.9, 0.9], [True, False])  # said 0.9, was right half the time
        0.4
    """
    check_int("n_bins", n_bins, 1, type_error=TypeError, expected="a positive int", quote=False)
    conf = _float_vector(confidence, "confidence")
    corr = _bool_vector(correct, "correct")
    if conf.shape[0] != corr.shape[0]:
        raise ValueError(
            f"confidence and correct must have the same length, got {conf.shape[0]} and {corr.shape[0]}"
        )
    if conf.shape[0] == 0:
        raise ValueError("confidence must not be empty (ECE of zero predictions is undefined)")
    if np.any((conf < 0) | (conf > 1)):
        raise ValueError(f"confidence must lie in [0, 1], got values in [{conf.min():.6g}, {conf.max():.6g}]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)  # bin k is (edges[k], edges[k + 1]]; 0 goes in bin 0
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=corr.astype(np.float64), minlength=n_bins)
    # sum_b (n_b/n) |acc_b - conf_b| = (1/n) sum_b |sum_acc_b - sum_conf_b|
    return float(np.sum(np.abs(sum_acc - sum_conf)) / conf.shape[0])


def logit_metrics(stats: Mapping[str, npt.ArrayLike], n_bins: int = 15) -> dict[str, float]:
    """Summaries of next-token predictions from per-token statistics.

    Args:
        stats: mapping with (at least) the 1-D arrays of equal length ``n`` produced by
            :func:`topomon.capture.logit_stats.reduce_logits`: ``entropy`` (nats), ``top1_prob``
            (probability of the arg-max token), ``correct`` (bool: the arg-max token was the actual next
            token) and ``nll`` (negative log-likelihood of the actual next token, nats). Other keys are
            ignored.
        n_bins: number of bins for the ECE.

    Returns:
        ``{"logit_entropy", "logit_top1_prob", "logit_accuracy", "logit_ece", "logit_nll"}``: the means over
        tokens of entropy, top-1 probability, top-1 accuracy and NLL, and the ECE of ``(top1_prob, correct)``.
        With ``n = 0`` tokens (e.g. a batch of one-token sequences) every value is NaN: undefined, not 0.

    Raises:
        TypeError: if ``stats`` is not a mapping, or an array has a non-numeric dtype.
        ValueError: if a key is missing, an array is not 1-D, lengths differ, or values are out of range
            (non-finite, ``top1_prob`` outside ``[0, 1]``).

    Example:
        >>> m = logit_metrics({"entropy": [0.5], "top1_prob": [0.8], "correct": [True], "nll": [0.2]})
        >>> round(m["logit_ece"], 6)
        0.2
    """
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must be a mapping of arrays, got {type(stats).__name__}")
    missing = [k for k in LOGIT_STAT_KEYS if k not in stats]
    if missing:
        raise ValueError(f"stats is missing keys {missing}; required keys are {list(LOGIT_STAT_KEYS)}")
    entropy = _float_vector(stats["entropy"], "stats['entropy']")
    top1 = _float_vector(stats["top1_prob"], "stats['top1_prob']")
    nll = _float_vector(stats["nll"], "stats['nll']")
    correct = _bool_vector(stats["correct"], "stats['correct']")
    lengths = {k: a.shape[0] for k, a in zip(LOGIT_STAT_KEYS, (entropy, top1, correct, nll), strict=True)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"stats arrays must have the same length, got {lengths}")
    if np.any((top1 < 0) | (top1 > 1)):
        raise ValueError(
            f"stats['top1_prob'] must lie in [0, 1], got values in [{top1.min():.6g}, {top1.max():.6g}]"
        )
    if entropy.shape[0] == 0:
        return {
            k: math.nan
            for k in ("logit_entropy", "logit_top1_prob", "logit_accuracy", "logit_ece", "logit_nll")
        }
    return {
        "logit_entropy": float(np.mean(entropy)),
        "logit_top1_prob": float(np.mean(top1)),
        "logit_accuracy": float(np.mean(correct)),
        "logit_ece": expected_calibration_error(top1, correct, n_bins=n_bins),
        "logit_nll": float(np.mean(nll)),
    }
