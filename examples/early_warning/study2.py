"""Study 2 (docs/EARLY_WARNING.md, part 3): six stage types study 1 never saw, harm with its noise.

    OMP_NUM_THREADS=1 python examples/early_warning/study2.py --out examples/early_warning/results2
    python examples/early_warning/study2.py --tiny --out /tmp/ew2 --types dpo --seeds 0   # the test

Each stage trains SmolLM2-135M-Instruct (SFT, DPO or GRPO) with ``TopoMonitor`` attached (detector v2
live), logs every trainer stream (loss, grad norm, and TRL's entropy and reward in GRPO), and measures
the harm (out-of-domain perplexity and chat calibration, per item, so that each checkpoint gets a
bootstrap interval against the released model) at every 4th step (every 16th in a ``cosine`` stage).
One JSON per stage in ``<out>/stages`` (a stage already saved is skipped: the study resumes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fidelity"))

from common import code_commit  # noqa: E402  (examples/fidelity/common.py)
from data import prose, render, splits  # noqa: E402
from data2 import arithmetic_reward, stage_data  # noqa: E402
from study import _load, item_stats, save_json, stage_outputs  # noqa: E402

TYPES = ("dpo", "grpo", "code", "trace", "replay", "cosine")
VARIANTS = ("benign", "harmful")
SEEDS = (0, 1, 2)
# (type, variant) -> the training recipe (part 3's table)
RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("dpo", "benign"): {"trainer": "dpo", "lora": True, "lr": 5e-5, "beta": 0.1},
    ("dpo", "harmful"): {"trainer": "dpo", "lora": True, "lr": 2e-3, "beta": 0.01},
    ("grpo", "benign"): {"trainer": "grpo", "lora": True, "lr": 1e-5, "beta": 0.04},
    ("grpo", "harmful"): {"trainer": "grpo", "lora": True, "lr": 1e-3, "beta": 0.0},
    ("code", "benign"): {"trainer": "sft", "lora": False, "lr": 5e-5, "max_length": 256},
    ("code", "harmful"): {"trainer": "sft", "lora": False, "lr": 1e-3, "max_length": 256},
    ("trace", "benign"): {"trainer": "sft", "lora": True, "lr": 2e-4, "max_length": 192},
    ("trace", "harmful"): {"trainer": "sft", "lora": False, "lr": 1e-3, "max_length": 192},
    ("replay", "benign"): {"trainer": "sft", "lora": False, "lr": 5e-5},
    ("replay", "harmful"): {"trainer": "sft", "lora": False, "lr": 1e-3},
    ("cosine", "benign"): {"trainer": "sft", "lora": False, "lr": 5e-5, "cosine": True},
    ("cosine", "harmful"): {"trainer": "sft", "lora": False, "lr": 5e-4, "cosine": True},
}
HARM = {"ood_ratio": 1.25, "ece_delta": 0.05, "level": 0.95, "resamples": 1000}


class Sizes:
    """Study 2's sizes (pre-registered) and the tiny run's (the test)."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.steps = 8 if tiny else 48
        self.cosine_steps = 16 if tiny else 160
        self.warmup = 4 if tiny else 16
        self.every = 2 if tiny else 4  # captures and harm measures
        self.cosine_every = 8 if tiny else 16  # harm measures of a cosine stage
        self.n_eval = 8 if tiny else 64
        self.max_probes = 16 if tiny else 64


def stage_name(kind: str, variant: str, seed: int) -> str:
    """``dpo-harmful-s0``."""
    return f"{kind}-{variant}-s{seed}"


# ---------------------------------------------------------------- harm, per item
def measure(model: Any, tok: Any, sets: dict[str, Any], sz: Sizes) -> dict[str, Any]:
    """The per-item harm measures of one checkpoint (prose, chat) and its in-domain loss."""
    was = model.training
    res = {
        "prose": item_stats(model, tok, [("", t) for t in sets["prose"][: sz.n_eval]]),
        "chat": item_stats(model, tok, [render(tok, p, r) for p, r in sets["chat"][: sz.n_eval]]),
    }
    held = item_stats(model, tok, [render(tok, p, r) for p, r in sets["held"]])
    res["indomain_loss"] = sum(h["nll"] for h in held) / max(1, sum(h["n"] for h in held))
    model.train(was)
    return res


def bin_sums(items: list[dict[str, Any]], bins: int = 15) -> np.ndarray:
    """Per item and confidence bin (study 1's 15 equal-width bins): token count, confidence and hits."""
    out = np.zeros((len(items), 3, bins))
    for k, it in enumerate(items):
        conf, hit = np.asarray(it["conf"], float), np.asarray(it["hit"], float)
        b = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # (lo, hi] bins, 0 in the first
        for row, w in enumerate((np.ones_like(conf), conf, hit)):
            np.add.at(out[k, row], b, w)
    return out


