"""examples/llamafactory_sft.py: its own logic here, and real LLaMA-Factory runs in their own venv.

LLaMA-Factory 0.9.5 pins transformers <= 5.6 and trl <= 0.24, so it lives in ``.venv-llamafactory``
(``make setup-frameworks``, which ``make test`` runs), with this checkout on its path. The real runs call
the example as a user does (``python examples/llamafactory_sft.py ...``: ``run_exp(args,
callbacks=[TopoMonitor(...)])``) on a tiny local model and data set and read back what the monitor wrote.
Without that environment they skip (saying how to build it), except under CI, where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integrations.conftest import read_jsonl
from topomon.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PY = ROOT / ".venv-llamafactory" / "bin" / "python"
EXAMPLE = ROOT / "examples" / "llamafactory_sft.py"
ALWAYS = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]


def _example():
    spec = importlib.util.spec_from_file_location("llamafactory_sft", EXAMPLE)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------- the example's own logic (no LLaMA-Factory)
def test_the_topomon_section_is_taken_out_and_read_by_the_shared_path():
    ex = _example()
    args, config = ex.split_args(
        {"stage": "dpo", "dataset": "x", "topomon": {"preset": "light", "every_n_steps": 7}}
    )
    assert args == {"stage": "dpo", "dataset": "x"}  # LLaMA-Factory never sees the section
    assert config.stage == "dpo" and config.every_n_steps == 7
    assert config.topology is False and config.max_probes == 32  # from the light preset
    _, default = ex.split_args({"stage": "sft"})
    assert default.stage == "sft" and default.every_n_steps == 50


@pytest.mark.parametrize(
    "section, message",
    [
        ({"every_n_step": 3}, "did you mean 'every_n_steps'"),
        ({"preset": "lite"}, "unknown monitor preset 'lite'"),
        ({"actions": [{"kind": "stop"}, {"kind": "replay", "value": 0.5}]}, "'replay' action"),
        ({"replay_dataset": {"path": "json"}}, "replay_dataset"),
        ("light", "must be a mapping"),
    ],
)
def test_a_wrong_section_is_an_error_before_anything_is_loaded(section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _example().split_args({"stage": "sft", "topomon": section})


def test_write_tiny_registers_a_local_data_set_and_a_saved_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = _example().write_tiny(str(tmp_path), steps=3)
    info = json.loads((Path(args["dataset_dir"]) / "dataset_info.json").read_text())
    rows = json.loads((Path(args["dataset_dir"]) / info[args["dataset"]]["file_name"]).read_text())
    assert len(rows) == 32 and set(rows[0]) == {"instruction", "input", "output"}
    assert AutoModelForCausalLM.from_pretrained(args["model_name_or_path"]).config.num_hidden_layers == 4
    assert AutoTokenizer.from_pretrained(args["model_name_or_path"]).eos_token == "</s>"
    assert args["max_steps"] == 3 and args["topomon"]["every_n_steps"] == 1


# ------------------------------------------------------------------ real LLaMA-Factory runs
def run_example(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    if not PY.exists():
        msg = f"{PY} is missing: `make setup-frameworks` builds it (llamafactory in its own venv)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "DISABLE_VERSION_CHECK": "1"}
    proc = subprocess.run(
        [str(PY), str(EXAMPLE), *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_llamafactory_trains_with_the_monitor_on_schedule(tmp_path):
    proc = run_example(tmp_path, "--tiny", "--out", str(tmp_path), "--steps", "6")
    # every step captured (a capture the busy worker dropped counts too, and a dropped last one is
    # taken again at train end: [..., 6, 6]), no monitor error
    m = re.search(r"captures: \[([0-9, ]*)\], alerts: 0, errors: 0", proc.stdout)
    assert m, proc.stdout[-2000:]
    assert {int(v) for v in m.group(1).split(",")} == set(range(7))
    run_dir = tmp_path / "output" / "topomon"
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "metrics"]
    steps = sorted({r["step"] for r in recs if r["stage"] == "sft"})
    assert {0, 6} <= set(steps) <= set(range(7)) and len(steps) >= 5  # at most a dropped one or two
    assert {r["step"] for r in recs if r["stage"] == "base"} == {0}  # the baseline, stored as "base" too
    assert json.loads((tmp_path / "output" / "trainer_state.json").read_text())["global_step"] == 6


@pytest.mark.slow
def test_a_llamafactory_yaml_with_an_alert_and_a_stop_action(tmp_path):
    # the user's path: a LLaMA-Factory YAML holding a `topomon:` section, given to the example
    args = _example().write_tiny(str(tmp_path), steps=6)
    args["topomon"] = {
        "schedule": "every",
        "every_n_steps": 1,
        "worker": "sync",  # the alert is decided within the step (with a worker process it may come later)
        "alerts": ALWAYS,
        "actions": [{"kind": "stop"}],
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(args))
    proc = run_example(tmp_path, str(tmp_path / "sft.yaml"))
    assert "captures: [0, 1], alerts: " in proc.stdout  # the baseline's alert stops the run after step 1
    state = json.loads((tmp_path / "output" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 < state["max_steps"] == 6
    logged = read_jsonl(tmp_path / "output" / "topomon" / "alerts.jsonl")
    assert {a["rule"] for a in logged if a["kind"] == "alert"} == {"always"}
    assert [a["action"] for a in logged if a["kind"] == "action"] == ["stop"]
