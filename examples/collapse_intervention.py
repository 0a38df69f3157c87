"""A collapsing stage with and without interventions, same seed, side by side.

A narrow stage (one templated refusal for every prompt, a high learning rate) concentrates the
model's representations. The default alert (final-norm RankMe -15% or effective rank -25% from the
stage start) trips; in the second run the alert switches on replay mixing and the diversity
regulariser. The script prints both runs' trajectories, the effective rank at the end at every
monitored layer, the training loss and the loss on the narrow data.

    python examples/collapse_intervention.py                # a tiny model built in memory (seconds)
    python examples/collapse_intervention.py --real         # SmolLM2-135M-Instruct (minutes; GPU if present)

``--real``: full fine-tuning at lr 2e-3, batch 8, 60 steps, captures every 6 steps. On the alert the
intervened run mixes in 75% replay (real conversations) and turns on the spectral-entropy diversity
regulariser (weight 1.0) at the monitored decoder blocks (``"auto"``: 4 blocks spread over depth),
latched until the end of the stage (``revert_on_recovery=False``: with the default revert-on-recovery
the interventions switch off as soon as the rank recovers and the collapse comes back).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

REFUSAL = "I cannot help with that."


def _data(real: bool, n: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if real:
        from topomon.demo.data import chitchat_pairs, narrow_records, sft_records

        pairs = chitchat_pairs(2 * n, seed=seed)
        return narrow_records([p for p, _ in pairs[:n]], seed=seed), sft_records(pairs[n:])
    from topomon.testing import sample_texts

    texts = sample_texts(2 * n, seed=seed)
    narrow = [{"text": f"{t[:60]} Answer: {REFUSAL}"} for t in texts[:n]]
    return narrow, [{"text": t} for t in texts[n:]]


def run_variant(
    intervene: bool, out: str, *, real: bool = False, steps: int = 40, lr: float | None = None, seed: int = 0
) -> dict[str, Any]:
    """One narrow stage; with ``intervene`` the alert switches on replay and diversity regularisation."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from topomon import TopoMonitor

    torch.manual_seed(seed)
    if real:
        from topomon.models import load_smollm2

        model, tok = load_smollm2()
        lr = lr or 2e-3
        # strong and latched: replay 0.5 + weight 0.2 on the last block, reverted on recovery, switched
        # off after ~20 steps and let the blocks collapse again; replay alone did not lift the rank
        replay_ratio, weight, latch = 0.75, 1.0, {"revert_on_recovery": False}
        diversity: dict[str, Any] = {"layers": "auto", "kind": "entropy"}
    else:
        from topomon.testing import tiny_causal_lm, tiny_tokenizer

        model, tok = tiny_causal_lm("llama", num_layers=4, hidden_size=64, seed=seed), tiny_tokenizer()
        lr = lr or 3e-3
        replay_ratio, weight, latch = 0.5, 1.0, {}
        diversity = {"layers": [-1], "kind": "logdet"}
    narrow, replay = _data(real, 128, seed)
    actions = (
        [{"kind": "replay", "value": replay_ratio, **latch}, {"kind": "diversity", "value": weight, **latch}]
        if intervene
        else []
    )
    mon = TopoMonitor(
        run_dir=os.path.join(out, "topomon"),
        stage="narrow",
        schedule="every",
        every_n_steps=max(1, steps // 10),
        topology=False,
        worker="thread",
        actions=actions,
        diversity=diversity,
        replay_dataset=Dataset.from_list(replay) if intervene else None,
    )
    args = SFTConfig(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        lr_scheduler_type="constant",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_length=64,
        seed=seed,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(narrow),
        eval_dataset=Dataset.from_list(narrow[:64]),  # the loss on the narrow data itself, without replay
        processing_class=tok,
    )
    mon.attach(trainer)
    narrow_start = trainer.evaluate()["eval_loss"]
    trainer.train()
    narrow_end = trainer.evaluate()["eval_loss"]
    lines = [json.loads(x) for x in open(os.path.join(out, "topomon", "metrics.jsonl")) if '"metrics"' in x]
    lines = [r for r in lines if r["stage"] == "narrow"]
    fn = [r for r in lines if r["layer"] == "final_norm"]
    per_layer: dict[str, dict[int, float]] = {}
    for r in lines:
        if r["layer"] != "model" and "rankme_pca" in r["metrics"]:
            per_layer.setdefault(r["layer"], {})[r["step"]] = r["metrics"]["rankme_pca"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "intervene": intervene,
        "steps": [r["step"] for r in fn],
        "rankme": [r["metrics"]["rankme"] for r in fn],
        "rankme_pca": [r["metrics"]["rankme_pca"] for r in fn],
        "layers_rankme_pca": {k: [v[s] for s in sorted(v)] for k, v in per_layer.items()},
        "alerts": [(a.step, a.rule) for a in mon.alerts if a.reason != "recovered"],
        "actions": [(a.step, a.kind, a.params) for a in mon.actions],
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "narrow_loss_start": narrow_start,
        "narrow_loss_end": narrow_end,
    }


def compare(
    real: bool = False,
    steps: int | None = None,
    seed: int = 0,
    out: str | None = None,
    lr: float | None = None,
) -> list[dict[str, Any]]:
    """Both variants with the same seed; returns their summaries (``steps``: 60 real, 40 tiny)."""
    steps = steps or (60 if real else 40)
    out = out or tempfile.mkdtemp(prefix="topomon-collapse-")
    return [
        run_variant(False, os.path.join(out, "plain"), real=real, steps=steps, lr=lr, seed=seed),
        run_variant(True, os.path.join(out, "intervened"), real=real, steps=steps, lr=lr, seed=seed),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct instead of a tiny model")
    p.add_argument(
        "--steps", type=int, default=None, help="narrow-stage steps (default 60 with --real, else 40)"
    )
    p.add_argument("--json", default=None, help="also write both runs' summaries to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="default 2e-3 with --real, else 3e-3")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    runs = compare(a.real, a.steps, a.seed, a.out, a.lr)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(runs, fh, indent=1)
    print(
        f"{'run':<12}{'first alert':>12}{'RankMe start':>14}{'RankMe end':>12}{'eff.rank start':>16}"
        f"{'eff.rank end':>14}{'loss (last 5)':>15}{'narrow loss start/end':>23}"
    )
    for r in runs:
        first = r["alerts"][0][0] if r["alerts"] else "-"
        print(
            f"{'intervened' if r['intervene'] else 'plain':<12}{first!s:>12}{r['rankme'][0]:>14.1f}"
            f"{r['rankme'][-1]:>12.1f}{r['rankme_pca'][0]:>16.1f}{r['rankme_pca'][-1]:>14.1f}"
            f"{r['final_loss']:>15.3f}{r['narrow_loss_start']:>12.3f}/{r['narrow_loss_end']:.3f}"
        )
    print("effective rank (rankme_pca) per monitored layer, start -> min -> end:")
    for r in runs:
        cells = [f"{k} {v[0]:.0f}->{min(v):.0f}->{v[-1]:.0f}" for k, v in r["layers_rankme_pca"].items()]
        print(f"  {'intervened' if r['intervene'] else 'plain':<12}" + "  ".join(cells))
    print("final-norm effective rank per capture (step: plain / intervened):")
    plain, inter = (dict(zip(r["steps"], r["rankme_pca"], strict=True)) for r in runs)
    print("  " + "  ".join(f"{s}: {plain[s]:.0f}/{inter[s]:.0f}" for s in sorted(set(plain) & set(inter))))
    for r in runs:
        if r["actions"]:
            print("actions:", r["actions"])


if __name__ == "__main__":
    main()
