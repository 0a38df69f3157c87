"""``make bench-gpu`` is ready before a GPU is lent: its dry run goes through the same path on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_dry_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_cpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    s = result["summary"]
    assert set(s) == {"off", "default", "aggressive"}
    for arm in ("default", "aggressive"):
        assert s[arm]["captures"] >= 2 and s[arm]["wall_ratio"] > 0
        assert s[arm]["capture_stall_median_s"] > 0 and s[arm]["probe_forward_s"] > 0
        assert s[arm]["stall_over_forward"] > 0
    assert s["off"]["gpu_peak_mib"] is None  # on the CPU: no device memory to report
