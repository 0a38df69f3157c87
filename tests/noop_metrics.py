"""Custom metrics for tests/test_no_silent_noop.py, in a module the worker process imports by name.

Each reports something about where it runs (the worker's threads and priority) or takes a set time,
so that a run's ``metrics.jsonl`` shows whether a worker setting took effect.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np


def count(points: np.ndarray) -> float:
    """The number of points the layer kept."""
    return float(len(points))


def worker_env(points: np.ndarray) -> dict[str, float]:
    """Where it runs: BLAS/OpenMP threads, CPU priority (nice value), process, main thread or not."""
    from threadpoolctl import threadpool_info

    pools = [p["num_threads"] for p in threadpool_info()]
    return {
        "omp": float(os.environ.get("OMP_NUM_THREADS", "nan")),
        "pool_max": float(max(pools, default=-1)),
        "nice": float(os.getpriority(os.PRIO_PROCESS, 0)),
        "pid": float(os.getpid()),
        "main_thread": float(threading.current_thread() is threading.main_thread()),
    }


def sleepy(points: np.ndarray) -> float:
    """Half a second of the worker's time."""
    time.sleep(0.5)
    return 0.0


def stuck(points: np.ndarray) -> float:
    """Longer than any short ``task_timeout``."""
    time.sleep(8.0)
    return 0.0
