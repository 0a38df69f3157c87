"""Part 1 of the robust-metrics study (``docs/METRICS.md``, issue 25): train the demo's stages once
and save every capture's raw hidden states, so that every preprocessing treatment is judged offline
on the same activations (``evaluate.py``, seconds).

The stages are ``make demo``'s (``topomon.demo.run``): SFT with LoRA (24 steps, lr 2e-4), DPO with
LoRA (16 steps, lr 5e-5), then the narrow stage (full fine-tuning on one templated refusal, lr 1e-3,
30 steps, replay + diversity regulariser on the default alert), monitored with the demo's monitor
(64 packaged probes, 512 fixed token positions, blocks 7, 14, 22, 29 and the final norm, the log
schedule with every 5 steps). SFT + DPO run once (seed 0) and the merged DPO model is saved; the
narrow stage runs once per ``--seeds`` from it (the seed sets the refusal templates' draw, the data
order and the trainer's seed).

Every capture's snapshot is written, before any metric, to ``<data>/<run>/raw/<stage>__<step>.npz``
(float32 ``(512, 576)`` per layer, ~6 MB), with ``tokens.json`` (token id and position of each point).

The whole chain (about 5 minutes of a quiet 2-core CPU per narrow seed, more for SFT + DPO):

    nice -n 5 .venv/bin/python examples/robust_metrics/collect.py --data /tmp/topomon_robust --seeds 0 1 2

What docs/METRICS.md reports (the shared CPU was too slow for the chain: the narrow stage from
SmolLM2-135M-Instruct itself, one single-threaded process per seed, ~25 minutes each under load):

    for s in 0 1 2; do nice -n 5 .venv/bin/python examples/robust_metrics/collect.py --from-base \
        --threads 1 --seeds $s & done; wait
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _patch_engine(out_dir: list[str]) -> None:
    """Save each snapshot's raw layers before the engine computes its metrics."""
    from topomon.worker.engine import MetricEngine

    original = MetricEngine.process
    if getattr(original, "_robust_patched", False):
        return

    def process(self: Any, snap: Any) -> Any:
        path = os.path.join(out_dir[0], f"{snap.stage}__{snap.step}.npz")
        np.savez(path, **{k: np.asarray(v, dtype=np.float32) for k, v in snap.layers.items()})
        return original(self, snap)

    process._robust_patched = True  # type: ignore[attr-defined]
    MetricEngine.process = process  # type: ignore[method-assign]


def _monitor(run_dir: str, stage: str, **extra: Any) -> Any:
    from topomon.demo.run import _monitor as demo_monitor

    # the demo's monitor, with the worker in a thread (so the patched engine runs) and no topology or
    # figures (computed offline from the saved states)
    return demo_monitor(
        run_dir, stage, worker="thread", topology=False, figures_every=0, tensorboard=False, **extra
    )


def _token_table(tok: Any) -> dict[str, Any]:
    """Token id and (probe, position) of each captured point, in snapshot order."""
    from topomon.capture.probes import load_probes
    from topomon.config import MonitorConfig
    from topomon.stage import probe_plan

    c = MonitorConfig(max_length=64, max_probes=64)
    plan = probe_plan(c, tok, load_probes(None, max_probes=c.max_probes))
    ids, pos, probe = [], [], []
    for b, (inp, _att) in enumerate(plan.batches):
        for r, p in plan.select[b].tolist():
            ids.append(int(inp[r, p]))
            pos.append(int(p))
            probe.append(int(plan.order[b * c.probe_batch_size + r]))
    return {
        "token_id": ids,
        "position": pos,
        "probe": probe,
        "token": [tok.convert_ids_to_tokens(i) for i in ids],
    }


