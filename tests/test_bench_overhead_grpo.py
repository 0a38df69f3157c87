"""``bench/overhead.py --trainer grpo``: the GRPO arm runs off and default side by side (tiny model, CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_grpo_overhead_benchmark_times_steps_with_and_without_the_monitor(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "grpo.json"
    cmd = [sys.executable, str(ROOT / "bench" / "overhead.py"), "--trainer", "grpo", "--model", "random-tiny"]
    cmd += ["--rounds", "1", "--steps", "3", "--arms", "off,default", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = {r["arm"]: r for r in json.loads(out.read_text())}
    assert set(runs) == {"off", "default"}
    for r in runs.values():
        assert r["trainer"] == "grpo" and len(r["step_s"]) == 3 and all(s > 0 for s in r["step_s"])
    d = runs["default"]
    assert d["captures"] >= 1 and d["dropped"] == 0 and d["errors"] == 0 and d["probe_forward_s"] > 0
    assert "captures" not in runs["off"]  # the reference ran without a monitor
    assert "| default |" in proc.stdout and "median step time, ratio to off" in proc.stdout


def test_an_unknown_arm_is_refused_before_anything_runs():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "overhead.py"), "--trainer", "grpo", "--arms", "off,fast"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "unknown ['fast']" in proc.stderr
