"""LLaMA-Factory training with the monitor, through LLaMA-Factory's Python API.

LLaMA-Factory's command line (``llamafactory-cli train cfg.yaml``) has no option for a callback; its
Python API has one (``llamafactory.train.tuner.run_exp(args: dict | None, callbacks: list | None)``,
LLaMA-Factory 0.9.5), and that is all this script uses. The lines to copy into your own script::

    from llamafactory.train.tuner import run_exp
    from topomon import TopoMonitor

    run_exp(args, callbacks=[TopoMonitor(stage="sft", preset="light")])   # args: your YAML as a dict

This script reads a LLaMA-Factory training YAML that may hold a ``topomon:`` section (the keys of a TRL
recipe's section: MonitorConfig fields and ``preset``, read by :func:`topomon.trl_cli.monitor_spec`),
takes the section out (LLaMA-Factory rejects keys it does not know), checks it before anything is
loaded, and trains::

    python examples/llamafactory_sft.py my_sft.yaml          # your LLaMA-Factory YAML (+ `topomon:`)
    python examples/llamafactory_sft.py --tiny --out /tmp/lf # a tiny model and data set built locally
    tensorboard --logdir <output_dir>/topomon/tensorboard

``--tiny`` writes a tiny random Llama (``save_pretrained``), its tokenizer and a 32-example alpaca-style
data set registered in a ``dataset_info.json`` to ``--out``, then runs 8 LoRA SFT steps on the CPU
with a capture at every step (seconds; nothing is downloaded).

A ``replay`` action is refused here: LLaMA-Factory tokenises its own data and the monitor cannot mix
examples into it. Needs ``pip install llamafactory`` next to topomon (LLaMA-Factory 0.9.5 pins
transformers <= 5.6 and trl <= 0.24: use a separate virtual environment; ``make test`` builds one in
``.venv-llamafactory``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any

import yaml

from topomon.config import ConfigError, MonitorConfig
from topomon.trl_cli import monitor_spec

SECTION = "topomon"


def split_args(data: Mapping[str, Any]) -> tuple[dict[str, Any], MonitorConfig]:
    """LLaMA-Factory's arguments without the ``topomon:`` section, and the monitor's validated config.

    ``stage`` defaults to LLaMA-Factory's own ``stage`` (``sft``, ``dpo``, ``pt``, ...).

    Raises:
        ConfigError: a wrong section (unknown key, bad value, unknown preset) or a replay action.
    """
    args = dict(data)
    section = args.pop(SECTION, None)
    if section is not None and not isinstance(section, Mapping):
        raise ConfigError(f"the `{SECTION}:` section must be a mapping of monitor settings, got {section!r}")
    if section and "replay_dataset" in section:
        raise ConfigError("`replay_dataset` is not available with LLaMA-Factory (it tokenises its own data)")
    spec = monitor_spec(section, preset=None, command=str(args.get("stage", "sft")))
    if any(isinstance(a, Mapping) and a.get("kind") == "replay" for a in spec.config.actions):
        raise ConfigError("a 'replay' action is not available with LLaMA-Factory (it tokenises its own data)")
    return args, spec.config


def write_tiny(out: str, steps: int = 8) -> dict[str, Any]:
    """A tiny local model, tokenizer and data set in ``out``; returns LLaMA-Factory's arguments for them.

    The ``topomon:`` section asks for a capture at every step, so a run of ``steps`` steps records
    ``steps + 1`` captures (the baseline at step 0 included).
    """
    from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

    model_dir = os.path.join(out, "tiny-llama")
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    tiny_causal_lm("llama", num_layers=4, hidden_size=32, seed=0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    texts = sample_texts(64, seed=7)
    rows = [
        {"instruction": texts[2 * i][:60], "input": "", "output": texts[2 * i + 1][:60]} for i in range(32)
    ]
    with open(os.path.join(data_dir, "tiny_sft.json"), "w", encoding="utf-8") as fh:
        json.dump(rows, fh)
    with open(os.path.join(data_dir, "dataset_info.json"), "w", encoding="utf-8") as fh:
        json.dump({"tiny_sft": {"file_name": "tiny_sft.json"}}, fh)
    return {
        "model_name_or_path": model_dir,
        "trust_remote_code": False,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 4,
        "dataset": "tiny_sft",
        "dataset_dir": data_dir,
        "template": "empty",
        "cutoff_len": 64,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "output_dir": os.path.join(out, "output"),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "max_steps": steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        SECTION: {"stage": "sft", "schedule": "every", "every_n_steps": 1, "worker": "thread"},
    }


def main(argv: list[str] | None = None) -> Any:
    """Run LLaMA-Factory's ``run_exp`` with the monitor; returns the monitor."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="a LLaMA-Factory training YAML (may hold a `topomon:` section)")
    p.add_argument("--tiny", action="store_true", help="a tiny local model and data set instead")
    p.add_argument("--out", default="runs/llamafactory", help="where --tiny writes its files")
    p.add_argument("--steps", type=int, default=8, help="training steps with --tiny")
    a = p.parse_args(argv)
    if a.tiny == bool(a.config):
        p.error("give a LLaMA-Factory YAML file or --tiny")
    if a.tiny:
        data: Mapping[str, Any] = write_tiny(a.out, a.steps)
    else:
        with open(a.config, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    args, config = split_args(data)  # a wrong `topomon:` section stops here, before any loading

    from llamafactory.train.tuner import run_exp

    from topomon import TopoMonitor

    monitor = TopoMonitor(config)
    run_exp(args, callbacks=[monitor])
    print(f"run directory: {monitor.run.path if monitor.run else '-'}")
    print(f"captures: {monitor.captures}, alerts: {len(monitor.alerts)}, errors: {monitor.errors}")
    return monitor


if __name__ == "__main__":
    main()
