"""A real run directory of two tiny SFTTrainer stages: ``sft``, then ``narrow``, where an alert acts."""

from __future__ import annotations

from pathlib import Path

#: A rule that fires at the first capture of the stage (any finite RankMe is above 0).
ALWAYS = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]


def make_tiny_run(out: Path, steps: int = 6) -> Path:
    """Train a tiny llama through two monitored SFT stages into ``out``; returns the run directory.

    The second stage's alert (at its baseline, global step ``steps``) switches on the diversity
    regulariser and asks for a checkpoint at the next step (``out/checkpoint-1``, the trainer's own step).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from topomon import TopoMonitor
    from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    data = Dataset.from_dict({"text": sample_texts(64, seed=3)})
    model = tiny_causal_lm("llama", num_layers=4, hidden_size=32, seed=0)
    common = dict(schedule="every", every_n_steps=2, max_points=128, topology_points=64, worker="sync")
    acting = dict(alerts=ALWAYS, actions=[{"kind": "checkpoint"}, {"kind": "diversity", "value": 0.1}])
    for stage, extra in (("sft", {}), ("narrow", acting)):
        args = SFTConfig(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, use_cpu=True, bf16=False,
            report_to=[], save_strategy="no", logging_steps=1, max_length=48, seed=7,
            dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        monitor = TopoMonitor(stage=stage, **common, **extra)
        SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[monitor]
        ).train()
    return out / "topomon"
