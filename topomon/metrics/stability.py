"""Capture-to-capture stability of logged metrics: jumps a layer makes that the model's output does not.

A metric that changes by a large factor between two consecutive captures of one layer while the
final-norm output changes smoothly is tracking a handful of tokens, not the model (issue 25,
``docs/METRICS.md``). :func:`capture_jumps` finds such steps in the records of a run (the dicts
of ``metrics.jsonl``); the demo's stability check runs it on ``make demo``'s log.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Jump", "capture_jumps"]


@dataclass(frozen=True)
class Jump:
    """One step where a layer's metric jumped while the reference layer's did not.

    Attributes:
        stage: the stage.
        step: the later capture's step.
        layer: the layer that jumped.
        ratio: ``max(v / v_prev, v_prev / v)`` of the layer's metric.
        reference_ratio: the same of the reference layer at that step.
    """

    stage: str
    step: int
    layer: str
    ratio: float
    reference_ratio: float


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not (a > 0 and b > 0) or not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    return max(a / b, b / a)


def capture_jumps(
    records: Iterable[Mapping[str, Any]],
    *,
    metric: str = "rankme_pca",
    ratio: float = 3.0,
    reference: str = "final_norm",
    reference_ratio: float = 1.5,
) -> list[Jump]:
    """Steps where a layer's metric jumps between consecutive captures and the reference layer's does not.

    A jump: ``metric`` changes by more than ``ratio`` x between consecutive captures of a stage
    while the ``reference`` layer's changes by at most ``reference_ratio`` x.

    Args:
        records: ``metrics.jsonl`` lines (dicts with ``kind``, ``stage``, ``step``, ``layer``,
            ``metrics``); lines of other kinds are ignored. Consecutive means consecutive captures
            of the same stage.
        metric: the metric compared.
        ratio: the largest allowed factor between consecutive captures of a layer.
        reference: the layer whose change excuses a jump (the model's output).
        reference_ratio: a reference change above this factor excuses the step.

    Returns:
        The jumps, in stage and step order (empty: stable). A missing, zero or non-finite value is
        never a jump (nothing to compare); a step without a reference value is never excused.

    Example:
        >>> rec = lambda step, layer, v: {"kind": "metrics", "stage": "s", "step": step,
        ...                               "layer": layer, "metrics": {"rankme_pca": v}}
        >>> rs = [rec(0, "layer_1", 100.0), rec(0, "final_norm", 50.0),
        ...       rec(5, "layer_1", 10.0), rec(5, "final_norm", 45.0)]
        >>> [(j.step, j.layer, j.ratio) for j in capture_jumps(rs)]
        [(5, 'layer_1', 10.0)]
    """
    series: dict[str, dict[int, dict[str, float | None]]] = {}
    stages: list[str] = []
    for r in records:
        if r.get("kind", "metrics") != "metrics" or "metrics" not in r:
            continue
        stage = str(r["stage"])
        if stage not in series:
            stages.append(stage)
        v = r["metrics"].get(metric)
        series.setdefault(stage, {}).setdefault(int(r["step"]), {})[str(r["layer"])] = (
            None if v is None else float(v)
        )
    jumps: list[Jump] = []
    for stage in stages:
        steps = sorted(series[stage])
        for prev, cur in zip(steps, steps[1:], strict=False):
            a, b = series[stage][prev], series[stage][cur]
            ref = _ratio(b.get(reference), a.get(reference))
            for layer in b:
                if layer == reference or layer not in a:
                    continue
                change = _ratio(b[layer], a[layer])
                if change > ratio and not ref > reference_ratio:
                    jumps.append(Jump(stage, cur, layer, change, ref))
    return jumps
