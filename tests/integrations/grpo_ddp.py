"""A tiny GRPO run with an entropy_bonus action, launched by tests/integrations/test_grpo.py.

``torchrun --standalone --nproc_per_node 2 grpo_ddp.py OUT`` (gloo on CPU). Every rank writes
``OUT/marker_rank<r>.json``: per step, the entropy coefficient its own trainer's loss applied.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def main() -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from topomon import TopoMonitor
    from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

    out = sys.argv[1]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    always = [
        {"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}
    ]
    mon = TopoMonitor(
        alerts=always,
        actions=[{"kind": "entropy_bonus", "value": 0.5}],
        layers=[-1],
        topology=False,
        worker="sync",
        max_probes=16,
        schedule="every",
        every_n_steps=2,
    )

    def reward(completions: list[str], **_: Any) -> list[float]:
        return [len(c) / 10.0 for c in completions]

    class Coef(TrainerCallback):  # what this rank's loss applies in each step (set before the step)
        def __init__(self) -> None:
            self.steps: list[list[Any]] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.steps.append([state.global_step + 1, trainer.entropy_coef, trainer._entropy_bonus_enabled])

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marker = {"rank": rank, "world": world, "steps": self.steps, "errors": mon.errors}
            with open(os.path.join(out, f"marker_rank{rank}.json"), "w") as fh:
                json.dump(marker, fh)

    args = GRPOConfig(
        output_dir=out,
        max_steps=3,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=8,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=7,
        dataloader_num_workers=0,
        disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = GRPOTrainer(
        model=tiny_causal_lm("llama", seed=0),
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [t[:24] for t in sample_texts(16, seed=5)]}),
        processing_class=tiny_tokenizer(),
    )
    mon.attach(trainer)
    trainer.add_callback(Coef())
    trainer.train()


if __name__ == "__main__":
    main()
