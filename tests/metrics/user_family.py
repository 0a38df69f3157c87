"""A user's metric family, declared as docs/ARCHITECTURE.md's recipe says (not a test module).

The worker process imports it by name, and its option is set in the config:
``MonitorConfig(families=["tests.metrics.user_family:ROWS"],
family_options={"user_rows": {"rows_scale": 2.5}})``.
"""

from __future__ import annotations

import numpy as np

from topomon.metrics.families import FamilyComputer, FamilyInput, FamilyOutput, MetricFamily
from topomon.metrics.options import ComputeOptions


class RowsComputer(FamilyComputer):
    """How many points a layer kept, their mean norm, and the count times the family's option."""

    def __init__(self, options: ComputeOptions):
        self.scale = float(ROWS.settings(options)["rows_scale"])

    def compute(self, inp: FamilyInput) -> FamilyOutput:
        _, points = inp.layer_arrays()
        norms = np.linalg.norm(np.asarray(points, dtype=np.float64), axis=1)
        n = float(len(points))
        return FamilyOutput(
            {"user_rows": n, "user_mean_norm": float(norms.mean()), "user_scaled_rows": self.scale * n}
        )


ROWS = MetricFamily(
    name="user_rows",
    scope="layer",
    keys=("user_rows", "user_mean_norm", "user_scaled_rows"),
    needs=frozenset({"points"}),
    options={"rows": True, "rows_scale": 1.0},
    switch="rows",
    start=RowsComputer,
)
