"""The worker's fixed cost: CPU of a fresh worker process's imports and first captures.

On a CPU-trained model the worker's CPU time is taken from training, and a short run pays the
worker's start and its first capture in full. Each repeat starts a fresh worker through the
monitor's own executor (spawned, at the default priority) and gives it two captures of the default
shape, one after the other: 5 layers (4 blocks and the final norm) of 512 x 576 points
(SmolLM2-135M), logit statistics of the 512 tokens, the default options (persistent homology on the
last layer, 256 points, PCA 32). The points are synthetic (a power-law covariance spectrum in a
random basis), so the run needs no model. Reported in CPU seconds of the worker (user + system, as
the worker itself reports them): its start (interpreter, imports, unpickling), the first capture
(cold) and the second (warm), with figures (the default draws them at its first capture) and
without, alternating; median over ``--repeats``.

    python bench/worker_cold.py [--repeats 3] [--out bench/results/worker_cold_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import numpy as np
from _common import emit_json

from topomon.config import MonitorConfig
from topomon.pipeline import compute_options
from topomon.types import Snapshot
from topomon.worker.executor import ProcessExecutor

LAYERS = ["layer_7", "layer_15", "layer_22", "layer_29", "final_norm"]


def _snapshot(step: int, figures: bool, n: int = 512, d: int = 576) -> Snapshot:
    rng = np.random.default_rng(step)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scale = np.arange(1, d + 1) ** -0.5
    layers = {
        name: ((rng.standard_normal((n, d)) * scale) @ basis.T + 0.1 * i).astype(np.float32)
        for i, name in enumerate(LAYERS)
    }
    extras = {
        "logits/entropy": rng.uniform(0, 5, n).astype(np.float32),
        "logits/top1_prob": rng.uniform(0, 1, n).astype(np.float32),
        "logits/correct": rng.uniform(0, 1, n) < 0.4,
        "logits/nll": rng.uniform(0, 8, n).astype(np.float32),
    }
    return Snapshot(step, "bench", layers, extras, {"figures": figures})


def _one_worker(options: Any, figures: bool) -> dict[str, float]:
    """A fresh worker process through the monitor's own executor: CPU seconds of its start
    (interpreter, imports, unpickling) and of its first and second capture."""
    snaps = [_snapshot(i, figures) for i in (0, 1)]
    done: list[int] = []
    t0 = time.perf_counter()
    ex = ProcessExecutor(options, lambda records: done.append(len(records)), queue_size=2)
    for i, snap in enumerate(snaps):  # one at a time: the second capture finds a warm worker
        ex.submit(snap)
        deadline = time.monotonic() + 300
        while len(done) <= i:
            if ex.stats.failed or ex.stats.lost or time.monotonic() > deadline:
                ex.close(timeout=1)
                raise RuntimeError(f"the worker did not finish capture {i}: {ex.last_error}")
            time.sleep(0.01)
    first, second = ex.task_cpu[0], ex.task_cpu[1]
    total = ex.cpu_seconds
    ex.close()
    return {
        "start_s": total - first - second,
        "first_s": first,
        "second_s": second,
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    a = p.parse_args()
    options = compute_options(MonitorConfig(), LAYERS, n_blocks=30)
    results: dict[str, list[dict[str, float]]] = {"no figures": [], "figures": []}
    for _ in range(a.repeats):
        for label in results:  # alternate, so that drift of the machine hits both alike
            results[label].append(_one_worker(options, label == "figures"))
    summary = {
        label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in results.items()
    }
    out = {
        "command": f"python bench/worker_cold.py --repeats {a.repeats}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average": os.getloadavg(),
        "median": summary,
        "runs": results,
    }
    emit_json(out, a.out)


if __name__ == "__main__":
    main()
