"""The rules over the jumps of one metric stream.

A robust z-score of the step-to-step change (:class:`SpikeRule`), and Lightning's running-mean test
(:class:`MeanSpikeRule`). Like :mod:`topomon.alerts.series`, small stateful rules around the pure decisions of
:mod:`topomon.alerts.decisions`, with a cooldown and hysteresis.

Example:
    >>> rule = MeanSpikeRule("loss", layer="trainer", rtol=0.5)
    >>> rule.name
    'mean_spike:loss@trainer'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from topomon._validate import check_choice, check_int, check_number
from topomon.alerts.base import _float_list, _Obs, _opt_float, _SeriesRule
from topomon.alerts.decisions import (
    SIDED_DIRECTIONS,
    _directional,
    evaluate_mean_spike,
    evaluate_spike,
    robust_zscore,
)

__all__ = ["SpikeRule", "MeanSpikeRule"]


class SpikeRule(_SeriesRule):
    """A step-to-step change that is an outlier among the recent changes (robust z-score).

    Keeps the last ``window`` finite step-to-step changes per key; the latest change is scored
    against them with :func:`robust_zscore` (median / MAD) before it joins the window. Fires when
    the score in ``direction`` exceeds ``z``; re-arms once a later change scores within
    ``z * rearm_fraction``.

    Args:
        metric: metric name (``"topo_activity"``).
        layer: a layer name, ``"*"`` or ``"mean"``.
        z: z-score threshold (> 0).
        window: number of previous changes kept (>= ``min_history``).
        min_history: changes needed before deciding (>= 2).
        direction: ``"rise"``, ``"drop"`` or ``"both"``.
        rel_floor: the z-score's scale is at least ``rel_floor * |previous value|``, so numerical
            jitter on a constant metric is not a spike (>= 0).
        cooldown: captures after a firing during which it cannot fire again.
        rearm_fraction: in [0, 1]; hysteresis.
        severity: ``"warning"`` or ``"critical"``.
        name: rule name (default ``"spike:<metric>@<layer>"``).

    Raises:
        ValueError: on any invalid argument.

    Example:
        >>> rule = SpikeRule("topo_activity", layer="final_norm", z=6.0)
    """

    kind = "spike"

    def __init__(
        self,
        metric: str,
        layer: str = "*",
        z: float = 5.0,
        window: int = 20,
        min_history: int = 5,
        direction: str = "both",
        rel_floor: float = 1e-6,
        cooldown: int = 0,
        rearm_fraction: float = 0.5,
        severity: str = "warning",
        name: str | None = None,
    ) -> None:
        self.z = check_number("z", z, 0, low_open=True)
        self.min_history = check_int("min_history", min_history, 2)
        self.window = check_int("window", window, self.min_history)
        self.direction = check_choice("direction", direction, SIDED_DIRECTIONS)
        self.rel_floor = check_number("rel_floor", rel_floor, 0)
        super().__init__(
            metric,
            layer=layer,
            name=name,
            cooldown=cooldown,
            severity=severity,
            rearm_fraction=rearm_fraction,
        )

    def _new_state(self) -> dict[str, Any]:
        return {"last": None, "changes": []}

    def _load_key_state(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "last": _opt_float(saved.get("last")),
            "changes": _float_list(saved.get("changes"), self.window),
        }

    def _observe(self, st: dict[str, Any], value: float, stage: str, label: str) -> _Obs | None:
        if not math.isfinite(value):
            return None
        prev = st["last"]
        st["last"] = value
        if prev is None:
            return None
        change = value - prev
        history = list(st["changes"])
        st["changes"] = (history + [change])[-self.window :]
        decision = evaluate_spike(
            change,
            history,
            self.z,
            self.direction,
            min_history=self.min_history,
            floor=self.rel_floor * abs(prev),
            label=label,
        )
        if decision.reason in ("insufficient_history", "undefined"):
            return None
        score = _directional(robust_zscore(change, history, floor=self.rel_floor * abs(prev)), self.direction)
        return _Obs(decision, score <= self.z * self.rearm_fraction, value, prev)


class MeanSpikeRule(_SeriesRule):
    """Lightning's ``SpikeDetection`` rule on any stream: a rise far from the running mean.

    Keeps the stage's last ``window`` finite values per key; from the ``warmup + 1``-th value on,
    fires when a value rose from the previous one and lies at least ``rtol * |mean|`` from their
    mean (:func:`~topomon.alerts.decisions.evaluate_mean_spike`), or is not finite. Re-arms once a
    later value lies within ``rtol * rearm_fraction * |mean|``. A new stage starts a new history.

    Args:
        metric: metric name, or the trainer's log key with ``layer="trainer"`` (``"loss"``).
        layer: a layer name, ``"*"``, ``"mean"``, ``"model"`` or ``"trainer"``.
        rtol: relative tolerance (> 0; Lightning's default 2.0).
        window: values the running mean is taken over (>= 1; Lightning's 10).
        warmup: values seen before deciding (>= 1; Lightning's 1).
        cooldown: updates after a firing during which it cannot fire again.
        rearm_fraction: in [0, 1]; hysteresis.
        severity: ``"warning"`` or ``"critical"``.
        name: rule name (default ``"mean_spike:<metric>@<layer>"``).

    Raises:
        ValueError: on any invalid argument.

    Example:
        >>> rule = MeanSpikeRule("loss", layer="trainer", rtol=0.5)
    """

    kind = "mean_spike"

    def __init__(
        self,
        metric: str,
        layer: str = "*",
        rtol: float = 2.0,
        window: int = 10,
        warmup: int = 1,
        cooldown: int = 0,
        rearm_fraction: float = 0.5,
        severity: str = "warning",
        name: str | None = None,
    ) -> None:
        self.rtol = check_number("rtol", rtol, 0, low_open=True)
        self.window = check_int("window", window, 1)
        self.warmup = check_int("warmup", warmup, 1)
        super().__init__(
            metric,
            layer=layer,
            name=name,
            cooldown=cooldown,
            severity=severity,
            rearm_fraction=rearm_fraction,
        )

    def _new_state(self) -> dict[str, Any]:
        return {"stage": None, "seen": 0, "last": None, "values": []}

    def _load_key_state(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        stage, seen = saved.get("stage"), saved.get("seen")
        return {
            "stage": stage if isinstance(stage, str) else None,
            "seen": int(seen) if isinstance(seen, (int, float)) else 0,
            "last": _opt_float(saved.get("last")),
            "values": _float_list(saved.get("values"), self.window),
        }

    def _observe(self, st: dict[str, Any], value: float, stage: str, label: str) -> _Obs | None:
        if st["stage"] != stage:
            st["stage"], st["seen"], st["last"], st["values"] = stage, 0, None, []
        history, last = list(st["values"]), st["last"]
        mean = float(np.mean(history)) if history else math.nan
        st["seen"] += 1
        if not math.isfinite(value):  # a spike at any step, as in Lightning
            return _Obs(
                evaluate_mean_spike(value, math.nan, history, self.rtol, label=label), False, value, mean
            )
        st["values"], st["last"] = (history + [value])[-self.window :], value
        if st["seen"] <= self.warmup or last is None:
            return None
        decision = evaluate_mean_spike(value, last, history, self.rtol, label=label)
        calm = abs(value - mean) < self.rtol * self.rearm_fraction * abs(mean)
        return _Obs(decision, calm, value, mean)
