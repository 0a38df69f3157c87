"""The demo's stability check (issue 25): no monitored layer's ``rankme_pca`` changes by more than
3x between two consecutive captures unless the final norm also changes by more than 1.5x.

Reads ``metrics.jsonl`` of a ``make demo`` run (default: the newest ``demo_runs/run-*``), prints
every violating step and exits 1 when there is one. The same check runs in
``tests/test_demo_stability.py`` (slow).

    .venv/bin/python examples/robust_metrics/check_demo.py [demo_runs/run-.../metrics.jsonl]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from topomon.metrics.stability import capture_jumps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "metrics",
        nargs="?",
        help="a run directory or its metrics.jsonl (default: the newest demo_runs/run-*)",
    )
    a = p.parse_args()
    path = a.metrics
    if path is None:
        runs = sorted(glob.glob(os.path.join("demo_runs", "run-*", "metrics.jsonl")))
        if not runs:
            print("no demo_runs/run-*/metrics.jsonl: run `make demo` first", file=sys.stderr)
            return 2
        path = runs[-1]
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    jumps = capture_jumps(
        records, metric="rankme_pca", ratio=3.0, reference="final_norm", reference_ratio=1.5
    )
    for j in jumps:
        print(
            f"{j.stage} step {j.step}: {j.layer} rankme_pca x{j.ratio:.2f} "
            f"while final_norm x{j.reference_ratio:.2f}"
        )
    print(f"{path}: {len(jumps)} unexcused jump(s)")
    return 1 if jumps else 0


if __name__ == "__main__":
    sys.exit(main())
