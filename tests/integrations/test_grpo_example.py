"""examples/grpo_rlvr.py: the GRPO example runs with the rl preset and prints what the monitor saw."""

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_rlvr.py"


@pytest.mark.slow
def test_the_grpo_example_prints_trls_reward_and_entropy_beside_the_probe_entropy(tmp_path, capsys):
    pytest.importorskip("trl")
    spec = importlib.util.spec_from_file_location("grpo_rlvr", EXAMPLE)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    assert ex.sum_reward(["The sum is 42.", [{"role": "assistant", "content": "41"}]], [42, 42]) == [1.0, 0.0]
    assert ex.main(["--tiny", "--out", str(tmp_path), "--every", "2"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line[:4].strip().isdigit()]
    assert [int(r[0]) for r in rows] == list(range(0, 7))
    # the probe entropy (topomon) at every capture, TRL's reward and rollout entropy at every step
    lines = [json.loads(x) for x in (tmp_path / "topomon" / "metrics.jsonl").read_text().splitlines()]
    probe = {
        r["step"]: r["metrics"]["logit_entropy"]
        for r in lines
        if r.get("kind") == "metrics" and r.get("layer") == "model" and r.get("stage") == "grpo"
    }
    assert sorted(probe) == [0, 2, 4, 6]
    assert all(float(r[-1]) == pytest.approx(probe[int(r[0])], abs=1e-3) for r in rows if int(r[0]) in probe)
    assert all(len(r) >= 3 for r in rows if int(r[0]) > 0)
    config = json.loads((tmp_path / "topomon" / "run.json").read_text())
    assert "rollout_entropy_drop" in json.dumps(config)  # the rl preset's rules are the ones running
    assert "alerts" in printed
