"""Pure alert decisions: numbers in, :class:`Decision` ``(fired, reason, message)`` out.

The decision functions (:func:`evaluate_drop`, :func:`evaluate_spike`, :func:`evaluate_trend`,
:func:`evaluate_threshold`, :func:`evaluate_nonfinite`) take numbers and return a
:class:`Decision`; they are testable without a trainer (the style of Lightning's
``EarlyStopping._evaluate_stopping_criteria``). The stateful rules in :mod:`topomon.alerts.rules`
feed them and add baselines, cooldown and hysteresis (:func:`hysteresis_step`).

Example:
    >>> evaluate_drop(30.0, 40.0, threshold=0.15).reason
    'drop'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from topomon._validate import check_choice, check_int, check_number

__all__ = [
    "Decision",
    "TrendStats",
    "BASELINES",
    "DIRECTIONS",
    "SIDED_DIRECTIONS",
    "SEVERITIES",
    "relative_change",
    "evaluate_drop",
    "robust_zscore",
    "evaluate_spike",
    "evaluate_mean_spike",
    "trend_statistics",
    "evaluate_trend",
    "evaluate_threshold",
    "evaluate_nonfinite",
    "evaluate_k_of_n",
    "parts_within",
    "hysteresis_step",
]

BASELINES = ("stage_start", "base", "previous_stage_end")
DIRECTIONS = ("drop", "rise")
SIDED_DIRECTIONS = ("drop", "rise", "both")
"""Directions of a rule that may watch both sides (``"both"``: a drop or a rise beyond the threshold)."""
SEVERITIES = ("info", "warning", "critical")
_AGGREGATES = ("*", "mean")
_MAD_TO_SIGMA = 1.482602218505602  # 1 / Phi^-1(3/4): MAD of a Gaussian -> its standard deviation
_MEANAD_TO_SIGMA = math.sqrt(math.pi / 2)  # mean absolute deviation of a Gaussian -> sigma


class Decision(NamedTuple):
    """The outcome of a pure decision function.

    Attributes:
        fired: whether the condition holds (before cooldown and hysteresis, which rules add).
        reason: a short machine-readable reason: ``"drop"``, ``"rise"``, ``"spike"``, ``"trend"``,
            ``"above"``, ``"below"``, ``"nonfinite"`` when fired; ``"ok"``, ``"undefined"`` or
            ``"insufficient_history"`` when not.
        message: one human sentence.
    """

    fired: bool
    reason: str
    message: str


class TrendStats(NamedTuple):
    """Least-squares trend of a short series (see :func:`trend_statistics`).

    Attributes:
        slope: least-squares slope per capture.
        relative_change: (fitted end - fitted start) / |fitted start|; NaN if the start is 0.
        rises: number of successive differences > 0.
        drops: number of successive differences < 0.
    """

    slope: float
    relative_change: float
    rises: int
    drops: int


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _as_float(x: Any) -> float:
    """A metric value as a float; anything that is not a number (None, strings) becomes NaN."""
    return float(x) if _is_number(x) else math.nan


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _directional(z: float, direction: str) -> float:
    """A signed change (or score) seen from ``direction``: positive when it moved that way."""
    if direction == "both":
        return abs(z)
    return z if direction == "rise" else -z


# ----------------------------------------------------------------------------- pure decisions


def relative_change(value: float, reference: float) -> float:
    """Signed relative change ``(value - reference) / |reference|``.

    Args:
        value: the current value.
        reference: the baseline.

    Returns:
        The relative change (``-0.2`` is a 20% drop); NaN when either input is non-finite or the
        reference is 0 (a relative change from 0 is undefined).

    Example:
        >>> relative_change(8.0, 10.0)
        -0.2
    """
    v, r = _as_float(value), _as_float(reference)
    if not (math.isfinite(v) and math.isfinite(r)) or r == 0.0:
        return math.nan
    return (v - r) / abs(r)


def evaluate_drop(
    value: float,
    baseline: float,
    threshold: float,
    direction: str = "drop",
    *,
    label: str = "value",
    baseline_name: str = "baseline",
) -> Decision:
    """Relative change from a baseline beyond a threshold.

    Fires when ``-relative_change(value, baseline) > threshold`` (direction ``"drop"``),
    ``relative_change(value, baseline) > threshold`` (``"rise"``) or
    ``|relative_change(value, baseline)| > threshold`` (``"both"``: harm either way, such as an
    entropy that collapses or explodes).

    Args:
        value: current value.
        baseline: reference value (e.g. the value at the start of the stage).
        threshold: fraction > 0 (0.15 = 15%).
        direction: one of :data:`SIDED_DIRECTIONS`: ``"drop"``, ``"rise"`` or ``"both"``.
        label: what the value is, for the message (``"final_norm rankme"``).
        baseline_name: what the baseline is, for the message (``"stage start"``).

    Returns:
        The decision; ``reason`` is the side that fired (``"drop"`` or ``"rise"``, also for
        ``"both"``), ``"ok"`` when not, ``"undefined"`` when the relative change is undefined
        (non-finite value or baseline, or baseline 0).

    Raises:
        ValueError: on a bad ``threshold`` or ``direction``.

    Example:
        >>> evaluate_drop(30.0, 40.0, 0.15).fired
        True
    """
    threshold = check_number("threshold", threshold, 0, low_open=True)
    direction = check_choice("direction", direction, SIDED_DIRECTIONS)
    change = relative_change(value, baseline)
    if not math.isfinite(change):
        return Decision(
            False,
            "undefined",
            f"{label}: relative change from the {baseline_name} is undefined "
            f"(value {_fmt(_as_float(value))}, {baseline_name} {_fmt(_as_float(baseline))})",
        )
    fired = _directional(change, direction) > threshold
    side = "drop" if change < 0 else "rise"
    verb = "dropped" if change < 0 else "rose"
    rule = f"{direction} > {threshold:.1%}" if direction != "both" else f"drop or rise > {threshold:.1%}"
    message = (
        f"{label} {verb} {abs(change):.1%} from the {baseline_name} "
        f"({_fmt(float(baseline))} -> {_fmt(float(value))}); threshold: {rule}"
    )
    return Decision(fired, side if fired else "ok", message)


def robust_zscore(x: float, history: Sequence[float] | np.ndarray, *, floor: float = 0.0) -> float:
    """Robust z-score of ``x`` against a history: ``(x - median) / (1.4826 * MAD)``.

    The modified z-score of Iglewicz and Hoaglin (1993), with the MAD scaled to a Gaussian sigma
    (``1 / Phi^-1(3/4)``, scipy's ``median_abs_deviation(scale="normal")``). When the MAD is 0
    (more than half the history identical) the scale falls back to ``sqrt(pi / 2) * mean absolute
    deviation``; the scale is
    then raised to at least ``floor``. If it is still 0 the score is 0 when ``x`` equals the
    median and +-inf otherwise.

    Args:
        x: the new observation.
        history: previous observations, shape ``(k,)``; non-finite entries are ignored.
        floor: smallest scale allowed (>= 0), to ignore numerical jitter.

    Returns:
        The z-score; NaN when ``x`` is non-finite or the history has no finite entry.

    Raises:
        ValueError: if ``history`` is not 1-D or ``floor`` is negative.

    Example:
        >>> round(robust_zscore(10.0, [0.0, 1.0, -1.0, 1.0, -1.0]), 3)
        6.745
    """
    h = np.asarray(history, dtype=np.float64)
    if h.ndim != 1:
        raise ValueError(f"`history` must be 1-D, got shape {h.shape}")
    floor = check_number("floor", floor, 0, finite=False)
    h = h[np.isfinite(h)]
    xf = _as_float(x)
    if h.size == 0 or not math.isfinite(xf):
        return math.nan
    med = float(np.median(h))
    dev = np.abs(h - med)
    scale = _MAD_TO_SIGMA * float(np.median(dev))
    if scale <= 0.0:
        scale = _MEANAD_TO_SIGMA * float(np.mean(dev))
    scale = max(scale, float(floor))
    if scale <= 0.0:
        return 0.0 if xf == med else math.copysign(math.inf, xf - med)
    return (xf - med) / scale


def evaluate_spike(
    change: float,
    history: Sequence[float] | np.ndarray,
    z: float = 5.0,
    direction: str = "both",
    *,
    min_history: int = 5,
    floor: float = 0.0,
    label: str = "value",
) -> Decision:
    """A step-to-step change that is an outlier among the previous changes.

    Fires when the robust z-score (:func:`robust_zscore`) of ``change`` against ``history``, taken
    in ``direction`` (absolute value for ``"both"``), exceeds ``z``.

    Args:
        change: latest step-to-step change of the metric.
        history: previous step-to-step changes, shape ``(k,)``.
        z: z-score threshold (> 0).
        direction: ``"rise"``, ``"drop"`` or ``"both"``.
        min_history: smallest number of finite previous changes needed to decide (>= 2).
        floor: smallest scale of the z-score (see :func:`robust_zscore`).
        label: what the value is, for the message.

    Returns:
        The decision; ``reason`` is ``"spike"`` when fired, else ``"ok"``, ``"undefined"`` or
        ``"insufficient_history"``.

    Raises:
        ValueError: on a bad ``z``, ``direction``, ``min_history`` or ``history``.

    Example:
        >>> evaluate_spike(10.0, [0.1, -0.1, 0.2, -0.2, 0.0], z=5.0).reason
        'spike'
    """
    z = check_number("z", z, 0, low_open=True)
    direction = check_choice("direction", direction, SIDED_DIRECTIONS)
    min_history = check_int("min_history", min_history, 2)
    h = np.asarray(history, dtype=np.float64)
    if h.ndim != 1:
        raise ValueError(f"`history` must be 1-D, got shape {h.shape}")
    n = int(np.isfinite(h).sum())
    if n < min_history:
        return Decision(False, "insufficient_history", f"{label}: {n} previous changes, {min_history} needed")
    score = robust_zscore(change, h, floor=floor)
    if math.isnan(score):
        return Decision(False, "undefined", f"{label}: change {_fmt(_as_float(change))} has no z-score")
    s = _directional(score, direction)
    fired = s > z
    message = (
        f"{label} changed by {_fmt(float(change))} in one capture, robust z = {_fmt(score)} over "
        f"the last {n} changes; threshold: |z| > {_fmt(z)} ({direction})"
    )
    return Decision(fired, "spike" if fired else "ok", message)


def evaluate_mean_spike(
    value: float, last: float, history: Sequence[float], rtol: float, *, label: str = "value"
) -> Decision:
    """Lightning's ``SpikeDetection`` test (mode ``"min"``): a rise far from the running mean.

    Fires when ``value`` is not finite, or when it rose from ``last`` and
    ``|value - mean(history)| >= rtol * |mean(history)|``.

    Args:
        value: current value.
        last: the previous value.
        history: the previous values the running mean is taken over (at least one).
        rtol: relative tolerance (> 0).
        label: what the value is, for the message.

    Returns:
        The decision; ``reason`` is ``"spike"`` when fired, else ``"ok"`` or
        ``"insufficient_history"`` (no previous value).

    Raises:
        ValueError: on a bad ``rtol``.

    Example:
        >>> evaluate_mean_spike(3.0, 1.0, [1.0, 1.2], rtol=1.0).reason
        'spike'
        >>> evaluate_mean_spike(0.5, 1.0, [1.0, 0.2], rtol=0.5).reason  # a fall is never a spike
        'ok'
    """
    rtol = check_number("rtol", rtol, 0, low_open=True)
    v = _as_float(value)
    if not math.isfinite(v):
        return Decision(True, "spike", f"{label} is {v}")
    if not history:
        return Decision(False, "insufficient_history", f"{label}: no previous value")
    mean = float(np.mean(np.asarray(history, dtype=np.float64)))
    fired = v - float(last) > 0 and abs(v - mean) >= abs(rtol * mean)
    message = (
        f"{label} = {_fmt(v)} rose from {_fmt(float(last))}, {_fmt(abs(v - mean))} from the mean of "
        f"the last {len(history)} ({_fmt(mean)}); threshold: >= {_fmt(rtol)} x |mean|"
    )
    return Decision(fired, "spike" if fired else "ok", message)


def trend_statistics(values: Sequence[float] | np.ndarray) -> TrendStats:
    """Least-squares line through a short series, and how often it moved each way.

    Fits ``v_i = a + b i`` for ``i = 0 .. n-1``; the relative change is ``b (n - 1) / |a|``,
    the change of the fitted line over the window relative to its fitted start.

    Args:
        values: the series, shape ``(n,)``.

    Returns:
        :class:`TrendStats`; slope and relative change are NaN when ``n < 2`` or a value is
        non-finite (relative change also when the fitted start is 0).

    Raises:
        ValueError: if ``values`` is not 1-D.

    Example:
        >>> trend_statistics([10.0, 9.0, 8.0]).relative_change
        -0.2
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"`values` must be 1-D, got shape {v.shape}")
    d = np.diff(v)
    rises, drops = int((d > 0).sum()), int((d < 0).sum())
    if v.size < 2 or not np.all(np.isfinite(v)):
        return TrendStats(math.nan, math.nan, rises, drops)
    i = np.arange(v.size, dtype=np.float64)
    ic = i - i.mean()
    slope = float(np.dot(ic, v - v.mean()) / np.dot(ic, ic))
    start = float(v.mean() - slope * i.mean())
    rel = slope * (v.size - 1) / abs(start) if start != 0.0 else math.nan
    return TrendStats(slope, rel, rises, drops)


