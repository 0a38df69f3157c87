"""Alert rules over metric streams: small stateful rules around the pure decisions.

The decisions themselves live in :mod:`topomon.alerts.decisions`. The rule classes only add state:
the baselines and histories they read from the stream itself, a cooldown (in captures) and
hysteresis (a fired rule re-arms only once the metric has recovered well inside its threshold, and
then emits an :class:`~topomon.types.Alert` with ``reason="recovered"`` and ``severity="info"``).
:class:`~topomon.alerts.engine.AlertEngine` runs a set of them. This module gathers every rule type
(the one-stream rules of :mod:`topomon.alerts.series`, :class:`CompositeRule`), builds them from
config (:func:`rules_from_config`) and holds :func:`default_rules`.

Example:
    >>> from topomon.alerts import AlertEngine
    >>> from topomon.types import MetricRecord
    >>> engine = AlertEngine(default_rules(), known_metrics=["rankme", "rankme_pca", "n_nonfinite"])
    >>> rec = lambda step, v: MetricRecord(step, "narrow", "final_norm", {"rankme": v})
    >>> engine.update([rec(0, 40.0)]), [a.reason for a in engine.update([rec(4, 30.0)])]
    ([], ['drop'])
"""

from __future__ import annotations

from topomon.alerts.base import Rule
from topomon.alerts.composite import RULE_TYPES, CompositeRule, rules_from_config
from topomon.alerts.series import DropRule, NonFiniteRule, SpikeRule, ThresholdRule, TrendRule

__all__ = [
    "RULE_TYPES",
    "Rule",
    "DropRule",
    "SpikeRule",
    "TrendRule",
    "ThresholdRule",
    "NonFiniteRule",
    "CompositeRule",
    "rules_from_config",
    "default_rules",
]


def default_rules() -> list[Rule]:
    """The rules measured on SmolLM2-135M (RESEARCH.md): quiet in benign SFT, early in collapse.

    Final-norm RankMe dropping more than 15% from the stage start, or the centred effective rank
    (``rankme_pca``) more than 25%, never fired in a benign SFT stage and fired by step 4-8 of a
    collapsing narrow stage; plus a :class:`NonFiniteRule` on ``n_nonfinite``. In the pre-registered
    early-warning study (docs/EARLY_WARNING.md, 24 stages) they caught 10 of 16 harmful stages, 7
    before the first harm measurement, with 2 false alarms in 8 benign ones; they miss calibration
    harm without a collapse. Re-scored fairly (every baseline tuned on seed 0 as hard as these),
    a training-loss drop rule and a rise of the probe ``logit_nll`` warned as well or better on the
    held-out seeds.

    Returns:
        ``[DropRule("rankme", "final_norm", 0.15), DropRule("rankme_pca", "final_norm", 0.25),
        NonFiniteRule()]``.
    """
    return [
        DropRule("rankme", layer="final_norm", threshold=0.15, baseline="stage_start", direction="drop"),
        DropRule("rankme_pca", layer="final_norm", threshold=0.25, baseline="stage_start", direction="drop"),
        NonFiniteRule(),
    ]