def _args(out: str, steps: int, lr: float, seed: int) -> dict[str, Any]:
    from topomon.demo.run import DemoSettings, _common_args

    s = DemoSettings(seed=seed)
    return _common_args(out, steps, s, lr) | {"report_to": [], "disable_tqdm": True}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="/tmp/topomon_robust", help="where the raw captures go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the narrow stage")
    p.add_argument("--skip-base", action="store_true", help="reuse the saved SFT+DPO model")
    p.add_argument(
        "--from-base",
        action="store_true",
        help="no SFT/DPO: the narrow stage starts from SmolLM2-135M-Instruct itself (a shared CPU "
        "too slow for the full chain)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()

    from topomon.demo.run import _merged, _quiet

    _quiet()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from topomon.demo.data import chitchat_pairs, dpo_records, narrow_records, sft_records
    from topomon.models import load_smollm2

    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(a.data, exist_ok=True)
    target = [a.data]
    _patch_engine(target)
    pairs = chitchat_pairs(600, seed=0)
    lora: dict[str, Any] = dict(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    dpo_dir = os.path.join(a.data, "dpo_model")
    times: dict[str, float] = {}
    if not a.skip_base and not a.from_base:
        model, tok = load_smollm2()
        with open(os.path.join(a.data, "tokens.json"), "w") as fh:
            json.dump(_token_table(tok), fh)
        base_run = os.path.join(a.data, "base_run")
        shutil.rmtree(base_run, ignore_errors=True)
        os.makedirs(os.path.join(base_run, "raw"))
        target[0] = os.path.join(base_run, "raw")
        torch.manual_seed(0)
        t = time.time()
        mon = _monitor(os.path.join(base_run, "topomon"), "sft")
        sft_ds = Dataset.from_list(sft_records(pairs[:300]))
        tr = SFTTrainer(
            model=model,
            args=SFTConfig(**_args(os.path.join(base_run, "trainer"), 24, 2e-4, 0)),
            train_dataset=sft_ds,
            processing_class=tok,
            peft_config=LoraConfig(**lora),
        )
        mon.attach(tr)
        tr.train()
        model = _merged(tr)
        times["sft"] = time.time() - t
        t = time.time()
        mon = _monitor(os.path.join(base_run, "topomon"), "dpo")
        dpo_ds = Dataset.from_list(dpo_records(pairs[300:450], seed=0))
        dtr = DPOTrainer(
            model=model,
            args=DPOConfig(**_args(os.path.join(base_run, "trainer"), 16, 5e-5, 0)),
            train_dataset=dpo_ds,
            processing_class=tok,
            peft_config=LoraConfig(**lora),
        )
        mon.attach(dtr)
        dtr.train()
        model = _merged(dtr)
        times["dpo"] = time.time() - t
        model.save_pretrained(dpo_dir)
        tok.save_pretrained(dpo_dir)
        print(f"SFT {times['sft']:.0f} s, DPO {times['dpo']:.0f} s; saved {dpo_dir}", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for seed in a.seeds:
        if a.from_base:
            model, tok = load_smollm2()
            if not os.path.exists(os.path.join(a.data, "tokens.json")):
                with open(os.path.join(a.data, "tokens.json"), "w") as fh:
                    json.dump(_token_table(tok), fh)
        else:
            model = AutoModelForCausalLM.from_pretrained(dpo_dir, torch_dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(dpo_dir)
        run = os.path.join(a.data, f"narrow_seed{seed}")
        shutil.rmtree(run, ignore_errors=True)
        os.makedirs(os.path.join(run, "raw"))
        target[0] = os.path.join(run, "raw")
        if not a.from_base:  # the narrow stage continues the demo's step axis (SFT 24 + DPO 16 steps)
            shutil.copytree(os.path.join(a.data, "base_run", "topomon"), os.path.join(run, "topomon"))
        torch.manual_seed(seed)
        t = time.time()
        narrow_ds = Dataset.from_list(narrow_records([q for q, _ in pairs[450:600]], seed=seed))
        replay_ds = Dataset.from_list(sft_records(pairs[:150]))
        mon = _monitor(
            os.path.join(run, "topomon"),
            "narrow",
            actions=[{"kind": "replay", "value": 0.5}, {"kind": "diversity", "value": 0.05}],
            diversity={"layers": [-1], "kind": "logdet"},
            replay_dataset=replay_ds,
        )
        tr = SFTTrainer(
            model=model,
            args=SFTConfig(**_args(os.path.join(run, "trainer"), 30, 1e-3, seed)),
            train_dataset=narrow_ds,
            processing_class=tok,
        )
        mon.attach(tr)
        tr.train()
        times[f"narrow_seed{seed}"] = time.time() - t
        print(f"narrow seed {seed}: {times[f'narrow_seed{seed}']:.0f} s", flush=True)
        with open(os.path.join(run, "actions.json"), "w") as fh:
            json.dump([{"step": x.step, "kind": x.kind} for x in mon.actions], fh)
    with open(
        os.path.join(a.data, f"times_{'_'.join(map(str, a.seeds))}_{int(time.time())}.json"), "w"
    ) as fh:
        json.dump(times, fh)


if __name__ == "__main__":
    main()
