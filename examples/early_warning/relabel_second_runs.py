"""One-off repair of six saved stages of seed 0 (docs/EARLY_WARNING.md, part 2), kept for the record.

The rerun of the study (25db24e) went into the topomon folders the withdrawn first runs had left,
so topomon continued each folder as a second stage, ``stage-2``, at steps 48-96, and the study
saved the *old* run's records (it read stage ``stage``) beside the new run's loss, gradient norm and
harm measures. This script takes the new run's records and alerts (``stage-2``) from the folder,
moves them back to steps 0-48 and the name ``stage``, and rewrites the stage's JSON. The study now
clears a stage's folders before it runs (``run_stage``), so this is not needed again.

    python examples/early_warning/relabel_second_runs.py --out examples/early_warning/results
"""

from __future__ import annotations

import argparse
import json
import os

from topomon.run import RunDir


def relabel(out: str, name: str) -> bool:
    """Rewrite ``<out>/stages/<name>.json`` with the folder's second run; False if it has none."""
    run = RunDir(os.path.join(out, "runs", name))
    with open(os.path.join(run.path, "run.json")) as fh:
        stages = {s["name"]: s for s in json.load(fh)["stages"]}
    if "stage-2" not in stages:
        return False
    offset = int(stages["stage-2"]["step_offset"])
    lines, _ = run.records()
    records = []
    for r in lines:
        if r.get("kind") == "metrics" and r.get("stage") == "stage-2":
            records.append({**r, "stage": "stage", "step": int(r["step"]) - offset})
    alerts = []
    if os.path.exists(run.alerts_path):
        with open(run.alerts_path) as fh:
            for x in fh:
                a = json.loads(x) if x.strip() else {}
                if a.get("kind", "alert") == "alert" and a.get("stage") == "stage-2":
                    alerts.append({**a, "stage": "stage", "step": int(a["step"]) - offset})
    path = os.path.join(out, "stages", f"{name}.json")
    with open(path) as fh:
        res = json.load(fh)
    res["records"], res["live_alerts"] = records, alerts
    res["relabelled"] = f"records and alerts of the folder's second run (stage-2, offset {offset})"
    with open(path + ".tmp", "w") as fh:
        json.dump(res, fh)
    os.replace(path + ".tmp", path)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="examples/early_warning/results")
    a = p.parse_args()
    for f in sorted(os.listdir(os.path.join(a.out, "stages"))):
        name = f.removesuffix(".json")
        if os.path.isdir(os.path.join(a.out, "runs", name)):
            print(f"{name}: {'relabelled' if relabel(a.out, name) else 'one run, kept'}")


if __name__ == "__main__":
    main()
