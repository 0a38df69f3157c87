"""Run by the Axolotl virtual environment's python for tests/integrations/test_axolotl.py (not a test).

python axolotl_run.py CONFIG.yaml SECTIONS.json MODE

Axolotl's own path, as ``axolotl train`` takes it in one process: ``axolotl.cli.config.load_cfg`` (plugin
registration, the config schema with the plugins' arguments merged in), ``load_datasets``, ``train``. The
``topomon:`` section of CONFIG.yaml is replaced by each section of SECTIONS.json (a list) in turn.
MODE ``load`` only loads each config (what a wrong section does); ``train`` trains with the first one.
Prints one line ``RESULT <json>`` per section.
"""

from __future__ import annotations

import json
import os
import sys


def _cfg_file(path: str, section: object, i: int) -> str:
    import yaml

    with open(path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    cfg["topomon"] = section
    out = f"cfg-{i}.yaml"
    with open(out, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    return out


def main() -> None:
    path, sections_json, mode = sys.argv[1:4]
    with open(sections_json, encoding="utf-8") as fh:
        sections = json.load(fh)
    from axolotl.cli.config import load_cfg

    for i, section in enumerate(sections if mode == "load" else sections[:1]):
        try:
            cfg = load_cfg(_cfg_file(path, section, i))
        except Exception as e:  # noqa: BLE001 - reported to the test
            print("RESULT " + json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
            continue
        if mode == "load":
            print("RESULT " + json.dumps({"topomon": cfg.get("topomon")}), flush=True)
            continue
        _train(cfg)


def length_reward(completions: list, **_: object) -> list[float]:
    """A GRPO reward for the tiny model (``trl: reward_funcs: [axolotl_run.length_reward]``): shorter is
    better, so that completions of one prompt differ in reward."""
    return [-float(len(c if isinstance(c, str) else str(c))) for c in completions]


def _train(cfg: object) -> None:
    import axolotl
    import transformers
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.common.datasets import load_datasets, load_preference_datasets
    from axolotl.integrations.base import PluginManager
    from axolotl.train import train

    if cfg.get("rl"):  # type: ignore[attr-defined]
        meta = load_preference_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    else:
        meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    _, _, trainer = train(cfg=cfg, dataset_meta=meta)
    plugin = PluginManager.get_instance().plugins["topomon.integrations.axolotl.TopoMonPlugin"]
    mon = plugin.monitors[-1]
    result = {
        "n_monitors": len(plugin.monitors),
        "trainer": type(trainer).__name__,
        "callbacks": [type(c).__name__ for c in trainer.callback_handler.callbacks],
        "captures": list(mon.captures),
        "errors": mon.errors,
        "alerts": [a.rule for a in mon.alerts],
        "actions": [a.kind for a in mon.actions],
        "global_step": trainer.state.global_step,
        "entropy_coef": getattr(trainer, "entropy_coef", None),
        # TRL's GRPO log: the coefficient its loss applied at each logged step (only while it is on)
        "logged_entropy_coef": [h["entropy_coef"] for h in trainer.state.log_history if "entropy_coef" in h],
        "max_steps": trainer.state.max_steps,
        "stage": mon.config.stage,
        "run_dir": os.path.abspath(mon.run.path) if mon.run else None,
        "versions": {"axolotl": axolotl.__version__, "transformers": transformers.__version__},
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
