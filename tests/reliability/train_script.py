"""A tiny SFT run with the monitor, for the process-death tests (run as a subprocess, killed with SIGKILL).

Usage: ``python -m tests.reliability.train_script OUT RUN_DIR [--resume CKPT] [--sleep S]
[--flag-step N]``.

With ``--flag-step N`` an alert fires at step N (a custom metric reads a flag file that a callback
writes at the end of step N) and switches the diversity regulariser on; the monitor computes in the
training process (``worker="sync"``), so the step an action takes effect is exact, and
``OUT/values.txt`` gets ``<step> <diversity weight>`` after every step.

After every step it appends ``<step> <records_written> <alerts_fired> <worker pids>`` to
``OUT/progress.txt``: the counters the monitor reports (``monitor.health()``) at that moment.
With ``--resume`` it writes ``OUT/resumed_state.json``: the monitor's state right after it set up
from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from typing import Any

MAX_STEPS = 8
SAVE_STEPS = 2
RULES = [
    {"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"},
    {"type": "drop", "metric": "rankme", "layer": "final_norm", "threshold": 0.15, "name": "drop"},
    {"type": "nonfinite", "name": "nonfinite"},
]


FLAG_ENV = "TOPOMON_TEST_FLAG"


def flag_metric(x: Any) -> float:
    """1.0 once the flag file exists (the worker, here the training process, reads it)."""
    return float(os.path.exists(os.environ[FLAG_ENV]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("run_dir")
    ap.add_argument("--resume", default=None)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--flag-step", type=int, default=None)
    ap.add_argument("--save-steps", type=int, default=SAVE_STEPS)
    a = ap.parse_args()

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from topomon import TopoMonitor
    from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

    flagged = {}
    if a.flag_step is not None:
        os.environ[FLAG_ENV] = os.path.join(a.out, "flag")
        flagged = {
            "worker": "sync",
            "custom_metrics": {"flag": "tests.reliability.train_script:flag_metric"},
            "alerts": [
                {"type": "threshold", "metric": "flag", "layer": "final_norm", "above": 0.5, "name": "flag"}
            ],
            "actions": [{"kind": "diversity", "value": 0.05, "rules": ["flag"]}],
        }
    config = dict(
        run_dir=a.run_dir,
        stage="sft",
        schedule="every",
        every_n_steps=1,
        worker="process",
        queue_size=16,  # nothing dropped while the worker process starts: "missing" is then exact
        layers=[-1],
        topology_points=32,
        pca_dim=None,
        figures_every=0,
        alerts=RULES,
    )
    monitor = TopoMonitor({**config, **flagged})

    class Flag(TrainerCallback):  # before the monitor: the capture of step N sees the flag
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == a.flag_step:
                open(os.environ[FLAG_ENV], "w").close()

    class Report(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if a.resume:
                with open(os.path.join(a.out, "resumed_state.json"), "w", encoding="utf-8") as fh:
                    json.dump(monitor.state_dict(), fh)

        def on_step_end(self, args, state, control, **kw):
            h = monitor.health()
            workers = " ".join(str(p.pid) for p in mp.active_children() if p.name == "topomon-worker")
            with open(os.path.join(a.out, "progress.txt"), "a", encoding="utf-8") as fh:
                fh.write(f"{state.global_step} {int(h['records_written'])} {int(h['alerts'])} {workers}\n")
            if a.flag_step is not None:
                weight = monitor.interventions.values().get("diversity", 0.0)
                with open(os.path.join(a.out, "values.txt"), "a", encoding="utf-8") as fh:
                    fh.write(f"{state.global_step} {weight}\n")
            time.sleep(a.sleep)

    args = SFTConfig(
        output_dir=a.out,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="steps",
        save_steps=a.save_steps,
        logging_steps=1,
        max_length=48,
        seed=7,
        learning_rate=1e-3,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=tiny_causal_lm("llama", seed=0),
        args=args,
        train_dataset=Dataset.from_dict({"text": sample_texts(64, seed=3)}),
        processing_class=tiny_tokenizer(),
        callbacks=[Flag(), monitor, Report()],
    )
    trainer.train(resume_from_checkpoint=a.resume)


if __name__ == "__main__":
    main()