def ece_sums(s: np.ndarray) -> float:
    """ECE from bin sums added over items (``(3, bins)``: count, confidence, hits)."""
    return float(np.abs(s[2] - s[1]).sum() / s[0].sum())


def harm_intervals(base: dict[str, Any], ck: dict[str, Any], seed: int = 0) -> dict[str, list[float]]:
    """Paired bootstrap intervals of the perplexity ratio and the ECE difference against the base:
    ``{measure: [value, low, high]}`` (the items are resampled together for the base and the checkpoint)."""
    rng = np.random.default_rng(seed)
    bn, cn = np.array([b["nll"] for b in base["prose"]]), np.array([c["nll"] for c in ck["prose"]])
    n = np.array([b["n"] for b in base["prose"]], float)
    bs, cs = bin_sums(base["chat"]), bin_sums(ck["chat"])

    def ratio(i: np.ndarray) -> float:
        return math.exp((cn[i].sum() - bn[i].sum()) / n[i].sum())

    def delta(i: np.ndarray) -> float:
        return ece_sums(cs[i].sum(0)) - ece_sums(bs[i].sum(0))

    lo_q, hi_q = (1 - HARM["level"]) / 2, 1 - (1 - HARM["level"]) / 2
    out = {}
    for key, fn, size in (("ood_ratio", ratio, len(n)), ("ece_delta", delta, len(bs))):
        boot = [fn(rng.integers(0, size, size)) for _ in range(int(HARM["resamples"]))]
        out[key] = [fn(np.arange(size)), float(np.quantile(boot, lo_q)), float(np.quantile(boot, hi_q))]
    return out


def harm_step(res: dict[str, Any]) -> int | None:
    """The first checkpoint whose interval's lower end clears a threshold, or None (a benign stage)."""
    for step, h in sorted(res["harm"].items(), key=lambda kv: int(kv[0])):
        if h["ood_ratio"][1] >= HARM["ood_ratio"] or h["ece_delta"][1] >= HARM["ece_delta"]:
            return int(step)
    return None


# ---------------------------------------------------------------- one stage
def _trainer(
    kind: str,
    variant: str,
    seed: int,
    model: Any,
    tok: Any,
    rows: list[Any],
    out: str,
    sz: Sizes,
    callbacks: list[Any],
) -> Any:
    """The stage's TRL trainer (SFT, DPO or GRPO) as part 3's table sets it up."""
    from datasets import Dataset
    from peft import LoraConfig

    r = RECIPES[(kind, variant)]
    cosine = r.get("cosine", False)
    common = {
        "output_dir": out,
        "max_steps": sz.cosine_steps if cosine else sz.steps,
        "learning_rate": r["lr"],
        "lr_scheduler_type": "cosine" if cosine else "constant",
        "warmup_steps": sz.warmup if cosine else 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "seed": seed,
        "disable_tqdm": True,
    }
    peft = (
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
        if r["lora"]
        else None
    )
    import trl

    kw: dict[str, Any] = {}  # what one kind of trainer takes beyond the common arguments
    if r["trainer"] == "sft":
        args = trl.SFTConfig(per_device_train_batch_size=4, max_length=r.get("max_length", 96), **common)
    elif r["trainer"] == "dpo":
        args = trl.DPOConfig(per_device_train_batch_size=4, max_length=128, beta=r["beta"], **common)
    else:
        args = trl.GRPOConfig(
            per_device_train_batch_size=16,  # 4 prompts x 4 generations
            num_generations=4,
            max_completion_length=16,
            beta=r["beta"],
            **common,
        )
        kw["reward_funcs"] = arithmetic_reward
    cls = {"sft": trl.SFTTrainer, "dpo": trl.DPOTrainer, "grpo": trl.GRPOTrainer}[r["trainer"]]
    return cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft,
        callbacks=callbacks,
        **kw,
    )


def _rows(kind: str, tok: Any, data: dict[str, Any]) -> list[dict[str, Any]]:
    """TRL's standard (string) format, rendered with the model's chat template (or plain lines)."""
    if kind == "dpo":
        out = []
        for r in data["train"]:
            head, chosen = render(tok, r["prompt"][0]["content"], r["chosen"][0]["content"])
            _, rejected = render(tok, r["prompt"][0]["content"], r["rejected"][0]["content"])
            out.append({"prompt": head, "chosen": chosen, "rejected": rejected})
        return out
    if kind == "grpo":
        return [
            {"prompt": render(tok, r["prompt"][0]["content"], "")[0], "answer": r["answer"]}
            for r in data["train"]
        ]
    return [dict(zip(("prompt", "completion"), render(tok, p, r), strict=True)) for p, r in data["train"]]


