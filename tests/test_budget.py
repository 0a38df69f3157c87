"""OverheadBudget without a trainer: a fake clock and a fake worker."""

from dataclasses import dataclass, field

from topomon.budget import OverheadBudget, fits


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@dataclass
class Worker:
    cpu_seconds: float = 0.0
    pending: int = 0
    task_cpu: list = field(default_factory=list)


def test_fits_is_the_share_of_the_time_including_the_next_capture():
    assert fits(cost=1.0, estimate=1.0, elapsed=199.0, fraction=0.01)  # 2 <= 0.01 * 200
    assert not fits(cost=1.0, estimate=1.01, elapsed=199.0, fraction=0.01)


def test_no_limit_or_no_capture_yet_always_allows():
    clock = Clock()
    assert OverheadBudget(None, clock=clock).allows()
    b = OverheadBudget(0.01, clock=clock)
    assert b.allows()  # not started
    b.start()
    assert b.allows()  # nothing to estimate the next capture from


def test_the_estimate_is_the_least_of_the_last_three_stalls():
    clock = Clock()
    b = OverheadBudget(0.1, clock=clock)
    b.start()
    b.capture_stalls += [5.0, 1.0, 1.0, 1.0]  # the warm-up baseline no longer counts
    b.stall_seconds = 8.0
    clock.t += 79.0  # 8 + 1 <= 0.1 * (79 + 1) is false
    assert not b.allows()
    clock.t += 11.0  # 8 + 1 <= 0.1 * (90 + 1)
    assert b.allows()


def test_a_worker_on_the_training_cores_counts_and_allows_one_capture_in_flight():
    clock = Clock()
    worker = Worker(cpu_seconds=3.0, task_cpu=[2.0, 1.0])
    b = OverheadBudget(0.1, clock=clock, worker=worker)
    b.start()
    b.capture_stalls.append(1.0)
    b.stall_seconds = 1.0
    assert b.cost() == 4.0
    clock.t += 59.0  # cost 4 + estimate (1 + 1) = 6 <= 0.1 * 60
    assert b.allows()
    worker.pending = 1  # its cost is not known yet
    assert not b.allows()
    worker.pending = 0
    b.worker = None  # on an accelerator: the worker's CPU is free
    assert b.cost() == 1.0
    clock.t -= 39.0  # 1 + 1 <= 0.1 * 21
    assert b.allows()