def evaluate_trend(
    values: Sequence[float] | np.ndarray,
    threshold: float,
    direction: str = "drop",
    *,
    max_reversals: int = 0,
    label: str = "value",
) -> Decision:
    """A sustained, monotone change over a window.

    Fires when the least-squares slope has the sign of ``direction``, the fitted relative change
    over the window (:func:`trend_statistics`) exceeds ``threshold`` in that direction, and at most
    ``max_reversals`` successive steps went the other way. With ``"both"`` the direction is the
    slope's sign, and the message names it.

    Args:
        values: the last ``n`` values of the metric, shape ``(n,)``, ``n >= 2``.
        threshold: fraction > 0.
        direction: ``"drop"``, ``"rise"`` or ``"both"``.
        max_reversals: steps against the direction tolerated (>= 0).
        label: what the value is, for the message.

    Returns:
        The decision; ``reason`` is ``"trend"`` when fired, else ``"ok"`` or ``"undefined"``.

    Raises:
        ValueError: on a bad ``threshold``, ``direction``, ``max_reversals`` or ``values``.

    Example:
        >>> evaluate_trend([10.0, 9.5, 9.0, 8.4, 8.0], threshold=0.1).fired
        True
    """
    threshold = check_number("threshold", threshold, 0, low_open=True)
    direction = check_choice("direction", direction, SIDED_DIRECTIONS)
    max_reversals = check_int("max_reversals", max_reversals, 0)
    st = trend_statistics(values)
    n = len(values)
    if not math.isfinite(st.relative_change):
        return Decision(False, "undefined", f"{label}: no trend defined over {n} values")
    side = direction if direction != "both" else ("drop" if st.slope < 0 else "rise")
    sign = -1.0 if side == "drop" else 1.0
    reversals = st.rises if side == "drop" else st.drops
    moved = sign * st.relative_change
    fired = sign * st.slope > 0 and moved > threshold and reversals <= max_reversals
    message = (
        f"{label} moved {st.relative_change:+.1%} (least-squares fit) over the last {n} values, "
        f"{reversals} step(s) against the trend; threshold: {side} > {threshold:.1%}"
    )
    return Decision(fired, "trend" if fired else "ok", message)