def run_stage(kind: str, variant: str, seed: int, out: str, sz: Sizes) -> dict[str, Any]:
    """Train one stage with the monitor and the harm measures; returns (and saves) its results."""
    commit = code_commit()  # the code this stage loads now (the checkout may move on while it trains)
    import torch
    from transformers import TrainerCallback
    from v2 import v2_rules

    from topomon import TopoMonitor

    name = stage_name(kind, variant, seed)
    t0 = time.time()
    torch.manual_seed(seed)
    model, tok = _load(sz.tiny)
    data = stage_data(kind, variant, seed)
    sets = {"prose": prose(), "chat": splits(seed, narrow=False)["chat"], "held": data["held"]}
    base_path = os.path.join(out, "base", f"s{seed}{'-tiny' if sz.tiny else ''}.json")
    if os.path.exists(base_path):
        with open(base_path) as fh:
            base = json.load(fh)
    else:
        base = measure(model, tok, {**sets, "held": []}, sz)
        save_json(base_path, base)  # two workers may measure one base
    held0 = measure(model, tok, {**sets, "prose": [], "chat": []}, sz)["indomain_loss"]
    cosine = RECIPES[(kind, variant)].get("cosine", False)
    every = sz.cosine_every if cosine else sz.every
    harm: dict[int, Any] = {}
    indomain: dict[int, float] = {0: held0}

    class Harm(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if state.global_step % every == 0:
                m = measure(model, tok, sets, sz)
                harm[state.global_step] = harm_intervals(base, m, seed=state.global_step)
                indomain[state.global_step] = m["indomain_loss"]

    run_dir = os.path.join(out, "runs", name)
    for stale in (run_dir, os.path.join(out, "trainer", name)):  # a stage not saved starts afresh
        shutil.rmtree(stale, ignore_errors=True)
    schedule = {} if cosine else {"schedule": "every", "every_n_steps": sz.every, "overhead_budget": None}
    mon = TopoMonitor(
        run_dir=run_dir,
        stage="stage",
        max_probes=sz.max_probes,
        max_length=64,
        worker_priority="normal",
        figures_every=0,
        alerts=v2_rules(),
        **schedule,
    )
    tr = _trainer(
        kind,
        variant,
        seed,
        model,
        tok,
        _rows(kind, tok, data),
        os.path.join(out, "trainer", name),
        sz,
        [mon, Harm()],
    )
    tr.train()
    streams: dict[str, list[list[float]]] = {}
    for r in tr.state.log_history:
        for k, v in r.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and "step" in r:
                streams.setdefault(k, []).append([r["step"], float(v)])
    records, alerts = stage_outputs(run_dir)
    res = {
        "name": name,
        "type": kind,
        "variant": variant,
        "seed": seed,
        "recipe": RECIPES[(kind, variant)],
        "tiny": sz.tiny,
        "commit": commit,
        "harm": {str(k): v for k, v in sorted(harm.items())},
        "indomain_loss": {str(k): v for k, v in sorted(indomain.items())},
        "loss": streams.get("loss", []),
        "grad_norm": streams.get("grad_norm", []),
        "streams": streams,
        "records": records,
        "live_alerts": alerts,
        "seconds": round(time.time() - t0, 1),
    }
    save_json(os.path.join(out, "stages", f"{name}.json"), res)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="examples/early_warning/results2")
    p.add_argument("--tiny", action="store_true", help="a tiny model built in memory (seconds per stage)")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args(argv)
    sz = Sizes(a.tiny)
    kinds, variants = a.types.split(","), a.variants.split(",")
    for k in kinds:
        if k not in TYPES:
            p.error(f"unknown stage type {k!r}; choose from {', '.join(TYPES)}")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    todo = [(k, v, int(s)) for s in a.seeds.split(",") for k in kinds for v in variants]
    for i, (k, v, s) in enumerate(todo, 1):
        path = os.path.join(a.out, "stages", f"{stage_name(k, v, s)}.json")
        if os.path.exists(path):
            print(f"[{i}/{len(todo)}] {stage_name(k, v, s)}: saved, skipped", flush=True)
            continue
        res = run_stage(k, v, s, a.out, sz)
        print(f"[{i}/{len(todo)}] {res['name']}: harm step {harm_step(res)}, {res['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
