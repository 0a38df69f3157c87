"""A tiny monitored SFT run reporting to one tracker (run as a subprocess with the tracker's env).

Usage: ``python -m tests.sinks.tracker_run TRACKER OUT [--trackers NAMES] [--fail-mlflow]``.

``TRACKER`` goes into ``report_to`` (``wandb``, ``mlflow``, ``trackio``, ``tensorboard``, ``none``);
nothing else of the trainer changes. The monitor captures every 2 steps of 4, draws figures at every
capture, and two alert rules fire at once (both at the same step). ``OUT/result.json`` gets the
monitor's health, its alerts and ``tensorboard_logdir``; W&B and trackio runs are finished and W&B's
service is torn down before exit, so the process leaves nothing running.
"""

from __future__ import annotations

import argparse
import json
import os

RULES = [
    {"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always_rankme"},
    {"type": "threshold", "metric": "rankme_pca", "layer": "final_norm", "above": 0.0, "name": "always_pca"},
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tracker")
    ap.add_argument("out")
    ap.add_argument("--trackers", default=None, help="comma-separated MonitorConfig.trackers")
    ap.add_argument("--fail-mlflow", action="store_true", help="every call of topomon's MLflow client raises")
    a = ap.parse_args()

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from topomon import TopoMonitor
    from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

    if a.fail_mlflow:  # topomon's MLflow client raises on every call; the trainer's own logging works
        from topomon.sinks import mlflow_sink

        class Unreachable:
            def __getattr__(self, name: str) -> object:
                def call(*args: object, **kwargs: object) -> None:
                    raise ConnectionError("tracking server unreachable (test)")

                return call

        init = mlflow_sink.MlflowSink.__init__

        def broken_init(self: mlflow_sink.MlflowSink, *args: object, **kwargs: object) -> None:
            init(self, *args, **kwargs)  # type: ignore[arg-type]
            self.client = Unreachable()  # type: ignore[assignment]

        mlflow_sink.MlflowSink.__init__ = broken_init  # type: ignore[method-assign]

    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", num_layers=4, hidden_size=32, seed=0)
    data = Dataset.from_dict({"text": sample_texts(32, seed=3)})
    args = SFTConfig(
        output_dir=a.out,
        max_steps=4,
        per_device_train_batch_size=4,
        use_cpu=True,
        bf16=False,
        report_to=[] if a.tracker == "none" else [a.tracker],
        run_name="topomon-test",
        save_strategy="no",
        logging_steps=1,
        max_length=48,
        seed=7,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    extra = {} if a.trackers is None else {"trackers": [t for t in a.trackers.split(",") if t]}
    mon = TopoMonitor(
        stage="sft",
        schedule="every",
        every_n_steps=2,
        figures_every=1,
        max_points=96,
        topology_points=48,
        worker="thread",
        alerts=RULES,
        **extra,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[mon])
    trainer.train()
    result = {
        "health": mon.health(),
        "alerts": [al.to_json() for al in mon.alerts],
        "tensorboard_logdir": mon.tensorboard_logdir,
        "summary": mon.summary(),
    }
    with open(os.path.join(a.out, "result.json"), "w") as fh:
        json.dump(result, fh)
    if a.tracker == "wandb":
        import wandb

        if wandb.run is not None:
            wandb.run.finish()
        wandb.teardown()


if __name__ == "__main__":
    main()
