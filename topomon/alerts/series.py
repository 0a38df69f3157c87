"""The rules over one metric stream: drop (or rise), trend, threshold, non-finite values.

Small stateful rules around the pure decisions of :mod:`topomon.alerts.decisions`: the baselines
and histories they read from the stream itself, a cooldown (in captures) and hysteresis (a fired
rule re-arms only once the metric has recovered well inside its threshold, and then emits an
:class:`~topomon.types.Alert` with ``reason="recovered"`` and ``severity="info"``). Composites of
them are in :mod:`topomon.alerts.composite`, the spike rules in :mod:`topomon.alerts.spikes`;
:mod:`topomon.alerts.rules` gathers them all.

Example:
    >>> rule = DropRule("rankme", layer="final_norm", threshold=0.15)
    >>> rule.name
    'drop:rankme@final_norm'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from topomon._validate import check_choice, check_int, check_number, check_str
from topomon.alerts.base import TRAINER_LAYER, Rule, _Cond, _float_list, _Obs, _opt_float, _SeriesRule
from topomon.alerts.decisions import (
    BASELINES,
    SIDED_DIRECTIONS,
    Decision,
    _as_float,
    _check_bounds,
    _directional,
    evaluate_drop,
    evaluate_nonfinite,
    evaluate_threshold,
    evaluate_trend,
    relative_change,
    trend_statistics,
)
from topomon.types import MetricRecord

__all__ = ["DropRule", "TrendRule", "ThresholdRule", "NonFiniteRule"]


class DropRule(_SeriesRule):
    """Relative change of a metric from a baseline read off the stream itself (a drop, a rise or both).

    With ``window = w`` the rule compares means of ``w`` finite values (for noisy streams such as the
    trainer's loss): the mean of the last ``w`` values against the mean of the stage's first ``w``
    (``"stage_start"``); ``"base"`` is the mean of the first ``w`` values of stage ``base_stage``,
    falling back to those of the first stage seen; ``"previous_stage_end"`` the mean of the last
    ``w`` values of the previous stage, falling back to the stage start during the first stage.
    It decides from the ``w``-th value of a stage on (``w = 1``: every value against the first).
    ``reference_window = r`` takes the baseline's mean over ``r`` values instead of ``w`` (``window=4,
    reference_window=1``: the mean of the last 4 against the stage's first value); a reference longer
    than the window is complete before the rule decides, and its own values are not judged. With
    ``reference_floor`` set, the rule decides only while the reference is above it (a relative drop
    from a reference at or below 0, such as a GRPO policy loss, means nothing).
    Fires when the change exceeds ``threshold`` in ``direction`` (``"both"``: either way; the
    alert's ``reason`` says which side, ``"drop"`` or ``"rise"``); re-arms (and reports
    ``"recovered"``) once it is back within ``threshold * rearm_fraction``. A new stage moves a
    ``"stage_start"`` baseline, so a rule fired in one stage typically recovers at the next stage's
    first decision.

    Args:
        metric: metric name (``"rankme"``), or the trainer's log key with ``layer="trainer"``
            (``"loss"``).
        layer: a layer name, ``"*"`` (each layer separately), ``"mean"`` (mean over the layers of
            one capture), ``"model"`` (model-level metrics: ``logit_nll`` ...) or ``"trainer"``
            (the trainer's logged values).
        threshold: fraction > 0 (0.15 = 15%).
        baseline: one of :data:`BASELINES`.
        direction: ``"drop"``, ``"rise"`` or ``"both"``.
        cooldown: captures after a firing during which it cannot fire again.
        rearm_fraction: in [0, 1]; hysteresis.
        severity: ``"warning"`` or ``"critical"``.
        base_stage: name of the stage that holds the base model.
        window: values averaged on each side of the comparison (>= 1).
        reference_window: values averaged for the baseline (>= 1; default ``window``).
        reference_floor: the rule is silent while the reference is at or below this value.
        reference_stat: ``"mean"`` or ``"median"`` of the reference's values (the median of the
            first 4 gradient norms is robust to one large first step).
        name: rule name (default ``"drop:<metric>@<layer>"``).

    Raises:
        ValueError: on any invalid argument, naming it, its value and what is allowed.

    Example:
        >>> rule = DropRule("rankme", layer="final_norm", threshold=0.15)
        >>> loss = DropRule("loss", layer="trainer", direction="rise", threshold=0.5, window=4)
    """

    kind = "drop"

    def __init__(
        self,
        metric: str,
        layer: str = "*",
        threshold: float = 0.15,
        baseline: str = "stage_start",
        direction: str = "drop",
        cooldown: int = 0,
        rearm_fraction: float = 0.5,
        severity: str = "warning",
        base_stage: str = "base",
        window: int = 1,
        reference_window: int | None = None,
        reference_floor: float | None = None,
        reference_stat: str = "mean",
        name: str | None = None,
    ) -> None:
        self.threshold = check_number("threshold", threshold, 0, low_open=True)
        self.reference_stat = check_choice("reference_stat", reference_stat, ("mean", "median"))
        self.baseline = check_choice("baseline", baseline, BASELINES)
        self.direction = check_choice("direction", direction, SIDED_DIRECTIONS)
        self.base_stage = check_str("base_stage", base_stage)
        self.window = check_int("window", window, 1)
        self.reference_window = (
            self.window if reference_window is None else check_int("reference_window", reference_window, 1)
        )
        self.reference_floor = (
            None if reference_floor is None else check_number("reference_floor", reference_floor)
        )
        if self.direction == "drop" and self.threshold >= 1.0:
            warnings.warn(
                f"DropRule({metric!r}): `threshold`={threshold!r} >= 1 never fires for a positive metric "
                "that drops; did you mean a fraction such as 0.15?",
                stacklevel=2,
            )
        super().__init__(
            metric,
            layer=layer,
            name=name,
            cooldown=cooldown,
            severity=severity,
            rearm_fraction=rearm_fraction,
        )

    def _new_state(self) -> dict[str, Any]:
        return {
            "stage": None,
            "stage_start": None,  # the mean of ``head``
            "last": None,  # the mean of ``tail``
            "prev_end": None,
            "base": None,
            "first": None,
            "first_stage": None,
            "head": [],  # the stage's first ``reference_window`` finite values
            "tail": [],  # its last ``window`` finite values
        }

    def _load_key_state(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        stage, first_stage = saved.get("stage"), saved.get("first_stage")
        floats = {k: _opt_float(saved.get(k)) for k in ("stage_start", "last", "prev_end", "base", "first")}
        # states saved before ``window`` existed hold the stage start and the last value only
        head = _float_list(saved.get("head"), self.reference_window)
        tail = _float_list(saved.get("tail"), self.window)
        return {
            "stage": stage if isinstance(stage, str) else None,
            **floats,
            "first_stage": first_stage if isinstance(first_stage, str) else None,
            "head": head if "head" in saved else [v for v in [floats["stage_start"]] if v is not None],
            "tail": tail if "tail" in saved else [v for v in [floats["last"]] if v is not None],
        }

    def _observe(self, st: dict[str, Any], value: float, stage: str, label: str) -> _Obs | None:
        w = self.window
        if st["stage"] != stage:
            if st["stage"] is not None and st["last"] is not None:
                st["prev_end"] = st["last"]
            st["stage"], st["stage_start"], st["last"], st["head"], st["tail"] = stage, None, None, [], []
        in_head = False
        if math.isfinite(value):
            if len(st["head"]) < self.reference_window:
                in_head = True
                st["head"] = [*st["head"], value]
                st["stage_start"] = float(
                    np.median(st["head"])
                    if self.reference_stat == "median"
                    else sum(st["head"]) / len(st["head"])
                )
            st["tail"] = [*st["tail"], value][-w:]
            st["last"] = float(sum(st["tail"]) / len(st["tail"]))
            if st["first"] is None:  # (a state saved before windows has ``first`` and no ``first_stage``)
                st["first_stage"] = stage
            if st["first_stage"] == stage:  # the head of the first stage seen, while it fills
                st["first"] = st["stage_start"]
            if stage == self.base_stage:
                st["base"] = st["stage_start"]
        if len(st["tail"]) < w or (in_head and self.reference_window > w):
            return None  # (a value of a longer reference is not judged against itself)
        if w > 1:
            value, label = st["last"], f"{label} (mean of the last {w})"
        if self.baseline == "stage_start":
            r = self.reference_window
            ref, ref_name = st["stage_start"], "stage start" if r == 1 else f"stage's first {r}"
        elif self.baseline == "base":
            ref, ref_name = (
                (st["base"], "base model") if st["base"] is not None else (st["first"], "first capture")
            )
        else:
            ref, ref_name = (
                (st["prev_end"], "previous stage's end")
                if st["prev_end"] is not None
                else (st["stage_start"], "stage start")
            )
        ref = math.nan if ref is None else ref
        if self.reference_floor is not None and not ref > self.reference_floor:
            return None
        change = relative_change(value, ref)
        if not math.isfinite(change):
            return None
        decision = evaluate_drop(
            value, ref, self.threshold, self.direction, label=label, baseline_name=ref_name
        )
        moved = _directional(change, self.direction)
        return _Obs(decision, moved <= self.threshold * self.rearm_fraction, value, ref)


class TrendRule(_SeriesRule):
    """A sustained monotone change over the last ``n`` captures of the current stage.

    The window restarts at each stage, so a trend never spans two training regimes. Fires when
    :func:`evaluate_trend` does on the last ``n`` finite values; re-arms once the fitted relative
    change over the window is back within ``threshold * rearm_fraction``.

    Args:
        metric: metric name.
        layer: a layer name, ``"*"`` or ``"mean"``.
        n: window length in captures (>= 3).
        threshold: fraction > 0 (total relative change over the window).
        direction: ``"drop"``, ``"rise"`` or ``"both"`` (the slope's sign picks the side).
        max_reversals: steps against the direction tolerated in the window (>= 0).
        cooldown: captures after a firing during which it cannot fire again.
        rearm_fraction: in [0, 1]; hysteresis.
        severity: ``"warning"`` or ``"critical"``.
        name: rule name (default ``"trend:<metric>@<layer>"``).

    Raises:
        ValueError: on any invalid argument.

    Example:
        >>> rule = TrendRule("rankme_pca", layer="final_norm", n=5, threshold=0.2)
    """

    kind = "trend"

    def __init__(
        self,
        metric: str,
        layer: str = "*",
        n: int = 5,
        threshold: float = 0.1,
        direction: str = "drop",
        max_reversals: int = 0,
        cooldown: int = 0,
        rearm_fraction: float = 0.5,
        severity: str = "warning",
        name: str | None = None,
    ) -> None:
        self.n = check_int("n", n, 3)
        self.threshold = check_number("threshold", threshold, 0, low_open=True)
        self.direction = check_choice("direction", direction, SIDED_DIRECTIONS)
        self.max_reversals = check_int("max_reversals", max_reversals, 0)
        super().__init__(
            metric,
            layer=layer,
            name=name,
            cooldown=cooldown,
            severity=severity,
            rearm_fraction=rearm_fraction,
        )

    def _new_state(self) -> dict[str, Any]:
        return {"stage": None, "values": []}

    def _load_key_state(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        stage = saved.get("stage")
        return {
            "stage": stage if isinstance(stage, str) else None,
            "values": _float_list(saved.get("values"), self.n),
        }

    def _observe(self, st: dict[str, Any], value: float, stage: str, label: str) -> _Obs | None:
        if st["stage"] != stage:
            st["stage"], st["values"] = stage, []
        if not math.isfinite(value):
            return None
        st["values"] = (list(st["values"]) + [value])[-self.n :]
        if len(st["values"]) < self.n:
            return None
        window = st["values"]
        decision = evaluate_trend(
            window, self.threshold, self.direction, max_reversals=self.max_reversals, label=label
        )
        rel = trend_statistics(window).relative_change
        if decision.reason == "undefined" or not math.isfinite(rel):
            return None
        moved = _directional(rel, self.direction)
        return _Obs(decision, moved <= self.threshold * self.rearm_fraction, value, window[0])


class ThresholdRule(_SeriesRule):
    """An absolute bound on a metric: fires when it goes above ``above`` or below ``below``.

    Hysteresis uses absolute re-arm levels: after firing on ``above`` the rule re-arms once the
    value is ``<= rearm_above`` (default: ``above``), after ``below`` once it is
    ``>= rearm_below`` (default: ``below``). (A fraction of an absolute threshold has no natural
    scale, so the relative ``rearm_fraction`` of the other rules does not apply here.)

    Args:
        metric: metric name.
        layer: a layer name, ``"*"`` or ``"mean"``.
        above: upper bound, or None.
        below: lower bound, or None (at least one of the two).
        rearm_above: re-arm level after firing on ``above`` (<= ``above``).
        rearm_below: re-arm level after firing on ``below`` (>= ``below``).
        cooldown: captures after a firing during which it cannot fire again.
        severity: ``"warning"`` or ``"critical"``.
        name: rule name (default ``"threshold:<metric>@<layer>"``).

    Raises:
        ValueError: on any invalid argument.

    Example:
        >>> rule = ThresholdRule("anisotropy", layer="final_norm", above=0.9, rearm_above=0.8)
    """

    kind = "threshold"

    def __init__(
        self,
        metric: str,
        layer: str = "*",
        above: float | None = None,
        below: float | None = None,
        rearm_above: float | None = None,
        rearm_below: float | None = None,
        cooldown: int = 0,
        severity: str = "warning",
        name: str | None = None,
    ) -> None:
        self.above, self.below = _check_bounds(above, below)
        self.rearm_above = self._check_rearm("rearm_above", rearm_above, self.above, upper=True)
        self.rearm_below = self._check_rearm("rearm_below", rearm_below, self.below, upper=False)
        super().__init__(
            metric, layer=layer, name=name, cooldown=cooldown, severity=severity, rearm_fraction=0.0
        )

    @staticmethod
    def _check_rearm(field: str, value: Any, bound: float | None, *, upper: bool) -> float | None:
        if value is None:
            return bound
        side = "above" if upper else "below"
        if bound is None:
            raise ValueError(f"`{field}` needs `{side}`, got {field}={value!r} and {side}=None")
        v = check_number(field, value)
        if (upper and v > bound) or (not upper and v < bound):
            rel = "<=" if upper else ">="
            raise ValueError(f"`{field}` must be {rel} `{side}`={bound!r}, got {value!r}")
        return v

    def _observe(self, st: dict[str, Any], value: float, stage: str, label: str) -> _Obs | None:
        decision = evaluate_threshold(value, self.above, self.below, label=label)
        if decision.reason == "undefined":
            return None
        recovered = (self.rearm_above is None or value <= self.rearm_above) and (
            self.rearm_below is None or value >= self.rearm_below
        )
        if decision.reason in ("above", "below"):
            ref = self.above if decision.reason == "above" else self.below
        elif self.rearm_above is not None and self.rearm_below is not None:  # the nearer re-arm level
            ref = (
                self.rearm_above if value - self.rearm_above >= self.rearm_below - value else self.rearm_below
            )
        else:
            ref = self.rearm_above if self.rearm_above is not None else self.rearm_below
        return _Obs(decision, recovered, value, math.nan if ref is None else float(ref))


class NonFiniteRule(Rule):
    """Non-finite metric values, or non-finite activations (``n_nonfinite > 0``).

    Fires (severity ``"critical"`` by default) when a record of the watched layer has a non-finite
    value for a watched metric or a positive ``count_metric``; re-arms, and reports
    ``"recovered"``, at the first record of that layer with neither.

    Args:
        watch: metric names that must stay finite (metrics that are NaN by definition for some
            inputs, such as an entropy of an empty diagram, should not be watched).
        layer: a layer name or ``"*"`` (each layer separately).
        count_metric: metric counting non-finite activations, or None.
        cooldown: captures after a firing during which it cannot fire again.
        severity: ``"warning"`` or ``"critical"``.
        name: rule name (default ``"nonfinite@<layer>"``).

    Raises:
        ValueError: on any invalid argument.

    Example:
        >>> rule = NonFiniteRule(watch=["rankme"])
    """

    kind = "nonfinite"

    def __init__(
        self,
        watch: Sequence[str] = (),
        layer: str = "*",
        count_metric: str | None = "n_nonfinite",
        cooldown: int = 0,
        severity: str = "critical",
        name: str | None = None,
    ) -> None:
        if isinstance(watch, str) or not all(isinstance(m, str) and m for m in watch):
            raise ValueError(f"`watch` must be a list of metric names, got {watch!r}")
        self.watch = tuple(watch)
        self.count_metric = check_str("count_metric", count_metric) if count_metric is not None else None
        if not self.watch and self.count_metric is None:
            raise ValueError("`watch` is empty and `count_metric` is None: the rule would watch nothing")
        if layer == "mean":
            raise ValueError(f"`layer` must be a layer name or '*' for NonFiniteRule, got {layer!r}")
        super().__init__(name=name, cooldown=cooldown, severity=severity, layer=layer)

    @property
    def _names(self) -> tuple[str, ...]:
        return self.watch + ((self.count_metric,) if self.count_metric else ())

    @property
    def metrics(self) -> tuple[str, ...]:
        """The watched metrics and the count metric (empty on the trainer's logs)."""
        return () if self.layer == TRAINER_LAYER else self._names

    @property
    def trainer_metrics(self) -> tuple[str, ...]:
        """The watched log keys with ``layer="trainer"`` (a NaN loss), else empty."""
        return self._names if self.layer == TRAINER_LAYER else ()

    def _default_name(self) -> str:
        return f"{self.kind}@{self.layer}"

    def _conditions(self, records: Sequence[MetricRecord]) -> list[_Cond]:
        out = []
        names = set(self._names)
        for r in records:
            mine = r.layer == self.layer or (self.layer == "*" and r.layer != TRAINER_LAYER)
            if not mine or not names.intersection(r.metrics):
                continue
            d = evaluate_nonfinite(r.metrics, self.watch, self.count_metric)
            bad = [m for m in self.watch if m in r.metrics and not math.isfinite(_as_float(r.metrics[m]))]
            metric = bad[0] if bad else (self.count_metric or self.watch[0])
            value = _as_float(r.metrics.get(metric, math.nan))
            obs = _Obs(Decision(d.fired, d.reason, f"{r.layer}: {d.message}"), not d.fired, value, math.nan)
            out.append(_Cond(r.layer, metric, obs, r))
        return out
