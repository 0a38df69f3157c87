"""``topomon sft|dpo --config recipe.yaml``: TRL's own scripts, monitored (issue 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from trl.cli.commands.training import _subtract_subsequence as trl_version

from topomon.config import ConfigError, MonitorConfig, load_preset
from topomon.trl_cli import (
    _subtract_subsequence,
    help_text,
    monitor_spec,
    monitored_trainer,
    read_recipe,
    split_topomon_option,
)

# ----------------------------------------------------------------------------------- pure parts


def test_split_topomon_option_forms():
    assert split_topomon_option(["--config", "r.yaml", "--topomon", "light", "--lr", "1"]) == (
        ["--config", "r.yaml", "--lr", "1"],
        "light",
    )
    assert split_topomon_option(["--topomon=m.yaml", "--x"]) == (["--x"], "m.yaml")
    assert split_topomon_option(["--config", "r.yaml"]) == (["--config", "r.yaml"], None)
    for bad in (["--topomon"], ["--topomon", "--config", "r.yaml"], ["--topomon="]):
        with pytest.raises(ConfigError, match="--topomon needs a value"):
            split_topomon_option(bad)
    with pytest.raises(ConfigError, match="twice"):
        split_topomon_option(["--topomon", "light", "--topomon=full"])


@settings(deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", "--c", "1"]), max_size=8),
    st.lists(st.booleans(), max_size=8),
)
def test_subtract_subsequence_matches_trl(items, keep):
    """The copy in topomon equals TRL's private original (the reference)."""
    sub = [x for x, k in zip(items, keep, strict=False) if k]  # an ordered subsequence
    assert _subtract_subsequence(items, sub) == trl_version(items, sub)
    assert len(_subtract_subsequence(items, sub)) == len(items) - len(sub)


def test_read_recipe_splits_the_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\nmax_steps: 3\ntopomon:\n  stage: x\n", encoding="utf-8")
    assert read_recipe(path) == ({"model_name_or_path": "m", "max_steps": 3}, {"stage": "x"})
    path.write_text("max_steps: 3\ntopomon:\n", encoding="utf-8")
    assert read_recipe(path) == ({"max_steps": 3}, {})
    path.write_text("max_steps: 3\n", encoding="utf-8")
    assert read_recipe(path) == ({"max_steps": 3}, None)
    path.write_text("topomon: [1, 2]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_recipe(path)
    path.write_text("- a\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="YAML mapping"):
        read_recipe(path)
    with pytest.raises(ConfigError, match="not found"):
        read_recipe(tmp_path / "missing.yaml")


def test_monitor_spec_merge_order(tmp_path):
    # defaults: stage = the command
    assert monitor_spec(None, preset=None, command="dpo").config == MonitorConfig(stage="dpo")
    # preset first, then the section's fields
    spec = monitor_spec({"every_n_steps": 7, "stage": "a"}, preset="light", command="sft")
    assert spec.config == MonitorConfig.from_dict({**load_preset("light"), "every_n_steps": 7, "stage": "a"})
    # the command-line preset wins over the section's `preset:`
    spec = monitor_spec({"preset": "full"}, preset="light", command="sft")
    assert spec.config == MonitorConfig.from_dict({**load_preset("light"), "stage": "sft"})
    assert monitor_spec({"preset": "full"}, preset=None, command="sft").config.topology_layers == "all"
    # a preset file (plain or under topomon:) keeps the command as the stage unless it names one
    f = tmp_path / "m.yaml"
    f.write_text("topomon:\n  every_n_steps: 3\n", encoding="utf-8")
    assert monitor_spec(None, preset=str(f), command="kto").config == MonitorConfig(
        stage="kto", every_n_steps=3
    )


def test_monitor_spec_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"'every_n_step'.*did you mean 'every_n_steps'"):
        monitor_spec({"every_n_step": 3}, preset=None, command="sft")
    with pytest.raises(ConfigError, match="unknown monitor preset 'heavy'"):
        monitor_spec(None, preset="heavy", command="sft")
    with pytest.raises(ConfigError, match="`worker` must be one of"):
        monitor_spec({"worker": "gpu"}, preset=None, command="sft")
    with pytest.raises(ConfigError, match="'replay' action needs `replay_dataset:`"):
        monitor_spec({"actions": [{"kind": "replay", "value": 0.5}]}, preset=None, command="sft")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['file'\]"):
        monitor_spec({"replay_dataset": {"path": "json", "file": "x"}}, preset=None, command="sft")
    with pytest.raises(ConfigError, match="need `path`"):
        monitor_spec({"replay_dataset": [{"data_files": "x.jsonl"}]}, preset=None, command="sft")
    spec = monitor_spec(
        {
            "actions": [{"kind": "replay", "value": 0.5}],
            "replay_dataset": {"path": "json", "data_files": "r"},
        },
        preset=None,
        command="sft",
    )
    assert spec.replay_datasets == ({"path": "json", "data_files": "r"},)


def test_monitored_trainer_swaps_and_restores_the_class():
    import trl

    original = trl.DPOTrainer
    with pytest.raises(RuntimeError):
        with monitored_trainer("dpo", lambda t: None) as sub:
            from trl import DPOTrainer  # what trl/scripts/dpo.py does inside main()

            assert DPOTrainer is sub and issubclass(sub, original)
            raise RuntimeError("the script failed")
    assert trl.DPOTrainer is original
    with pytest.raises(ConfigError, match="unknown TRL command 'ppo'"):
        with monitored_trainer("ppo", lambda t: None):
            pass


def test_monitored_trainer_attaches_once_to_the_built_trainer(tmp_path):
    import trl
    from datasets import Dataset
    from trl import SFTConfig

    from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

    seen = []
    with monitored_trainer("sft", seen.append):
        from trl import SFTTrainer

        args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_length=32)
        data = Dataset.from_dict({"text": sample_texts(4)})
        trainer = SFTTrainer(
            model=tiny_causal_lm(), args=args, train_dataset=data, processing_class=tiny_tokenizer()
        )
    assert seen == [trainer]
    assert trl.SFTTrainer is not type(trainer) and isinstance(trainer, trl.SFTTrainer)  # restored


