"""``overhead_budget``: whether one more capture keeps the monitor's cost within its share of training.

:class:`OverheadBudget` is pure bookkeeping, testable without a trainer: it counts the time the
monitor held training (its stall) and is told the worker's CPU time when that competes with
training (a model trained on the CPU). The decision itself is :func:`fits`. Under several
processes only the main process asks; the session broadcasts its answer, so every rank captures
at the same steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["OverheadBudget", "WorkerCost", "fits"]


class WorkerCost(Protocol):
    """What the budget reads of a worker whose CPU time competes with training (an executor)."""

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds the worker has spent so far."""

    @property
    def pending(self) -> int:
        """Captures it still has in hand."""

    @property
    def task_cpu(self) -> Sequence[float]:
        """CPU seconds of its recent captures."""


def fits(cost: float, estimate: float, elapsed: float, fraction: float) -> bool:
    """Whether ``cost + estimate`` seconds stay within ``fraction`` of ``elapsed + estimate``.

    Example:
        >>> fits(cost=1.0, estimate=0.5, elapsed=200.0, fraction=0.01)
        True
        >>> fits(cost=1.0, estimate=0.5, elapsed=100.0, fraction=0.01)
        False
    """
    return cost + estimate <= fraction * (elapsed + estimate)


@dataclass
class OverheadBudget:
    """The monitor's cost so far and whether the next capture fits.

    Args:
        fraction: the largest share of the training's wall time the monitor may cost (None: no
            limit, every scheduled capture is taken).
        clock: a monotonic clock in seconds (injectable for tests).
        worker: the worker, when its CPU time competes with training (a model trained on the CPU);
            None when it runs on cores training does not use.
    """

    fraction: float | None
    clock: Callable[[], float] = time.perf_counter
    t_begin: float | None = None
    stall_seconds: float = 0.0
    capture_stalls: list[float] = field(default_factory=list)
    worker: WorkerCost | None = None

    def start(self) -> None:
        """Start counting the training's wall time (after set-up; the baseline capture is a stall)."""
        self.t_begin = self.clock()

    def elapsed(self) -> float:
        """Seconds since :meth:`start` (0 before)."""
        return 0.0 if self.t_begin is None else self.clock() - self.t_begin

    def cost(self) -> float:
        """The stall, plus the worker's CPU time when it counts (:attr:`worker`)."""
        return self.stall_seconds + (self.worker.cpu_seconds if self.worker is not None else 0.0)

    def allows(self) -> bool:
        """Whether one more capture keeps the cost within the budget.

        The estimate of the next capture is the least of the last three stalls (the step-0 baseline
        also pays one-time warm-up), plus the least of the worker's last three capture CPU times when
        it counts. While a counted worker still computes, its cost is not known yet: one capture in
        flight at most.
        """
        if self.fraction is None or self.t_begin is None or not self.capture_stalls:
            return True
        estimate = min(self.capture_stalls[-3:])
        if self.worker is not None:
            if self.worker.pending:
                return False
            recent = list(self.worker.task_cpu)[-3:]
            estimate += min(recent) if recent else 0.0
        return fits(self.cost(), estimate, self.elapsed(), self.fraction)
