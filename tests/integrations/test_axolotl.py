"""The Axolotl plugin with the real Axolotl: its config loading, plugin manager, trainer and training.

Axolotl pins transformers, trl and peft to versions of its own, so it lives in its own virtual
environment, ``.venv-axolotl`` (``make setup-frameworks``, which ``make test`` runs), with this checkout
on its path. Each test runs ``tests/integrations/axolotl_run.py`` there in a subprocess (Axolotl's
``load_cfg`` -> ``load_datasets`` -> ``train``, as ``axolotl train`` does in one process) on
``examples/axolotl/tiny.yaml`` and a tiny local model, and checks what it reports and writes.
Without that environment the tests skip (saying how to build it), except under CI, where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integrations.conftest import read_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PY = ROOT / ".venv-axolotl" / "bin" / "python"
CONFIG = ROOT / "examples" / "axolotl" / "tiny.yaml"
ALWAYS = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]


def _need_venv() -> None:
    if not PY.exists():
        msg = f"{PY} is missing: `make setup-frameworks` builds it (axolotl in its own venv)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def run_axolotl(tmp_path: Path, sections: list, mode: str, config: Path = CONFIG) -> list[dict]:
    """Run axolotl_run.py in the Axolotl venv, in tmp_path (where the tiny model and data are written)."""
    _need_venv()
    sys.path.insert(0, str(ROOT / "examples" / "axolotl"))
    try:
        from make_tiny import make_tiny
    finally:
        sys.path.pop(0)
    make_tiny(str(tmp_path))
    (tmp_path / "sections.json").write_text(json.dumps(sections))
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            str(PY),
            str(ROOT / "tests" / "integrations" / "axolotl_run.py"),
            str(config),
            "sections.json",
            mode,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, (
        f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return results


def test_a_wrong_topomon_section_stops_axolotls_config_loading(tmp_path):
    good, bad_key, bad_preset, replay, not_a_map = run_axolotl(
        tmp_path,
        [
            {"preset": "light", "every_n_steps": 20},
            {"every_n_step": 20},
            {"preset": "lite"},
            {"actions": [{"kind": "replay", "value": 0.5}]},
            "light",
        ],
        mode="load",
    )
    # Axolotl's schema keeps the section as written (the plugin reads it again with the trainer)
    assert good == {"topomon": {"preset": "light", "every_n_steps": 20}}
    # the others fail in load_cfg, Axolotl's pydantic validation, before any model is loaded
    assert bad_key["error"] == "ValidationError"
    assert "unknown monitor config key 'every_n_step' (did you mean 'every_n_steps'?)" in bad_key["message"]
    assert bad_preset["error"] == "ValidationError"
    assert "unknown monitor preset 'lite'" in bad_preset["message"]
    assert (
        "'replay' action" in replay["message"] and "not available in the Axolotl plugin" in replay["message"]
    )
    assert "must be a mapping" in not_a_map["message"]
    assert not (tmp_path / "runs" / "axolotl-tiny" / "out" / "topomon").exists()  # no monitor was built


def test_axolotl_trains_with_the_monitor_on_schedule_with_the_hf_paths_numbers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import topomon

    section = {"preset": "light", "schedule": "every", "every_n_steps": 2, "worker": "sync"}
    (res,) = run_axolotl(tmp_path, [section], mode="train")
    assert res["callbacks"].count("TopoMonitor") == 1 and res["n_monitors"] == 1
    assert res["global_step"] == res["max_steps"] == 6
    assert res["captures"] == [0, 2, 4, 6] and res["errors"] == 0
    assert res["stage"] == "sft"  # no `rl:` in the config
    run_dir = Path(res["run_dir"])
    assert run_dir == tmp_path / "runs" / "axolotl-tiny" / "out" / "topomon"
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "metrics"]
    assert sorted({r["step"] for r in recs if r["stage"] == "sft"}) == [0, 2, 4, 6]
    assert {r["step"] for r in recs if r["stage"] == "base"} == {0}  # the baseline, stored as "base" too
    # the light preset: blocks -4 and -1 (of 4 here) and the final norm
    assert {r["layer"] for r in recs} == {"layer_0", "layer_3", "final_norm"}

    # the baseline of the same saved model through topomon's own path (no Axolotl, this venv's
    # transformers): the same numbers, so Axolotl hands the monitor the model it loaded, unchanged
    saved = tmp_path / "runs" / "axolotl-tiny" / "model"
    model, tok = AutoModelForCausalLM.from_pretrained(saved), AutoTokenizer.from_pretrained(saved)
    with topomon.watch(model, tok, output_dir=tmp_path / "ref", **section):
        pass
    ref = {
        r["layer"]: r["metrics"]
        for r in read_jsonl(tmp_path / "ref" / "topomon" / "metrics.jsonl")
        if r["kind"] == "metrics" and r["step"] == 0 and r["stage"] == "base"
    }
    got = {r["layer"]: r["metrics"] for r in recs if r["step"] == 0 and r["stage"] == "base"}
    assert got.keys() == ref.keys()
    for layer, metrics in ref.items():
        assert got[layer] == pytest.approx(metrics, rel=1e-4, abs=1e-6), layer


def test_an_alert_and_its_stop_action_end_axolotls_training(tmp_path):
    section = {"schedule": "every", "every_n_steps": 1, "worker": "sync", "alerts": ALWAYS}
    section["actions"] = [{"kind": "stop"}]
    (res,) = run_axolotl(tmp_path, [section], mode="train")
    assert res["alerts"] and set(res["alerts"]) == {"always"}
    assert res["actions"] == ["stop"]
    # the baseline's alert is acted on at the first step's end: Axolotl's trainer stops there
    assert res["global_step"] == 1 < res["max_steps"] == 6


def grpo_config(tmp_path: Path) -> Path:
    """examples/axolotl/tiny.yaml as a GRPO stage (``rl: grpo``, TRL's trainer through Axolotl's RL
    builder) on 16 prompts, with a reward that prefers short completions; returns its path."""
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    cfg.pop("dataset_prepared_path")
    cfg |= {
        "rl": "grpo",
        "trl": {
            "beta": 0.0,
            "use_vllm": False,
            "num_generations": 2,
            "max_completion_length": 8,
            "reward_funcs": ["axolotl_run.length_reward"],
        },
        "datasets": [{"path": "runs/axolotl-tiny/prompts.jsonl", "ds_type": "json", "split": "train"}],
        "max_steps": 3,
    }
    (tmp_path / "runs" / "axolotl-tiny").mkdir(parents=True, exist_ok=True)
    prompts = [json.dumps({"prompt": f"Count to {i + 1}:"}) for i in range(16)]
    (tmp_path / "runs" / "axolotl-tiny" / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_an_entropy_bonus_action_raises_the_coefficient_of_axolotls_grpo_loss(tmp_path):
    section = {"schedule": "every", "every_n_steps": 1, "worker": "sync", "alerts": ALWAYS}
    section["actions"] = [{"kind": "entropy_bonus", "value": 0.5}]
    (res,) = run_axolotl(tmp_path, [section], mode="train", config=grpo_config(tmp_path))
    assert res["trainer"] == "AxolotlGRPOTrainer" and res["stage"] == "grpo"
    assert res["actions"] == ["entropy_bonus"] and res["errors"] == 0
    # the baseline's alert acts at step 1's end: TRL's own log shows its loss applying 0.5 from step 2
    assert res["logged_entropy_coef"] == [0.5, 0.5]
    assert res["entropy_coef"] == 0.0  # the configured coefficient is given back when training ends