def evaluate_threshold(
    value: float, above: float | None = None, below: float | None = None, *, label: str = "value"
) -> Decision:
    """An absolute bound: fires when ``value > above`` or ``value < below``.

    Args:
        value: current value.
        above: upper bound, or None.
        below: lower bound, or None (at least one of the two).
        label: what the value is, for the message.

    Returns:
        The decision; ``reason`` is ``"above"`` or ``"below"`` when fired, else ``"ok"`` or
        ``"undefined"`` (non-finite value).

    Raises:
        ValueError: if neither bound is given, a bound is not finite, or ``below > above``.

    Example:
        >>> evaluate_threshold(0.95, above=0.9).reason
        'above'
    """
    hi, lo = _check_bounds(above, below)
    v = _as_float(value)
    if not math.isfinite(v):
        return Decision(False, "undefined", f"{label} is {v}")
    if hi is not None and v > hi:
        return Decision(True, "above", f"{label} = {_fmt(v)} is above {_fmt(hi)}")
    if lo is not None and v < lo:
        return Decision(True, "below", f"{label} = {_fmt(v)} is below {_fmt(lo)}")
    return Decision(False, "ok", f"{label} = {_fmt(v)} is within bounds")


def _check_bounds(above: Any, below: Any) -> tuple[float | None, float | None]:
    if above is None and below is None:
        raise ValueError("at least one of `above` and `below` must be given, got neither")
    hi = lo = None
    if above is not None:
        hi = check_number("above", above)
    if below is not None:
        lo = check_number("below", below)
    if hi is not None and lo is not None and lo > hi:
        raise ValueError(f"`below` must be <= `above`, got below={lo!r} above={hi!r}")
    return hi, lo


