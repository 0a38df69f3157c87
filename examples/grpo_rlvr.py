"""RL with a verifiable reward (GRPO) on SmolLM2-135M-Instruct, watched by topomon's ``rl`` preset.

    python examples/grpo_rlvr.py                  # SmolLM2 + LoRA, small sums, minutes on a CPU
    python examples/grpo_rlvr.py --tiny           # a tiny model built in memory: seconds (the test)

The task: ``What is 17 + 5? Answer with the number only.`` (a, b in 1..20); the reward is 1 when the
last integer of the completion is the sum (SmolLM2 often restates the operands first: "17 + 5 = 22").
Measured on the base model before any run (16 sums): 7 greedy answers right, 13 of 64 samples at
temperature 1; with "Answer with the number." and the first integer, 0 of 12 greedy.
TRL's ``GRPOTrainer`` samples 4 completions a prompt; the monitor (``preset:
rl``) captures the fixed probe set at its schedule, with the next-token entropy of the probes
(``logit_entropy``) and the rollout entropy TRL logs both watched both ways, and an ``entropy_bonus``
action raises TRL's ``entropy_coef`` while a collapse alert holds. At the end it prints, step by step,
TRL's reward and rollout entropy beside the probe entropy, then the alerts and the actions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from typing import Any


def make_prompts(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` small sums to answer, each with its answer (the reward's second column)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"prompt": f"What is {a} + {b}? Answer with the number only.", "answer": a + b})
    return rows


def sum_reward(completions: list[Any], answer: list[int], **_: Any) -> list[float]:
    """1.0 when the last integer of the completion is the answer, else 0.0."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        text = c[-1]["content"] if isinstance(c, list) else str(c)
        nums = re.findall(r"-?\d+", text)
        out.append(1.0 if nums and int(nums[-1]) == a else 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random model built in memory (seconds)")
    p.add_argument("--out", default="runs/grpo_rlvr")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 6 tiny, 40 SmolLM2)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--every", type=int, default=None, help="capture every N steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from topomon import TopoMonitor

    torch.manual_seed(a.seed)
    if a.tiny:
        from topomon.testing import tiny_causal_lm, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_causal_lm(vocab_size=len(tok))
        rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in make_prompts(64, a.seed)]
    else:
        from topomon.models import load_smollm2

        model, tok = load_smollm2()
        rows = [
            {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
            for r in make_prompts(256, a.seed)
        ]
    steps = a.steps or (6 if a.tiny else 40)
    args = GRPOConfig(
        output_dir=os.path.join(a.out, "trainer"),
        max_steps=steps,
        per_device_train_batch_size=8,  # 2 prompts x 4 completions
        num_generations=4,
        max_completion_length=8 if a.tiny else 12,
        learning_rate=a.lr,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=a.seed,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=sum_reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora,
    )
    schedule = (
        {} if a.every is None else {"schedule": "every", "every_n_steps": a.every, "overhead_budget": None}
    )
    monitor = TopoMonitor(
        preset="rl",
        stage="grpo",
        run_dir=os.path.join(a.out, "topomon"),
        actions=[
            {"kind": "entropy_bonus", "value": 0.01, "rules": ["logit_entropy_drop", "rollout_entropy_drop"]}
        ],
        **schedule,
    )
    monitor.attach(trainer)  # entropy_bonus sets the trainer's own coefficient: attach, not callbacks=
    trainer.train()
    print(report(trainer.state.log_history, os.path.join(a.out, "topomon")))
    return 0


def report(log_history: list[dict[str, Any]], run_dir: str) -> str:
    """TRL's reward and rollout entropy per step beside the probe entropy, then alerts and actions."""
    from topomon.report.alert_log import format_table
    from topomon.report.load import load_alert_log

    probe: dict[int, float] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("kind") == "metrics" and r.get("layer") == "model" and r.get("stage") == "grpo":
                v = r["metrics"].get("logit_entropy")
                if v is not None:
                    probe[int(r["step"])] = float(v)
    trl = {int(r["step"]): r for r in log_history if "reward" in r}
    out = ["step  TRL reward  TRL entropy  entropy_coef  probe entropy (topomon)"]
    for step in sorted(set(trl) | set(probe)):
        r = trl.get(step, {})
        cells = [
            f"{step:4d}",
            f"{r['reward']:10.3f}" if "reward" in r else " " * 10,
            f"{r['entropy']:11.3f}" if "entropy" in r else " " * 11,
            f"{r['entropy_coef']:12.3f}" if "entropy_coef" in r else " " * 12,
            f"{probe[step]:9.3f}" if step in probe else "",
        ]
        out.append("  ".join(cells))
    out.append(format_table(load_alert_log(run_dir)))  # what `topomon alerts <run_dir>` prints
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