def test_help_shows_topomon_and_trl_options():
    text = help_text("sft")
    assert "--topomon PRESET|FILE" in text and "full, light, rl, standard" in text
    assert "--gradient_accumulation_steps" in text and "--model_name_or_path" in text  # TRL's own help


# ------------------------------------------------------------------------ end to end (subprocess)


def topomon_cmd(args, cwd, timeout=300):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(Path(cwd) / "hf-datasets"),
    }
    return subprocess.run(
        [sys.executable, "-m", "topomon.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model and tokenizer saved as a folder, and tiny SFT / DPO JSONL files."""
    from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

    root = tmp_path_factory.mktemp("trl_cli")
    tiny_causal_lm("llama", num_layers=4, hidden_size=32, seed=0).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    texts = sample_texts(32, seed=1)
    with open(root / "sft.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    with open(root / "dpo.jsonl", "w", encoding="utf-8") as fh:
        for i in range(16):
            row = {"prompt": texts[i][:30], "chosen": texts[i][30:90], "rejected": texts[i + 16][30:90]}
            fh.write(json.dumps(row) + "\n")
    return root


def recipe(assets, data, out, **extra):
    base = {
        "model_name_or_path": str(assets / "model"),
        "datasets": [{"path": "json", "data_files": str(assets / data)}],
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "use_cpu": True,
        "bf16": False,
        "report_to": [],
        "max_length": 64,
        "seed": 0,
    }
    return {**base, **extra}


def write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def records(run_dir):
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def sft_run(assets, tmp_path_factory):
    """`topomon sft --config recipe.yaml --gradient_accumulation_steps 2` (the recipe says 1)."""
    work = tmp_path_factory.mktemp("sft_run")
    out = work / "out"
    section = {"worker": "sync", "schedule": "every", "every_n_steps": 1, "layers": [-1], "topology": False}
    cfg = recipe(
        assets,
        "sft.jsonl",
        out,
        max_steps=3,
        gradient_accumulation_steps=1,
        save_strategy="steps",
        save_steps=3,
        topomon=section,
    )
    proc = topomon_cmd(
        ["sft", "--config", str(write(work / "sft.yaml", cfg)), "--gradient_accumulation_steps", "2"], work
    )
    return proc, out


@pytest.mark.slow
def test_sft_end_to_end_writes_the_monitor_output(sft_run):
    proc, out = sft_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [r for r in records(out / "topomon") if r["kind"] == "metrics"]
    by_stage = {}
    for r in recs:
        by_stage.setdefault(r["stage"], set()).add((r["step"], r["layer"]))
    layers = {"layer_3", "final_norm", "model"}  # layers [-1] of 4 blocks, the final norm, model-level
    assert by_stage["base"] == {(0, x) for x in layers}
    assert by_stage["sft"] == {(s, x) for s in range(4) for x in layers}  # every step of max_steps 3
    assert all(r["metrics"]["rankme"] > 0 for r in recs if r["layer"] == "final_norm")
    assert not any("h0_total_persistence" in r["metrics"] for r in recs)  # topology: false honoured
    run = json.loads((out / "topomon" / "run.json").read_text())
    assert [(s["name"], s["last_step"]) for s in run["stages"]] == [("sft", 3)]
    assert os.listdir(out / "topomon" / "tensorboard" / "sft")
    assert (out / "checkpoint-3" / "topomon_state.json").is_file()  # the monitor's state in TRL's checkpoint
    assert (out / "model.safetensors").is_file()  # TRL's script saved the model
    # the one-screen summary at the end: captures, alerts, cost, where to look
    assert "topomon: stage 'sft': 4 captures (steps 0-3), 0 dropped, 0 lost, 0 errors" in proc.stdout
    assert f"topomon: metrics: {out / 'topomon'}/metrics.jsonl" in proc.stdout
    assert f"topomon: report: topomon report {out / 'topomon'}" in proc.stdout
    assert "% of the training time" in proc.stdout


@pytest.mark.slow
def test_a_trl_option_given_on_the_command_line_is_honoured(sft_run):
    import torch

    proc, out = sft_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.gradient_accumulation_steps == 2  # the command line wins over the recipe's 1
    assert args.per_device_train_batch_size == 4  # and the recipe's own values hold
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    # 3 optimizer steps x 4 examples x 2 accumulated micro-batches over 32 examples = 0.75 epoch
    assert state["global_step"] == 3
    assert state["epoch"] == pytest.approx(3 * 4 * 2 / 32)


@pytest.mark.slow
def test_dpo_end_to_end_with_a_preset_and_lora(assets, tmp_path):
    out = tmp_path / "out"
    cfg = recipe(
        assets,
        "dpo.jsonl",
        out,
        max_steps=2,
        save_strategy="no",
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        topomon={"worker": "thread", "run_dir": str(tmp_path / "run"), "overhead_budget": None},
    )
    proc = topomon_cmd(
        ["dpo", "--config", str(write(tmp_path / "dpo.yaml", cfg)), "--topomon", "light"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [r for r in records(tmp_path / "run") if r["kind"] == "metrics"]
    dpo = [r for r in recs if r["stage"] == "dpo"]
    # the light preset: blocks -4 and -1 of 4 and the final norm, spectral only, log schedule (0, 1, 2)
    assert {r["layer"] for r in dpo} == {"layer_0", "layer_3", "final_norm"}
    assert {r["step"] for r in dpo} == {0, 1, 2}
    assert all("rankme" in r["metrics"] and "h0_total_persistence" not in r["metrics"] for r in dpo)
    assert (out / "adapter_config.json").is_file()  # TRL's PEFT options went through
    assert not (out / "topomon").exists()  # the section's run_dir was used


@pytest.mark.slow
def test_unknown_key_in_the_topomon_section_fails_before_training(assets, tmp_path):
    out = tmp_path / "out"
    cfg = recipe(assets, "sft.jsonl", out, max_steps=1, topomon={"stage": "sft", "every_n_step": 5})
    proc = topomon_cmd(["sft", "--config", str(write(tmp_path / "bad.yaml", cfg))], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "every_n_step" in proc.stderr and "did you mean 'every_n_steps'" in proc.stderr
    assert "topomon:` section of" in proc.stderr
    assert "accelerate" not in proc.stderr  # nothing was launched
    assert not out.exists()


def test_without_trl_the_command_line_says_what_to_install(monkeypatch, capsys):
    # TRL is an optional dependency (topomon[trl]): only the TRL command line needs it
    import sys

    from topomon.trl_cli import launch

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ModuleNotFoundError
    assert launch("sft", ["--config", "x.yaml"]) == 2
    assert "pip install 'topomon[trl]'" in capsys.readouterr().err


REWARDS = '''
def length_reward(completions, **kwargs):
    """Longer completions score higher."""
    return [len(c) / 10.0 for c in completions]
'''


@pytest.mark.slow
def test_grpo_end_to_end_with_the_rl_preset_and_a_reward_function_from_the_recipe(assets, tmp_path):
    """`topomon grpo`: TRL's grpo script, its reward function a dotted path into the working folder."""
    from topomon.testing import sample_texts

    (tmp_path / "rewards.py").write_text(REWARDS, encoding="utf-8")
    with open(tmp_path / "prompts.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"prompt": t[:24]}) + "\n" for t in sample_texts(16, seed=5))
    out = tmp_path / "out"
    cfg = recipe(assets, "sft.jsonl", out, max_steps=2, save_strategy="no")
    del cfg["max_length"]  # not a GRPOConfig field
    cfg.update(
        datasets=[{"path": "json", "data_files": str(tmp_path / "prompts.jsonl")}],
        reward_funcs=["rewards.length_reward"],
        num_generations=2,
        max_completion_length=8,
        steps_per_generation=2,
        topomon={
            "preset": "rl",
            "worker": "sync",
            "layers": [-1],
            "topology": False,
            # built only on a GRPO trainer the command attached the monitor to (else an error before step 1)
            "actions": [{"kind": "entropy_bonus", "value": 0.01, "rules": ["logit_entropy_drop"]}],
        },
    )
    proc = topomon_cmd(["grpo", "--config", str(write(tmp_path / "grpo.yaml", cfg))], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [r for r in records(out / "topomon") if r["kind"] == "metrics" and r["stage"] == "grpo"]
    assert {(r["step"], r["layer"]) for r in recs} == {
        (s, x)
        for s in (0, 1, 2)
        for x in ("layer_3", "final_norm", "model")  # rl: log-spaced start
    }
    assert all(r["metrics"]["logit_entropy"] > 0 for r in recs if r["layer"] == "model")
    run = json.loads((out / "topomon" / "run.json").read_text())
    (stage,) = run["stages"]
    assert (stage["name"], stage["last_step"]) == ("grpo", 2)
    assert (out / "model.safetensors").is_file()  # TRL's script trained and saved
    assert "topomon: stage 'grpo': 3 captures (steps 0-2)" in proc.stdout
