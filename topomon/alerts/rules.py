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

from typing import Any

from topomon.alerts.base import Rule
from topomon.alerts.composite import RULE_TYPES, CompositeRule, rules_from_config
from topomon.alerts.series import DropRule, NonFiniteRule, ThresholdRule, TrendRule
from topomon.alerts.spikes import MeanSpikeRule, SpikeRule

__all__ = [
    "RULE_TYPES",
    "Rule",
    "DropRule",
    "SpikeRule",
    "MeanSpikeRule",
    "TrendRule",
    "ThresholdRule",
    "NonFiniteRule",
    "CompositeRule",
    "rules_from_config",
    "default_rules",
    "DETECTORS",
    "SHIPPED",
]


_RANKME = {"type": "drop", "metric": "rankme", "layer": "final_norm", "threshold": 0.15}
_RANKME_PCA = {"type": "drop", "metric": "rankme_pca", "layer": "final_norm", "threshold": 0.25}
_PROBE_NLL = {
    "type": "drop",
    "metric": "logit_nll",
    "layer": "model",
    "direction": "rise",
    "threshold": 0.02,
    "name": "probe_nll",
}
_TRAINING_LOSS = {
    "type": "drop",
    "metric": "loss",
    "layer": "trainer",
    "threshold": 0.70,
    "window": 4,
    "reference_window": 1,
    "reference_floor": 0.0,
    "name": "training_loss",
}


def _any_of(name: str, *parts: dict[str, Any]) -> dict[str, Any]:
    return {"type": "composite", "name": name, "k": 1, "parts": [dict(p) for p in parts]}


DETECTORS: dict[str, list[dict[str, Any]]] = {
    "v1": [_RANKME, _RANKME_PCA],
    "v2": [
        _any_of(
            "v2",
            {**_RANKME, "name": "rankme"},
            {**_RANKME_PCA, "name": "rankme_pca"},
            _PROBE_NLL,
            _TRAINING_LOSS,
        )
    ],
    "nll+loss": [_any_of("nll_loss", _PROBE_NLL, _TRAINING_LOSS)],
    "training-loss drop": [_TRAINING_LOSS],
    "probe NLL": [_PROBE_NLL],
    "loss spike": [
        {"type": "mean_spike", "metric": "loss", "layer": "trainer", "rtol": 0.5, "name": "loss_spike"}
    ],
    "grad-norm spike": [
        {
            "type": "mean_spike",
            "metric": "grad_norm",
            "layer": "trainer",
            "rtol": 1.0,
            "name": "grad_norm_spike",
        }
    ],
    "grad-norm level": [
        {
            "type": "drop",
            "metric": "grad_norm",
            "layer": "trainer",
            "direction": "rise",
            "threshold": 0.5,
            "reference_window": 4,
            "reference_stat": "median",
            "name": "grad_norm_level",
        }
    ],
}
"""The candidate default detectors of docs/EARLY_WARNING.md part 3, as alert-rule configs (without the
non-finite rule every default adds), at the knobs tuned on study 1's seed 0:

- ``"v1"``: final-norm RankMe -15% or ``rankme_pca`` -25% from the stage start (two rules);
- ``"v2"``: one any-of composite of those two, the probe ``logit_nll`` up >= 2% from the stage start,
  and the training loss (mean of its last 4 logged values) at or below 30% of its first logged value,
  silent while that first value is <= 0 (a GRPO policy loss);
- ``"nll+loss"``: the any-of of the last two; ``"training-loss drop"`` and ``"probe NLL"``: each alone;
- ``"loss spike"`` and ``"grad-norm spike"``: Lightning's ``SpikeDetection`` test on the trainer's
  ``loss`` (rtol 0.5) and ``grad_norm`` (rtol 1.0);
- ``"grad-norm level"``: the gradient norm above 1.5x the median of its first 4 logged values.

:data:`SHIPPED` names the one :func:`default_rules` returns. Each is tested to fire live where part
3's offline replay of it does.
"""

SHIPPED = "v1"
"""The detector the default rules are: study 2 (docs/EARLY_WARNING.md part 3) decides it."""


def default_rules(detector: str = SHIPPED) -> list[Rule]:
    """The default alert rules: a detector of :data:`DETECTORS` and a :class:`NonFiniteRule`.

    The shipped detector (``"v1"``) is the rules measured on SmolLM2-135M (RESEARCH.md): final-norm
    RankMe dropping more than 15% from the stage start, or the centred effective rank
    (``rankme_pca``) more than 25%. They never fired in a benign SFT stage and fired by step 4-8 of a
    collapsing narrow stage. In the pre-registered early-warning study (docs/EARLY_WARNING.md, 24
    stages) they caught 10 of 16 harmful stages, 7 before the first harm measurement, with 2 false
    alarms in 8 benign ones; they miss calibration harm without a collapse. Re-scored fairly (every
    baseline tuned on seed 0 as hard as these), a training-loss drop rule and a rise of the probe
    ``logit_nll`` warned as well or better on the held-out seeds.

    Args:
        detector: a key of :data:`DETECTORS`.

    Returns:
        ``[DropRule("rankme", "final_norm", 0.15), DropRule("rankme_pca", "final_norm", 0.25),
        NonFiniteRule()]`` for ``"v1"``.

    Raises:
        ValueError: on an unknown ``detector`` (the known ones are listed).
    """
    if detector not in DETECTORS:
        raise ValueError(f"`detector` must be one of {list(DETECTORS)}, got {detector!r}")
    return rules_from_config([*DETECTORS[detector], {"type": "nonfinite"}])
