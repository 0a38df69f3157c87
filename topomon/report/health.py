"""The monitor's health counters of a run, arranged for reading: counters as rows, stages as columns.

Each stage ends with one ``{"kind": "health", ...}`` line in ``metrics.jsonl`` holding some twenty
counters. Side by side they do not fit a page, so the report shows them transposed and grouped
(captures, errors, cost, worker latency, output); a counter this module does not know goes to
``errors`` when its name says so (``sink_errors_<name>``, ``*_failed``), else to ``other``. Pure data
here; :mod:`topomon.report.html` renders it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["HEALTH_GROUPS", "COUNTER_HELP", "group_of", "health_columns", "health_groups"]

#: Group name -> its counters, in display order.
HEALTH_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("captures", ("captures", "submitted", "completed", "captures_deferred", "dropped", "failed", "lost",
                  "restarts")),
    ("errors", ("monitor_errors", "handler_errors")),
    ("cost", ("cost_fraction", "stall_fraction", "cost_seconds", "stall_seconds", "worker_cpu_seconds",
              "capture_seconds", "setup_seconds")),
    ("worker latency", ("worker_latency_median_s", "worker_latency_max_s")),
    ("output", ("alerts", "records_written", "flushed")),
)  # fmt: skip

#: What a counter counts, one short phrase (shown beside it).
COUNTER_HELP: dict[str, str] = {
    "captures": "captures taken",
    "submitted": "snapshots handed to the worker",
    "completed": "snapshots the worker computed",
    "captures_deferred": "captures postponed by the overhead budget",
    "dropped": "snapshots dropped: the worker was behind",
    "failed": "snapshots whose computation raised",
    "lost": "snapshots lost with a crashed or hung worker",
    "restarts": "worker restarts",
    "monitor_errors": "errors of the monitor in the training process",
    "handler_errors": "errors of the result handlers (logs, alerts)",
    "cost_fraction": "the monitor's cost / training time",
    "stall_fraction": "time training waited for the monitor / training time",
    "cost_seconds": "the monitor's cost, seconds",
    "stall_seconds": "time training waited for the monitor, seconds",
    "worker_cpu_seconds": "the worker's CPU time, seconds",
    "capture_seconds": "the last capture's duration, seconds",
    "setup_seconds": "the monitor's set-up, seconds",
    "worker_latency_median_s": "capture to result, median, seconds",
    "worker_latency_max_s": "capture to result, longest, seconds",
    "alerts": "alerts fired",
    "records_written": "metric lines made durable",
    "flushed": "the logs were flushed at the end (1 = yes)",
}

_NOT_COUNTERS = ("kind", "stage", "time")


def group_of(key: str) -> str:
    """The group a counter is shown in.

    Example:
        >>> group_of("dropped"), group_of("sink_errors_wandb"), group_of("something_new")
        ('captures', 'errors', 'other')
    """
    for name, keys in HEALTH_GROUPS:
        if key in keys:
            return name
    if "error" in key or "fail" in key:
        return "errors"
    return "other"


def health_columns(health: Sequence[dict[str, Any]]) -> list[str]:
    """One column label per health line: its stage, numbered when a stage has several lines.

    Example:
        >>> health_columns([{"stage": "sft"}, {"stage": "sft"}, {"stage": "dpo"}])
        ['sft', 'sft (2)', 'dpo']
    """
    seen: dict[str, int] = {}
    out = []
    for h in health:
        stage = str(h.get("stage") or "?")
        seen[stage] = seen.get(stage, 0) + 1
        out.append(stage if seen[stage] == 1 else f"{stage} ({seen[stage]})")
    return out


def health_groups(health: Sequence[dict[str, Any]]) -> list[tuple[str, list[tuple[str, list[Any]]]]]:
    """The counters of the health lines, grouped: ``[(group, [(counter, [value per line])])]``.

    Groups keep the order of :data:`HEALTH_GROUPS` (``other`` last) and leave out empty ones; a
    counter a line lacks is None there.

    Args:
        health: the ``kind == "health"`` records, one per stage end.

    Returns:
        the groups, each with its counters in display order.

    Example:
        >>> health_groups([{"stage": "sft", "dropped": 0.0, "captures": 3.0}, {"dropped": 1.0}])
        [('captures', [('captures', [3.0, None]), ('dropped', [0.0, 1.0])])]
    """
    keys = list(dict.fromkeys(k for h in health for k in h if k not in _NOT_COUNTERS))
    order = {k: i for i, k in enumerate(k for _, ks in HEALTH_GROUPS for k in ks)}
    names = [g for g, _ in HEALTH_GROUPS] + ["other"]
    out: list[tuple[str, list[tuple[str, list[Any]]]]] = []
    for group in names:
        mine = [k for k in keys if group_of(k) == group]
        mine.sort(key=lambda k: order.get(k, len(order)))  # stable: unknown ones keep their order
        if mine:
            out.append((group, [(k, [h.get(k) for h in health]) for k in mine]))
    return out
