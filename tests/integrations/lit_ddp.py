"""A tiny Lightning fit with TopoMonitorCallback, launched by tests/integrations/test_lightning.py.

One process: ``python lit_ddp.py OUT --batch 8``; two: ``torchrun --standalone --nproc_per_node 2
lit_ddp.py OUT --batch 4`` (Lightning's DDP strategy, gloo on CPU; the same global batch: every
sequence has the same length, so the mean of the two ranks' losses is the one-process loss). Every
rank writes ``OUT/marker_rank<r>.json``: what it saw of the monitor.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
from typing import Any

# a threshold rule that fires at the first capture (any finite RankMe is above 0)
ALWAYS = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=4, help="per-device batch size (x processes = 8)")
    p.add_argument("--actions", default="[]", help="JSON list of action specs (fired by the ALWAYS rule)")
    p.add_argument("--max-steps", type=int, default=6)
    a = p.parse_args(argv)
    faulthandler.enable(all_threads=True)

    import lightning as L
    import torch

    from topomon.integrations.lightning import TopoMonitorCallback
    from topomon.testing import tiny_causal_lm, tiny_tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok = tiny_tokenizer()

    class LitLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_causal_lm(vocab_size=len(tok), seed=0)
            self.tokenizer = tok

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.model.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    data = torch.randint(4, len(tok), (8 * a.max_steps, 16), generator=g)
    # global batch k is data[8k : 8k + 8]; each rank takes its own slice of it (no sampler shuffles)
    rank = int(os.environ.get("RANK", "0"))
    rows = [data[8 * k + rank * a.batch + j] for k in range(a.max_steps) for j in range(a.batch)]
    loader = torch.utils.data.DataLoader(rows, batch_size=a.batch, shuffle=False)
    cb = TopoMonitorCallback(
        stage="train",
        run_dir=os.path.join(a.out, "topomon"),
        schedule="every",
        every_n_steps=2,
        worker="sync",
        max_probes=22,
        probe_batch_size=5,  # 5 probe batches: with 2 ranks one rank makes a padding forward
        max_points=256,
        topology_points=64,
        figures_every=0,
        seed=5,
        alerts=ALWAYS,
        actions=json.loads(a.actions),
        checkpoint_dir=os.path.join(a.out, "checkpoints"),
    )
    trainer = L.Trainer(
        default_root_dir=a.out,
        max_steps=a.max_steps,
        accelerator="cpu",
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(LitLM(), train_dataloaders=loader)
    marker = {
        "rank": trainer.global_rank,
        "world": trainer.world_size,
        "main": cb.session.comm.is_main,
        "global_step": int(trainer.global_step),
        "checkpoints": [os.path.basename(c) for c in cb.checkpoints],
        "actions": [(x.step, x.kind) for x in cb.actions],
        "errors": cb.errors,
    }
    with open(os.path.join(a.out, f"marker_rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(marker, fh)


if __name__ == "__main__":
    main()