def evaluate_nonfinite(
    metrics: Mapping[str, Any], watch: Iterable[str] = (), count_metric: str | None = "n_nonfinite"
) -> Decision:
    """Non-finite metric values, or non-finite activations counted by the capture.

    Fires when a watched metric present in ``metrics`` is NaN/inf (or not a number), or when
    ``metrics[count_metric] > 0``. Watched metrics absent from ``metrics`` are not checked.

    Args:
        metrics: metric name -> value of one record.
        watch: metric names that must stay finite.
        count_metric: name of the metric counting non-finite activations, or None.

    Returns:
        The decision; ``reason`` is ``"nonfinite"`` when fired, else ``"ok"``.

    Raises:
        TypeError: if ``metrics`` is not a mapping.

    Example:
        >>> evaluate_nonfinite({"rankme": float("nan")}, watch=["rankme"]).fired
        True
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"`metrics` must be a mapping of name -> value, got {type(metrics).__name__}")
    bad = [m for m in watch if m in metrics and not math.isfinite(_as_float(metrics[m]))]
    parts = []
    if bad:
        parts.append(f"non-finite {', '.join(bad)}")
    if count_metric is not None and count_metric in metrics:
        count = _as_float(metrics[count_metric])
        if count > 0:
            parts.append(f"{count_metric} = {_fmt(count)}")
    if parts:
        return Decision(True, "nonfinite", "; ".join(parts))
    return Decision(False, "ok", "all watched values finite")


def parts_within(fired_at: Mapping[str, int | None], step: int, within: int | None) -> list[str]:
    """The parts whose condition last held within ``within`` steps of ``step`` (None: at any step).

    Example:
        >>> parts_within({"geometry": 8, "loss": 30, "nll": None}, step=10, within=4)
        ['geometry']
    """
    return [
        name
        for name, s in fired_at.items()
        if s is not None and (within is None or abs(int(step) - int(s)) <= within)
    ]


def evaluate_k_of_n(
    fired_at: Mapping[str, int | None],
    step: int,
    k: int,
    within: int | None = None,
    *,
    messages: Mapping[str, str] | None = None,
) -> Decision:
    """At least ``k`` of ``n`` conditions held within ``within`` steps of ``step``.

    The decision of a composite rule: any-of is ``k = 1``, all-of is ``k = n``. A part counts when
    its condition last held at a step ``s`` with ``|step - s| <= within`` (any step of the stage
    when ``within`` is None): a geometric drop seen at step 8 is confirmed by a loss rise logged at
    step 10 when ``within >= 2``, whichever arrives first.

    Args:
        fired_at: part name -> the last step its condition held (None: not in this stage).
        step: the step being judged.
        k: parts needed, ``1 <= k <= n``.
        within: the window in steps (>= 0), or None for the whole stage.
        messages: part name -> what it saw when it fired, joined into the message.

    Returns:
        The decision; ``reason`` is ``"composite"`` when fired, else ``"ok"``. The message names
        every part that counts (with its step and message), then the count.

    Raises:
        ValueError: on a bad ``k`` or ``within``.

    Example:
        >>> evaluate_k_of_n({"geometry": 8, "loss": 10}, step=10, k=2, within=4).fired
        True
    """
    n = len(fired_at)
    k = check_int("k", k, 1)
    if k > n:
        raise ValueError(f"`k` must be <= the number of parts ({n}), got {k}")
    if within is not None:
        within = check_int("within", within, 0)
    active = parts_within(fired_at, step, within)
    msgs = messages or {}
    parts = "; ".join(f"[{a}] step {fired_at[a]}: {msgs.get(a, 'fired')}" for a in active)
    span = "in this stage" if within is None else f"within {within} steps of step {step}"
    head = f"{len(active)} of {n} parts fired {span} ({k} needed)"
    fired = len(active) >= k
    return Decision(fired, "composite" if fired else "ok", f"{head}: {parts}" if parts else head)


def hysteresis_step(*, armed: bool, firing: bool, recovered: bool, cooling: bool) -> str:
    """One transition of the fire / re-arm state machine shared by all rules.

    An armed rule fires when its condition holds and it is not cooling down; a fired (disarmed)
    rule re-arms when the metric has recovered past the re-arm level.

    Args:
        armed: whether the rule may fire.
        firing: whether the firing condition holds now.
        recovered: whether the metric is back past the re-arm level now.
        cooling: whether the cooldown since the last firing is still running.

    Returns:
        ``"fire"``, ``"recover"`` or ``"hold"``.

    Example:
        >>> hysteresis_step(armed=True, firing=True, recovered=False, cooling=False)
        'fire'
    """
    if armed:
        return "fire" if firing and not cooling else "hold"
    return "recover" if recovered else "hold"
