"""Custom metrics that misbehave on purpose: imported by name inside the worker process."""

from __future__ import annotations

import os
import time

import numpy as np


def points_mean_norm(x: np.ndarray) -> float:
    return float(np.linalg.norm(x, axis=1).mean())


def slow(x: np.ndarray) -> float:
    time.sleep(float(os.environ.get("TOPOMON_TEST_SLOW", "1.0")))
    return 1.0


def busy(x: np.ndarray) -> float:
    """Burns ``TOPOMON_TEST_BUSY`` seconds of this thread's CPU (default 0.3) per call."""
    end = time.thread_time() + float(os.environ.get("TOPOMON_TEST_BUSY", "0.3"))
    n = 0
    while time.thread_time() < end:
        n += 1
    return float(n > 0)


def boom(x: np.ndarray) -> float:
    raise RuntimeError("planted failure")


def hang(x: np.ndarray) -> float:
    time.sleep(3600)
    return 0.0


def die(x: np.ndarray) -> float:
    os._exit(3)


MARK = 12345.0


def hang_on_mark(x: np.ndarray) -> float:
    if x[0, 0] == MARK:
        time.sleep(3600)
    return 0.0


def die_on_mark(x: np.ndarray) -> float:
    if x[0, 0] == MARK:
        os._exit(3)
    return 0.0
