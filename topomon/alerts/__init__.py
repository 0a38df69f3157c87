"""Alerts over metric streams: pure decisions, stateful rules, the engine that runs them, sinks.

Modules: :mod:`~topomon.alerts.decisions` (pure functions returning a :class:`Decision`),
:mod:`~topomon.alerts.base` (the :class:`Rule` base: state, cooldown, hysteresis),
:mod:`~topomon.alerts.series` (the rules over one stream: drop, spike, trend, threshold,
non-finite), :mod:`~topomon.alerts.composite` (:class:`CompositeRule`: any-of, k-of-n, all-of within
a window; :func:`rules_from_config`), :mod:`~topomon.alerts.rules` (every rule type in one place,
:func:`default_rules`), :mod:`~topomon.alerts.engine` (:class:`AlertEngine`: captures' records and
the trainer's logged values, layer :data:`TRAINER_LAYER`) and
:mod:`~topomon.alerts.sinks` (where alerts go). Importing this package loads numpy and the
standard library only.

Example:
    >>> from topomon.alerts import AlertEngine, default_rules
    >>> from topomon.types import MetricRecord
    >>> engine = AlertEngine(default_rules(), known_metrics=["rankme", "rankme_pca", "n_nonfinite"])
    >>> rec = lambda step, v: MetricRecord(step, "narrow", "final_norm", {"rankme": v})
    >>> engine.update([rec(0, 40.0)]), [a.reason for a in engine.update([rec(4, 30.0)])]
    ([], ['drop'])
"""

from topomon.alerts.base import TRAINER_LAYER, Rule
from topomon.alerts.composite import CompositeRule
from topomon.alerts.decisions import (
    BASELINES,
    DIRECTIONS,
    SEVERITIES,
    SIDED_DIRECTIONS,
    Decision,
    TrendStats,
    evaluate_drop,
    evaluate_k_of_n,
    evaluate_mean_spike,
    evaluate_nonfinite,
    evaluate_spike,
    evaluate_threshold,
    evaluate_trend,
    hysteresis_step,
    parts_within,
    relative_change,
    robust_zscore,
    trend_statistics,
)
from topomon.alerts.engine import AlertEngine
from topomon.alerts.rules import (
    DETECTORS,
    RULE_TYPES,
    SHIPPED,
    DropRule,
    MeanSpikeRule,
    NonFiniteRule,
    SpikeRule,
    ThresholdRule,
    TrendRule,
    default_rules,
    rules_from_config,
)
from topomon.alerts.sinks import (
    AlertSink,
    CallableSink,
    LogSink,
    MultiSink,
    TensorBoardAlertSink,
    WebhookSink,
)
from topomon.types import Alert

__all__ = [
    # engine and rules
    "AlertEngine",
    "Rule",
    "DropRule",
    "SpikeRule",
    "MeanSpikeRule",
    "TrendRule",
    "ThresholdRule",
    "NonFiniteRule",
    "CompositeRule",
    "TRAINER_LAYER",
    "RULE_TYPES",
    "rules_from_config",
    "default_rules",
    "DETECTORS",
    "SHIPPED",
    # pure decisions
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
    # the alert record and where alerts go
    "Alert",
    "AlertSink",
    "LogSink",
    "CallableSink",
    "WebhookSink",
    "TensorBoardAlertSink",
    "MultiSink",
]
