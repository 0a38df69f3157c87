"""``overhead_budget``: whether one more capture keeps the monitor's cost within its share of training.

:class:`OverheadBudget` is pure bookkeeping, testable without a trainer: it counts the time the
monitor held training (its stall) and is told the worker's CPU time when that competes with
training (a model trained on the CPU). The decision itself is :func:`fits`. Under several
processes only the main process asks; the session broadcasts its answer, so every rank captures
at the same steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from topomon.distributed import Comm

__all__ = ["OverheadBudget", "WorkerCost", "fits"]

logger = logging.getLogger("topomon")


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
    deferred: int | None = None  # the first scheduled step waiting for the budget
    captures_deferred: int = 0  # scheduled steps not captured on time
    warned: bool = False

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

    def due(self, step: int, scheduled: bool, done: bool, comm: Comm, middle: bool = False) -> bool:
        """Whether to capture at ``step`` (collective when a capture waits and there is a budget).

        A scheduled step waits (one at most) while the capture would take the monitor's cost over
        the budget, and is taken at the first step where it fits, or where ``middle`` says the run
        would otherwise have no capture between its start and end. The main process decides and
        broadcasts, so every rank captures at the same steps.

        Args:
            step: the global step.
            scheduled: the schedule names this step.
            done: this step was already captured (or recorded before a resume).
            comm: the collectives of the session (a no-op in one process).
            middle: the run's middle was reached without a capture since its start.
        """
        if scheduled and self.deferred is None and not done:
            self.deferred = step
        if self.deferred is None or done:
            return False
        fits = self.fraction is None or comm.broadcast_int(
            int(self.allows() or middle) if comm.is_main else 0
        )  # no budget: every rank knows it without a collective
        if fits:
            self.deferred = None
            return True
        if scheduled:
            self.captures_deferred += 1
        if not self.warned and comm.is_main:
            self.warned = True
            logger.warning(
                "topomon: capture of step %d deferred: the monitor has cost training %.1f s of %.1f s, "
                "over overhead_budget=%g; captures resume as soon as they fit (set overhead_budget=None "
                "to capture exactly on schedule)",
                self.deferred,
                self.cost(),
                self.elapsed(),
                self.fraction,
            )
        return False
