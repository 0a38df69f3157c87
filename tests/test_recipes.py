"""Every recipe under recipes/ parses with TRL's own parser (the monitor presets: tests/test_presets.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from topomon.config import ConfigError
from topomon.trl_cli import monitor_spec, read_recipe

ROOT = Path(__file__).resolve().parents[1] / "recipes"
ALL_YAML = sorted(ROOT.rglob("*.yaml"))
TRAINING = ALL_YAML  # the monitor presets are package data: topomon/presets/


def command_of(path: Path) -> str:
    """The TRL command a training recipe is for (its name says dpo, else sft)."""
    return "dpo" if "dpo" in path.stem else "sft"


def test_the_recipes_asked_for_exist():
    names = {str(p.relative_to(ROOT)) for p in ALL_YAML}
    assert {
        "demo/sft.yaml",
        "demo/dpo.yaml",
        "demo/narrow.yaml",
        "gpu/qwen2.5-0.5b-sft-lora.yaml",
        "gpu/qwen2.5-0.5b-dpo-lora.yaml",
        "gpu/llama-3.2-1b-sft-lora.yaml",
        "gpu/llama-3.2-1b-dpo-lora.yaml",
    } <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_is_a_mapping(path):
    assert isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict)


def trl_parse(command: str, recipe: dict, tmp_path: Path, extra: list[str]):
    """TRL's own parser of the command on the recipe (without its topomon: section)."""
    import importlib

    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    parser = importlib.import_module(f"trl.scripts.{command}").make_parser()
    return parser.parse_args_and_config(
        ["--config", str(config), *extra], return_remaining_strings=True, separate_remaining_strings=True
    )


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: str(p.relative_to(ROOT)))
def test_training_recipes_parse_with_trl_and_their_section_validates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in recipes must not need to exist to parse
    recipe, section = read_recipe(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert section is not None and section == raw["topomon"]
    assert "topomon" not in recipe
    command = command_of(path)
    # GPU recipes ask for bf16, which TrainingArguments refuses on a machine without one unless use_cpu
    extra = ["--use_cpu", "true"] if recipe.get("bf16") else []
    script, training, model, data, config_left, cli_left = trl_parse(command, recipe, tmp_path, extra)
    assert config_left == [] and cli_left == [], "keys TRL does not know would go to accelerate launch"
    assert type(training).__name__ == {"sft": "SFTConfig", "dpo": "DPOConfig"}[command]
    assert training.output_dir == recipe["output_dir"]
    assert model.model_name_or_path == recipe["model_name_or_path"]
    assert bool(script.dataset_name) != bool(data.datasets), "one data source"
    spec = monitor_spec(section, preset=None, command=command)
    assert spec.config.stage == section.get("stage", command)
    assert spec.config.run_dir and not os.path.isabs(spec.config.run_dir)
    if any(a["kind"] == "replay" for a in section.get("actions", [])):
        assert spec.replay_datasets and spec.replay_datasets[0]["path"] == "json"


def test_demo_recipes_chain_through_one_run_directory():
    by_stage = {}
    for name in ("sft", "dpo", "narrow"):
        recipe, section = read_recipe(ROOT / "demo" / f"{name}.yaml")
        by_stage[section["stage"]] = (recipe, section)
    assert list(by_stage) == ["sft", "dpo", "narrow"]
    assert len({s["run_dir"] for _, s in by_stage.values()}) == 1
    # each later stage starts from the merged output of the one before (topomon merge-lora ... --out)
    assert by_stage["dpo"][0]["model_name_or_path"] == by_stage["sft"][0]["output_dir"] + "-merged"
    assert by_stage["narrow"][0]["model_name_or_path"] == by_stage["dpo"][0]["output_dir"] + "-merged"


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "llama-3.2-1b"])
def test_gpu_recipes_chain_sft_then_dpo(model):
    sft, s1 = read_recipe(ROOT / "gpu" / f"{model}-sft-lora.yaml")
    dpo, s2 = read_recipe(ROOT / "gpu" / f"{model}-dpo-lora.yaml")
    assert sft["use_peft"] and dpo["use_peft"]
    assert dpo["model_name_or_path"] == sft["output_dir"] + "-merged"
    assert s1["run_dir"] == s2["run_dir"] and (s1["stage"], s2["stage"]) == ("sft", "dpo")


def test_a_recipe_with_an_unknown_monitor_key_does_not_validate(tmp_path):
    raw = yaml.safe_load((ROOT / "demo" / "sft.yaml").read_text(encoding="utf-8"))
    raw["topomon"]["figure_every"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    _, section = read_recipe(path)
    with pytest.raises(ConfigError, match=r"'figure_every'.*did you mean 'figures_every'"):
        monitor_spec(section, preset=None, command="sft")
