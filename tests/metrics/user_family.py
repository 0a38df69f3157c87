"""A user's metric family, declared as docs/ARCHITECTURE.md's recipe says (not a test module).

The worker process imports it by name:
``MonitorConfig(families=["tests.metrics.user_family:ROWS"])``.
"""

from __future__ import annotations

import numpy as np

from topomon.metrics.families import FamilyComputer, FamilyInput, FamilyOutput, MetricFamily
from topomon.worker.engine import ComputeOptions


class RowsComputer(FamilyComputer):
    """How many points a layer kept, and their mean norm."""

    def __init__(self, options: ComputeOptions):
        pass

    def compute(self, inp: FamilyInput) -> FamilyOutput:
        _, points = inp.layer_arrays()
        norms = np.linalg.norm(np.asarray(points, dtype=np.float64), axis=1)
        return FamilyOutput({"user_rows": float(len(points)), "user_mean_norm": float(norms.mean())})


ROWS = MetricFamily(
    name="user_rows",
    scope="layer",
    keys=("user_rows", "user_mean_norm"),
    needs=frozenset({"points"}),
    switch="name it in `families`",
    is_on=lambda o: True,
    start=RowsComputer,
)
