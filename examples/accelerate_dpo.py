"""DPO with LoRA on several processes (``accelerate launch`` or ``torchrun``), monitored by topomon.

Every process adds the same ``TopoMonitor``: each rank forwards its shard of the probe set, the main
process gathers the points, computes the metrics, writes the logs and decides on alerts, and the
decided actions reach every rank (docs/DISTRIBUTED.md). One process works too (``python ...``).

Launch (two CPU processes; on GPUs drop ``use_cpu`` and use your usual accelerate config)::

    accelerate launch --config_file accelerate_cpu2.yaml examples/accelerate_dpo.py --out runs/dpo
    torchrun --standalone --nproc_per_node 2 examples/accelerate_dpo.py --out runs/dpo

with ``accelerate_cpu2.yaml`` as in docs/DISTRIBUTED.md. By default a tiny random model (seconds on a
CPU); ``--smollm2`` trains the real SmolLM2-135M-Instruct (``topomon.models.load_smollm2``). The
preference pairs are real conversations (``topomon.demo.data``, needs ``chitchat-dataset``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

# fires at the first capture: shows an action decided on the main process and applied on every rank
ALWAYS = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", default="runs/accelerate_dpo", help="output_dir (the run directory is OUT/topomon)"
    )
    p.add_argument("--smollm2", action="store_true", help="the real SmolLM2-135M-Instruct, not a tiny model")
    p.add_argument("--steps", type=int, default=8, help="training steps")
    p.add_argument("--batch", type=int, default=2, help="preference pairs per device and step")
    p.add_argument("--pairs", type=int, default=64, help="preference pairs in the training set")
    p.add_argument("--mode", default="probe", choices=["probe", "passive"], help="topomon capture mode")
    p.add_argument(
        "--demo-action",
        action="store_true",
        help="an alert that always fires, switching on the diversity regulariser on every rank",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, monitored; returns what this rank saw (for tests)."""
    a = parse_args(argv)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from topomon import TopoMonitor
    from topomon.demo.data import chitchat_pairs, dpo_records

    if a.smollm2:
        from topomon.models import load_smollm2

        model, tok = load_smollm2()
        model.train()
    else:
        from topomon.testing import tiny_causal_lm, tiny_tokenizer

        model, tok = tiny_causal_lm("llama", hidden_size=64, num_layers=4, seed=a.seed), tiny_tokenizer()
    data = Dataset.from_list(dpo_records(chitchat_pairs(a.pairs, seed=a.seed), seed=a.seed))
    cpu = not torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = DPOConfig(
        output_dir=a.out,
        max_steps=a.steps,
        per_device_train_batch_size=a.batch,
        learning_rate=5e-4 if not a.smollm2 else 5e-5,
        max_length=128,
        use_cpu=cpu,
        bf16=False,
        gradient_checkpointing=False,
        ddp_backend="gloo" if cpu and world > 1 else None,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=a.seed,
        disable_tqdm=True,
    )
    monitor = TopoMonitor(
        stage="dpo",
        mode=a.mode,
        schedule="log",
        every_n_steps=4,
        max_probes=32,
        **(
            {
                "alerts": ALWAYS,
                "actions": [{"kind": "diversity", "value": 0.05}],
                "diversity": {"layers": [-1]},
                "worker": "sync",  # metrics inline: on a tiny model the alert lands within the run
            }
            if a.demo_action
            else {}
        ),
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    monitor.attach(trainer)  # on every process: each one takes part in the probe forwards
    trainer.train()
    div = monitor.interventions.target("diversity")
    seen = {
        "rank": int(os.environ.get("RANK", "0")),
        "world": world,
        "writes_logs": monitor.run is not None,
        "captures": list(monitor.captures),
        "actions": [(x.step, x.kind, x.params) for x in monitor.actions],
        "diversity_weight": None if div is None else div.weight,
        "monitor_errors": monitor.errors,
    }
    print(f"topomon [rank {seen['rank']} of {world}]: {seen}", flush=True)
    if monitor.run is not None:
        print(f"topomon: run directory {monitor.run.path}; `tensorboard --logdir {monitor.logging_dir}`")
    return seen


if __name__ == "__main__":
    main()
