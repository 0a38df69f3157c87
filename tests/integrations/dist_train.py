"""A tiny SFT run with the monitor, launched by tests/integrations/test_distributed.py.

One process: ``python dist_train.py OUT --batch 8``; two: ``torchrun --standalone --nproc_per_node 2
dist_train.py OUT --batch 4`` (gloo on CPU; the same global batch). Every rank writes
``OUT/marker_rank<r>.json``: what it saw of the monitor (actions, control flags, regulariser weight).

Importable without side effects: the worker process imports ``die_if_flag`` from here by name.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import time
from typing import Any

import numpy as np

# a threshold rule that fires at the first capture (any finite RankMe is above 0)
ALWAYS = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]
DIE_FLAG_ENV = "TOPOMON_TEST_DIE_FLAG"


def die_if_flag(x: np.ndarray) -> float:
    """A custom metric that kills the worker process once the file named by $TOPOMON_TEST_DIE_FLAG exists."""
    flag = os.environ.get(DIE_FLAG_ENV)
    if flag and os.path.exists(flag):
        os._exit(3)
    return float(x.shape[0])


def comm_check(rank: int, store: str, queue: Any) -> None:
    """Two spawned processes: gather and broadcast, then rank 0 gathers alone and must time out."""
    import torch.distributed as dist

    from topomon.distributed import TIMEOUT_ENV, CollectiveError, Comm

    os.environ[TIMEOUT_ENV] = "3"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    comm = Comm()
    result: dict[str, Any] = {
        "gathered": comm.gather({"rank": rank}),
        "broadcast": comm.broadcast("from 0" if rank == 0 else "ignored"),
        "flag": comm.broadcast_int(7 if rank == 0 else 0),
    }
    if rank == 0:  # rank 1 skips this gather: rank 0 must fail in bounded time, not hang
        t0 = time.monotonic()
        try:
            comm.gather("lonely")
        except CollectiveError as e:
            result["error"] = str(e)
        result["waited"] = time.monotonic() - t0
        try:
            comm.broadcast("again")
        except CollectiveError as e:
            result["after"] = str(e)
    done = f"{store}.rank0-done"
    if rank == 0:
        open(done, "w").close()
    else:  # rank 1 stays alive (and silent) until rank 0 has timed out: a skipped call, not a dead peer
        deadline = time.monotonic() + 120
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
    queue.put((rank, result))
    # put() hands the result to a feeder thread: without these two lines os._exit would end the
    # process before the result reached the pipe (the parent then waits for it in vain)
    queue.close()
    queue.join_thread()
    os._exit(0)  # skip process-group teardown after the planted failure


def fsdp_check(rank: int, store: str, queue: Any) -> None:
    """Two spawned processes shard a tiny model with FSDP2 (``fully_shard``, CPU gloo) and capture probes.

    Rank 0 also captures an unsharded copy; it reports the largest difference per layer.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from topomon.capture.layers import decoder_layers
    from topomon.capture.probe import ProbeCapture, plan_tokens
    from topomon.distributed import Comm, merge_shards, shard_slots
    from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    # 14 texts in batches of 3: 5 batches, so rank 1 makes one padding forward
    plan = plan_tokens(
        tiny_tokenizer(),
        sample_texts(14, seed=2),
        max_length=24,
        batch_size=3,
        pooling="all",
        max_points=48,
        exclude_first=True,
        seed=0,
    )
    probe = ProbeCapture(plan, [0, 2], logits=True)
    reference = probe.capture(tiny_causal_lm("llama", num_layers=3, seed=1), 0, "x") if rank == 0 else None
    model = tiny_causal_lm("llama", num_layers=3, seed=1)
    for block in decoder_layers(model):
        fully_shard(block)
    fully_shard(model)
    param_class = type(next(model.parameters())).__name__  # sharded: DTensor
    forwards: list[int] = []
    decoder_layers(model)[0].register_forward_hook(lambda *_: forwards.append(1))
    comm = Comm()
    parts = probe.capture_batches(model, shard_slots(len(plan.batches), rank, 2), lockstep=True)
    gathered = comm.gather(parts)
    result: dict[str, Any] = {
        "model_class": type(model).__name__,
        "param_class": param_class,
        "forwards": len(forwards),
        "n_batches": len(plan.batches),
    }
    if gathered is not None and reference is not None:
        snap = probe.snapshot(merge_shards(gathered, len(plan.batches)), list(reference.layers), 0, "x")
        ref = reference.layers
        result["shapes"] = {n: [list(x.shape), list(ref[n].shape)] for n, x in snap.layers.items()}
        result["max_diff"] = {n: float(np.abs(x - ref[n]).max()) for n, x in snap.layers.items()}
        # next-token statistics: from the root's logits under FSDP, from the hidden states unsharded
        result["extras"] = sorted(reference.extras)
        result["extras_close"] = sorted(snap.extras) == sorted(reference.extras) and all(
            np.allclose(snap.extras[k], reference.extras[k], rtol=1e-5, atol=1e-5) for k in reference.extras
        )
    queue.put((rank, result))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch", type=int, default=4, help="per-device train batch size")
    p.add_argument("--mode", default="probe", choices=["probe", "passive"])
    p.add_argument("--worker", default="sync", choices=["sync", "thread", "process"])
    p.add_argument("--actions", default="[]", help="JSON list of action specs (fired by the ALWAYS rule)")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kill-worker", action="store_true", help="kill the worker once the first alert is in")
    a = p.parse_args(argv)
    faulthandler.enable(all_threads=True)  # a rank that dies of a signal leaves its stacks in the log

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from topomon import TopoMonitor
    from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    actions = json.loads(a.actions)
    config: dict[str, Any] = dict(
        stage="sft",
        mode=a.mode,
        schedule="every",
        every_n_steps=a.every,
        worker=a.worker,
        max_points=256 if a.mode == "probe" else 4096,
        topology_points=64,
        figures_every=0,
        seed=5,
        alerts=ALWAYS,
        actions=actions,
        task_timeout=30.0,
        flush_timeout=15.0,
    )
    if a.mode == "probe":
        # 22 probes in batches of 5: 5 batches, so with 2 ranks one rank makes a padding forward
        config.update(max_probes=22, probe_batch_size=5)
    if any(s["kind"] == "diversity" for s in actions):
        config["diversity"] = {"layers": [-1], "kind": "logdet"}
    if a.kill_worker:
        config["custom_metrics"] = {"die": "tests.integrations.dist_train:die_if_flag"}
    mon = TopoMonitor(config)
    flag = os.path.join(a.out, "die.flag")
    os.environ[DIE_FLAG_ENV] = flag  # inherited by the worker process, spawned at train begin

    class Gate(TrainerCallback):  # before the monitor: on the main process, wait for the alert, then kill
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not a.kill_worker or rank != 0 or os.path.exists(flag) or state.global_step < 2:
                return
            deadline = time.monotonic() + 90
            router = mon.session._router
            while router is not None and router.alerts_fired == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            open(flag, "w").close()  # the worker dies on its next snapshot, and on every one after it

    class Watch(TrainerCallback):  # after the monitor: what this rank saw
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self.saves: list[int] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            div = mon.interventions.target("diversity")
            strategy = mon.session._strategy
            passive = getattr(strategy, "passive", None)
            rows = passive._rows if passive is not None and passive.armed is False else None
            self.steps.append(
                {
                    "step": int(state.global_step),
                    "should_save": bool(control.should_save),
                    "should_training_stop": bool(control.should_training_stop),
                    "diversity_weight": None if div is None else float(div.weight),
                    "actions": [x.kind for x in mon.actions],
                    # passive mode: the tokens this rank captured at this step (its own share)
                    "passive_points": None if rows is None else len(rows),
                }
            )

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.saves.append(int(state.global_step))

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            div = mon.interventions.target("diversity")
            marker = {
                "rank": rank,
                "world": world,
                "main": mon.session.is_main,
                "writer": mon.session._router is not None or mon.run is not None,
                "global_step": int(state.global_step),
                "steps": self.steps,
                "saves": self.saves,
                "diversity_applied": None if div is None else int(div.n_applied),
                "errors": mon.errors,
            }
            with open(os.path.join(a.out, f"marker_rank{rank}.json"), "w") as fh:
                json.dump(marker, fh)

    targs = SFTConfig(
        output_dir=a.out,
        max_steps=a.max_steps,
        per_device_train_batch_size=a.batch,
        learning_rate=a.lr,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_length=48,
        seed=7,
        dataloader_num_workers=0,
        disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = SFTTrainer(
        model=tiny_causal_lm("llama", seed=0),
        args=targs,
        train_dataset=Dataset.from_dict({"text": sample_texts(96, seed=3)}),
        processing_class=tiny_tokenizer(),
        callbacks=[Gate()],
    )
    mon.attach(trainer)
    trainer.add_callback(Watch())
    trainer.train()


if __name__ == "__main__":
    main()
