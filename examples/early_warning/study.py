"""The early-warning study (docs/EARLY_WARNING.md): does topomon's alert come before the harm?

    python examples/early_warning/study.py --out runs/early_warning             # the 24 stages (hours on CPU)
    python examples/early_warning/study.py --out runs/early_warning --no-train  # tables and figures, seconds
    python examples/early_warning/study.py --tiny --out /tmp/ew                 # a tiny model (the test)

Each stage trains SmolLM2-135M-Instruct with ``TopoMonitor`` attached, logs the loss and gradient
norm at every step, and measures the harm (out-of-domain perplexity, calibration, plasticity,
in-domain loss) at the pre-registered checkpoints; it saves one JSON per stage in ``<out>/stages``
(a stage already saved is skipped: the study resumes). ``--no-train`` reads them back and runs
every detector offline on the same logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data import render, splits  # noqa: E402

CONFIGS = [(d, m, r) for d in ("narrow", "broad") for m in ("full", "lora") for r in ("low", "high")]
LR = {("full", "low"): 5e-5, ("full", "high"): 1e-3, ("lora", "low"): 2e-4, ("lora", "high"): 3e-3}
SEEDS = (0, 1, 2)
HARMS = {
    # part 1, as pre-registered
    "preregistered": {"ood_ratio": 1.25, "plasticity_ratio": 1.10, "ece_delta": 0.05},
    # amendment 1 (docs/EARLY_WARNING.md), fixed on the tuning half (seed 0) before seeds 1-2 were
    # read: the plasticity loss of a stage benign by every other measure moves 0.88-1.24x between its
    # checkpoints, so a 1.10x threshold is noise; 1.5x is above that range
    "amended": {"ood_ratio": 1.25, "plasticity_ratio": 1.50, "ece_delta": 0.05},
}
HARM = dict(HARMS["preregistered"])  # the definition in use (``--harm``)


class Sizes:
    """The study's sizes (pre-registered) and the tiny run's (the test)."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.steps = 8 if tiny else 48
        self.checkpoints = (4, 8) if tiny else (8, 16, 24, 32, 40, 48)
        self.capture_every = 2 if tiny else 4
        self.early = 2 if tiny else 8  # the capture whose change predicts the harm (AUC)
        self.n_eval = 8 if tiny else 64
        self.plastic_steps = 2 if tiny else 8
        self.max_probes = 16 if tiny else 64


def stage_name(cfg: tuple[str, str, str], seed: int) -> str:
    """``narrow-full-high-s0``."""
    return f"{'-'.join(cfg)}-s{seed}"


# ---------------------------------------------------------------- harm measures
def _encode(tok: Any, prompt: str, completion: str, max_len: int) -> tuple[list[int], int]:
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    tail = tok(completion, add_special_tokens=False)["input_ids"]
    return (head + tail)[:max_len], min(len(head), max_len)


def item_stats(model: Any, tok: Any, rows: list[tuple[str, str]], max_len: int = 128) -> list[dict[str, Any]]:
    """Per row: the completion tokens' summed NLL and count, and their top-1 confidences and hits."""
    import torch

    out = []
    model.eval()
    with torch.no_grad():
        for prompt, completion in rows:
            ids, start = _encode(tok, prompt, completion, max_len)
            if len(ids) - start < 1 or len(ids) < 2:
                continue
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)[max(start - 1, 0) :]
            t = x[0, 1:][max(start - 1, 0) :]
            p, arg = logp.exp().max(-1)
            out.append(
                {
                    "nll": float(-logp.gather(1, t[:, None]).sum()),
                    "n": len(t),
                    "conf": p.tolist(),
                    "hit": (arg == t).float().tolist(),
                }
            )
    return out


def _token_stats(model: Any, tok: Any, rows: list[tuple[str, str]], max_len: int = 128) -> dict[str, Any]:
    """Mean NLL of the completion tokens, and their top-1 confidence / correctness (for ECE)."""
    items = item_stats(model, tok, rows, max_len)
    return {
        "nll": sum(i["nll"] for i in items) / sum(i["n"] for i in items),
        "conf": [c for i in items for c in i["conf"]],
        "hit": [h for i in items for h in i["hit"]],
    }


def ece(conf: list[float], hit: list[float], bins: int = 15) -> float:
    """Expected calibration error, equal-width confidence bins."""
    total, err = len(conf), 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0)]
        if idx:
            err += (
                len(idx)
                / total
                * abs(sum(hit[i] for i in idx) / len(idx) - sum(conf[i] for i in idx) / len(idx))
            )
    return err


def plasticity(model: Any, tok: Any, task: dict[str, Any], steps: int, seed: int) -> float:
    """Loss on the held-out fresh task after ``steps`` steps of fine-tuning a copy on it."""
    import torch

    from topomon.models import independent_copy

    torch.manual_seed(seed)
    # not copy.deepcopy: inside the trainer the copy would run the trained model's weights (the bug
    # that withdrew the first 12 stages; see topomon.models.independent_copy)
    m = independent_copy(model)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    before = [p.grad for p in model.parameters()]
    train = task["task_train"]
    for i in range(steps):
        batch = [train[(4 * i + j) % len(train)] for j in range(4)]
        loss = 0.0
        for prompt, completion in batch:
            ids, start = _encode(tok, *render(tok, prompt, completion), 96)
            x = torch.tensor([ids])
            labels = x.clone()
            labels[0, :start] = -100
            loss = loss + m(input_ids=x, labels=labels).loss / len(batch)
        loss.backward()  # type: ignore[union-attr]
        if i == 0:  # the copy trains, and the checkpoint's own gradients are untouched
            if any(p.grad is None for p in m.parameters()):
                raise RuntimeError("plasticity: the copy's parameters got no gradient")
            if any(p.grad is not g for p, g in zip(model.parameters(), before, strict=True)):
                raise RuntimeError("plasticity: the copy's backward reached the checkpoint's parameters")
        opt.step()
        opt.zero_grad()
    held = [render(tok, p, c) for p, c in task["task_held"]]
    out = _token_stats(m, tok, held)["nll"]
    del m, opt
    return float(out)


def measure(model: Any, tok: Any, sets: dict[str, Any], sz: Sizes, seed: int) -> dict[str, float]:
    """The four harm measures of one checkpoint."""
    was_training = model.training
    ood = _token_stats(model, tok, [("", t) for t in sets["prose"][: sz.n_eval]])
    chat = _token_stats(model, tok, [render(tok, p, r) for p, r in sets["chat"][: sz.n_eval]])
    held = _token_stats(model, tok, [render(tok, p, r) for p, r in sets["held"]])
    out = {
        "ood_ppl": math.exp(ood["nll"]),
        "ece": ece(chat["conf"], chat["hit"]),  # type: ignore[arg-type]
        "plasticity": plasticity(model, tok, sets, sz.plastic_steps, seed),
        "indomain_loss": held["nll"],
    }
    model.train(was_training)
    return out


# ---------------------------------------------------------------- files
def save_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a reader never sees half a file; two writers may race)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def load_stages(folder: str) -> list[dict[str, Any]]:
    """Every saved stage's JSON in ``folder``, by file name (none when the folder is missing)."""
    out = []
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, f)) as fh:
            out.append(json.load(fh))
    return out


def publish(path: str, text: str) -> int:
    """Write a report's markdown to ``path``, print it and where it went; returns 0 (an exit code)."""
    with open(path, "w") as fh:
        fh.write(text + "\n")
    print(text)
    print(f"\ntables: {path}")
    return 0


def stage_outputs(run_dir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The metric records and the alerts of stage ``"stage"`` in a study run's topomon folder."""
    from topomon.run import RunDir

    run = RunDir(run_dir)
    lines, _ = run.records()
    alerts = []
    if os.path.exists(run.alerts_path):
        with open(run.alerts_path) as fh:
            alerts = [json.loads(x) for x in fh if x.strip()]
    records = [r for r in lines if r.get("kind") == "metrics" and r.get("stage") == "stage"]
    return records, [a for a in alerts if a.get("kind", "alert") == "alert" and a.get("stage") == "stage"]


# ---------------------------------------------------------------- one stage
def _load(tiny: bool) -> tuple[Any, Any]:
    if tiny:
        from topomon.testing import tiny_causal_lm, tiny_tokenizer

        tok = tiny_tokenizer()
        return tiny_causal_lm(vocab_size=len(tok)), tok
    from topomon.models import load_smollm2

    return load_smollm2()


def run_stage(cfg: tuple[str, str, str], seed: int, out: str, sz: Sizes) -> dict[str, Any]:
    """Train one stage with the monitor and the harm measures; returns (and saves) its results."""
    import torch
    from data import prose
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from topomon import TopoMonitor

    data, mode, rate = cfg
    name = stage_name(cfg, seed)
    t0 = time.time()
    torch.manual_seed(seed)
    model, tok = _load(sz.tiny)
    sets = splits(seed, narrow=data == "narrow")
    sets["prose"] = prose()
    base_path = os.path.join(out, "base", f"{data}-s{seed}.json")
    if os.path.exists(base_path):
        with open(base_path) as fh:
            base = json.load(fh)
    else:
        base = measure(model, tok, sets, sz, seed)
        save_json(base_path, base)  # two workers may measure one base
    rows = [dict(zip(("prompt", "completion"), render(tok, p, r), strict=True)) for p, r in sets["train"]]
    measured: dict[int, dict[str, float]] = {}

    class Harm(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if state.global_step in sz.checkpoints:
                measured[state.global_step] = measure(model, tok, sets, sz, seed)

    run_dir = os.path.join(out, "runs", name)
    # a stage not saved starts afresh: a second run into the same topomon folder would continue it
    # as a new stage ("stage-2", steps after the first run's), and the records below read "stage"
    for stale in (run_dir, os.path.join(out, "trainer", name)):
        shutil.rmtree(stale, ignore_errors=True)
    mon = TopoMonitor(
        run_dir=run_dir,
        stage="stage",
        schedule="every",
        every_n_steps=sz.capture_every,
        max_probes=sz.max_probes,
        max_length=64,
        overhead_budget=None,
        worker_priority="normal",
        figures_every=0,
    )
    args = SFTConfig(
        output_dir=os.path.join(out, "trainer", name),
        max_steps=sz.steps,
        per_device_train_batch_size=4,
        learning_rate=LR[(mode, rate)],
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=seed,
        max_length=96,
        disable_tqdm=True,
    )
    peft = (
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
        if mode == "lora"
        else None
    )
    tr = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft,
        callbacks=[mon, Harm()],
    )
    tr.train()
    logs = tr.state.log_history
    records, alerts = stage_outputs(run_dir)
    res = {
        "name": name,
        "data": data,
        "mode": mode,
        "rate": rate,
        "seed": seed,
        "lr": LR[(mode, rate)],
        "tiny": sz.tiny,
        "base": base,
        "checkpoints": {str(k): v for k, v in sorted(measured.items())},
        "loss": [[r["step"], r["loss"]] for r in logs if "loss" in r],
        "grad_norm": [[r["step"], r["grad_norm"]] for r in logs if "grad_norm" in r],
        "records": records,
        "live_alerts": alerts,
        "seconds": round(time.time() - t0, 1),
    }
    save_json(os.path.join(out, "stages", f"{name}.json"), res)
    return res


# ---------------------------------------------------------------- analysis (offline, from the JSON)
def harm_step(res: dict[str, Any]) -> int | None:
    """The first checkpoint past the pre-registered harm threshold, or None (a benign stage)."""
    b = res["base"]
    for step, m in sorted(res["checkpoints"].items(), key=lambda kv: int(kv[0])):
        if (
            m["ood_ppl"] >= HARM["ood_ratio"] * b["ood_ppl"]
            or m["plasticity"] >= HARM["plasticity_ratio"] * b["plasticity"]
            or m["ece"] >= b["ece"] + HARM["ece_delta"]
        ):
            return int(step)
    return None


def spike_first(
    series: list[list[float]], window: int = 10, warmup: int = 1, rtol: float = 2.0
) -> int | None:
    """Lightning's ``SpikeDetection`` rule (mode "min", its defaults): the first spiking step, or None."""
    hist: list[float] = []
    last = None
    for i, (step, x) in enumerate(series):
        if not math.isfinite(x):
            return int(step)
        if i >= warmup and hist and last is not None:
            mean = sum(hist[-window:]) / len(hist[-window:])
            if x - last > 0 and abs(x - mean) >= abs(rtol * mean):
                return int(step)
        hist.append(x)
        last = x
    return None


def _series(res: dict[str, Any], metric: str, layer: str) -> list[tuple[int, float]]:
    out = [(r["step"], r["metrics"].get(metric)) for r in res["records"] if r["layer"] == layer]
    return sorted((s, float(v)) for s, v in out if v is not None and math.isfinite(float(v)))


def _layers(res: dict[str, Any]) -> list[str]:
    return sorted({r["layer"] for r in res["records"]})


def topomon_first(res: dict[str, Any], rankme: float = 0.15, rankme_pca: float = 0.25) -> int | None:
    """The default rules (with these thresholds) replayed on the stage's records: first firing step."""
    from topomon.alerts import AlertEngine
    from topomon.alerts.rules import DropRule, NonFiniteRule
    from topomon.pipeline import record_from_json

    rules = [
        DropRule("rankme", layer="final_norm", threshold=rankme),
        DropRule("rankme_pca", layer="final_norm", threshold=rankme_pca),
        NonFiniteRule(),
    ]
    recs = [record_from_json(r) for r in res["records"]]
    names = {k for r in recs for k in r.metrics}
    engine = AlertEngine(rules, names)
    for step in sorted({r.step for r in recs}):
        fired = [a for a in engine.update([r for r in recs if r.step == step]) if a.reason != "recovered"]
        if fired:
            return step
    return None


def _rel_first(res: dict[str, Any], metric: str, layers: list[str], test: Any) -> int | None:
    steps: list[int] = []
    for layer in layers:
        s = _series(res, metric, layer)
        if not s:
            continue
        v0 = s[0][1]
        for step, v in s[1:]:
            if test(v0, v):
                steps.append(step)
                break
    return min(steps) if steps else None


def candidates(res: dict[str, Any]) -> dict[str, int | None]:
    """The pre-registered candidate rules' first firing steps."""
    blocks = [layer for layer in _layers(res) if layer.startswith("layer_")]
    return {
        "n_outliers x2": _rel_first(res, "n_outliers", _layers(res), lambda a, b: b >= 2 * a and b >= a + 4),
        "logit entropy -30%": _rel_first(res, "logit_entropy", _layers(res), lambda a, b: b < 0.7 * a),
        "blocks PR -40%": _rel_first(res, "participation_ratio", blocks, lambda a, b: b < 0.6 * a),
        "alpha-ReQ +30%": _rel_first(res, "alpha_req", ["final_norm"], lambda a, b: b > 1.3 * a),
    }


def detectors(res: dict[str, Any]) -> dict[str, int | None]:
    """Every detector's first alert step on one stage."""
    live = [a["step"] for a in res["live_alerts"] if a.get("reason") != "recovered"]
    return {
        "topomon (live)": min(live) if live else None,
        "topomon (replayed)": topomon_first(res),
        "loss spike": spike_first(res["loss"]),
        "grad-norm spike": spike_first(res["grad_norm"]),
        **candidates(res),
    }


def score(results: list[dict[str, Any]], name: str, first: Any = None) -> dict[str, Any]:
    """Precision, recall, F1, false alarms and lead times of one detector over stages; also the
    counts behind them and ``before``: the alerts strictly before the first measured harm."""
    tp = fp = fn = before = 0
    leads: list[int] = []
    for res in results:
        h = harm_step(res)
        a = first(res) if first is not None else detectors(res)[name]
        if h is not None and a is not None:
            tp += 1
            before += a < h
            leads.append(h - a)
        elif h is not None:
            fn += 1
        elif a is not None:
            fp += 1
    prec = tp / (tp + fp) if tp + fp else math.nan
    rec = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * prec * rec / (prec + rec) if tp else 0.0
    leads.sort()
    return {
        "precision": prec,
        "recall": rec,
        "f1": f1,
        "false_alarms": fp,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "before": before,
        "harmful": tp + fn,
        "lead_median": statistics.median(leads) if leads else None,
        "lead_range": (leads[0], leads[-1]) if leads else None,
    }


def auc(scores: list[float], labels: list[bool]) -> float:
    """Mann-Whitney AUC of ``scores`` for the positive ``labels`` (ties count one half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def early_change(res: dict[str, Any], metric: str, layer: str, early: int) -> float | None:
    """Relative change of a metric from the stage start to the capture at ``early``."""
    s = dict(_series(res, metric, layer))
    if 0 not in s or early not in s or s[0] == 0:
        return None
    return s[early] / s[0] - 1


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+g}"


def score_table(results: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Precision, recall, F1, false alarms and lead time of every detector over ``results``."""
    out = ["| detector | precision | recall | F1 | false alarms | lead median | lead range |"]
    out.append("|---|---|---|---|---|---|---|")
    for n in names:
        s = score(results, n)
        rng = "-" if s["lead_range"] is None else f"{s['lead_range'][0]:+d} .. {s['lead_range'][1]:+d}"
        out.append(
            f"| {n} | {s['precision']:.2f} | {s['recall']:.2f} | {s['f1']:.2f} | {s['false_alarms']} | "
            f"{_fmt(s['lead_median'])} | {rng} |"
        )
    return out


def _config(res: dict[str, Any]) -> str:
    return str(res["name"]).rsplit("-s", 1)[0]


def lead_table(results: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Per configuration, over its seeds: each detector's lead (median, range), hits and false alarms."""
    out = ["| configuration | harmful | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for cfg in CONFIGS:
        runs = [r for r in results if _config(r) == "-".join(cfg)]
        if not runs:
            continue
        harmful = [r for r in runs if harm_step(r) is not None]
        cells = []
        for n in names:
            firsts = [(harm_step(r), detectors(r)[n]) for r in runs]
            leads = sorted(h - a for h, a in firsts if h is not None and a is not None)
            fa = sum(h is None and a is not None for h, a in firsts)
            cell = "-" if not leads else f"{_fmt(statistics.median(leads))} ({leads[0]:+d}..{leads[-1]:+d})"
            cell += f", {len(leads)}/{len(harmful)}" if harmful else ""
            cell += f", {fa} FA" if fa else ""
            cells.append(cell)
        out.append(f"| {'-'.join(cfg)} | {len(harmful)}/{len(runs)} | " + " | ".join(cells) + " |")
    return out


def seed_table(results: list[dict[str, Any]], names: list[str]) -> list[str]:
    """The spread over seeds: precision / recall / F1 of every detector per seed, and the F1's mean and sd."""
    seeds = [s for s in SEEDS if any(r["seed"] == s for r in results)]
    out = ["| detector | " + " | ".join(f"seed {s}: P / R / F1" for s in seeds) + " | F1 mean +- sd |"]
    out.append("|---|" + "---|" * (len(seeds) + 1))
    for n in names:
        per = [score([r for r in results if r["seed"] == s], n) for s in seeds]
        f1s = [p["f1"] for p in per]
        sd = statistics.stdev(f1s) if len(f1s) > 1 else 0.0
        out.append(
            f"| {n} | "
            + " | ".join(f"{p['precision']:.2f} / {p['recall']:.2f} / {p['f1']:.2f}" for p in per)
            + f" | {statistics.mean(f1s):.2f} +- {sd:.2f} |"
        )
    return out


def auc_table(results: list[dict[str, Any]], sz: Sizes, top: int = 20) -> list[str]:
    """AUC of every metric's early change as a predictor of harm: both signs over all stages, the sign
    chosen on the tuning half (seed 0) and that sign's AUC on the held-out half (seeds 1-2)."""
    keys = sorted({(k, r["layer"]) for res in results for r in res["records"] for k in r["metrics"]})
    tune = [i for i, r in enumerate(results) if r["seed"] == 0]
    held = [i for i, r in enumerate(results) if r["seed"] != 0]
    labels = [harm_step(r) is not None for r in results]
    rows = []
    for metric, layer in keys:
        ch = [early_change(r, metric, layer, sz.early) for r in results]
        if any(c is None for c in ch):
            continue
        drop = [-float(c) for c in ch]  # type: ignore[arg-type]
        a = auc(drop, labels)
        if math.isnan(a):
            continue
        at = auc([drop[i] for i in tune], [labels[i] for i in tune]) if tune else math.nan
        sign = "drop" if math.isnan(at) or at >= 0.5 else "rise"
        ah = auc([drop[i] for i in held], [labels[i] for i in held]) if held else math.nan
        if sign == "rise":
            at, ah = 1 - at, 1 - ah
        rows.append((max(a, 1 - a) if math.isnan(at) else at, metric, layer, a, sign, at, ah))
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    out = [
        f"AUC of the change from the stage start to step {sz.early} (drop: a fall predicts harm; the sign is "
        "chosen on seed 0 and judged on seeds 1-2; the top rows by seed 0, then the default rules' "
        "metrics):\n",
        "| metric | layer | AUC drop (all) | AUC rise (all) | sign (seed 0) | AUC seed 0 | AUC seeds 1-2 |",
        "|---|---|---|---|---|---|---|",
    ]
    shown = rows[:top] + [r for r in rows[top:] if r[2] == "final_norm" and r[1] in ("rankme", "rankme_pca")]
    for _, metric, layer, a, sign, at, ah in shown:  # the top rows, and the default rules' own metrics
        out.append(f"| {metric} | {layer} | {a:.2f} | {1 - a:.2f} | {sign} | {at:.2f} | {ah:.2f} |")
    return out


def tables(results: list[dict[str, Any]], sz: Sizes) -> str:
    """Every table of docs/EARLY_WARNING.md part 2, as markdown."""
    out: list[str] = []
    names = list(detectors(results[0]))
    out.append("| stage | harm step | " + " | ".join(names) + " |")
    out.append("|---|---|" + "---|" * len(names))
    for res in results:
        d = detectors(res)
        h = harm_step(res)
        cells = []
        for n in names:
            a = d[n]
            lead = "" if a is None or h is None else f" ({h - a:+d})"
            cells.append("-" if a is None else f"{a}{lead}")
        out.append(f"| {res['name']} | {'-' if h is None else h} | " + " | ".join(cells) + " |")
    harmful = sum(harm_step(r) is not None for r in results)
    out.append(
        f"\n{harmful} harmful, {len(results) - harmful} benign stages. Cells: first alert step (lead time).\n"
    )
    out.append(f"All {len(results)} stages:\n")
    out += score_table(results, names)
    tune = [r for r in results if r["seed"] == 0]
    held = [r for r in results if r["seed"] != 0]
    for title, part in (("The tuning half (seed 0)", tune), ("The held-out half (seeds 1-2)", held)):
        if part and len(part) < len(results):
            h = sum(harm_step(r) is not None for r in part)
            out.append(f"\n{title}, {h} harmful / {len(part) - h} benign:\n")
            out += score_table(part, names)
    out.append(
        "\nPer configuration over its seeds: lead median (range), alerts in harmful stages, false alarms:\n"
    )
    out += lead_table(results, names)
    out.append("\nThe spread over seeds:\n")
    out += seed_table(results, names)
    out.append("")
    out += auc_table(results, sz)
    out.append(calibrate(results))
    return "\n".join(out)


def calibrate(results: list[dict[str, Any]]) -> str:
    """Tune the two drop thresholds on seed 0, report the held-out seeds 1 and 2."""
    tune = [r for r in results if r["seed"] == 0]
    held = [r for r in results if r["seed"] != 0]
    if not tune or not held:
        return "\n(calibration needs seed 0 and seeds 1-2)"
    grid = [round(0.05 * i, 2) for i in range(1, 9)]
    best = None
    for a in grid:
        for b in grid:
            s = score(tune, "", first=lambda r, a=a, b=b: topomon_first(r, a, b))
            key = (s["f1"], s["lead_median"] if s["lead_median"] is not None else -999)
            if best is None or key > best[0]:
                best = (key, a, b)
    assert best is not None
    _, a, b = best
    old = score(held, "", first=lambda r: topomon_first(r))
    new = score(held, "", first=lambda r: topomon_first(r, a, b))
    return (
        f"\nCalibration: tuned on seed 0 -> rankme {a}, rankme_pca {b}. Held out (seeds 1-2): released "
        f"F1 {old['f1']:.2f}, lead median {_fmt(old['lead_median'])}, false alarms {old['false_alarms']}; "
        f"tuned F1 {new['f1']:.2f}, lead median {_fmt(new['lead_median'])}, "
        f"false alarms {new['false_alarms']}."
    )


def figure(results: list[dict[str, Any]], path: str) -> None:
    """One harmful and one benign stage with every detector's first alert marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    harmful = next((r for r in results if harm_step(r) is not None), None)
    benign = next((r for r in results if harm_step(r) is None), None)
    picks = [r for r in (harmful, benign) if r is not None]
    fig, axes = plt.subplots(
        4,
        len(picks),
        figsize=(6.5 * len(picks), 10),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 3, 3, 1.4]},
    )
    names = list(detectors(picks[0]))
    palette = [
        "tab:blue",
        "tab:cyan",
        "tab:orange",
        "tab:green",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:olive",
    ]
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    for j, res in enumerate(picks):
        h = harm_step(res)
        d = detectors(res)
        ax = axes[0][j]
        ax.plot(*zip(*res["loss"], strict=True), color="k", lw=1.2)
        ax.set_ylabel("training loss (black)")
        ax2 = ax.twinx()
        ax2.plot(*zip(*res["grad_norm"], strict=True), color="0.6", lw=1)
        ax2.set_ylabel("grad norm (grey)")
        ax.set_title(f"{res['name']}: {'harmful' if h is not None else 'benign'}")
        ax = axes[1][j]
        for metric, thr in (("rankme", 15), ("rankme_pca", 25)):
            s = _series(res, metric, "final_norm")
            if s:
                line = ax.plot(
                    [x for x, _ in s], [100 * (v / s[0][1] - 1) for _, v in s], marker="o", ms=3, label=metric
                )
                ax.axhline(-thr, color=line[0].get_color(), ls=":", lw=1)
        ax.set_ylabel("final norm, % vs stage start")
        ax.legend(fontsize=8, title="dotted: default alert", title_fontsize=7, loc="lower left")
        ax = axes[2][j]
        b = res["base"]
        steps = [0] + sorted(int(k) for k in res["checkpoints"])
        ck = {0: b, **{int(k): v for k, v in res["checkpoints"].items()}}
        for key, label, thr in (
            ("ood_ppl", "OOD perplexity", HARM["ood_ratio"]),
            ("plasticity", "plasticity loss", HARM["plasticity_ratio"]),
        ):
            line = ax.plot(steps, [ck[s][key] / b[key] for s in steps], marker="s", ms=4, label=label)
            ax.axhline(thr, color=line[0].get_color(), ls=":", lw=1)
        ax.set_ylabel("x released model")
        ax.set_xlabel("step")
        ax3 = ax.twinx()
        ax3.plot(
            steps, [ck[s]["ece"] - b["ece"] for s in steps], marker="^", ms=4, color="tab:red", label="ECE"
        )
        ax3.axhline(HARM["ece_delta"], color="tab:red", ls=":", lw=1)
        ax3.set_ylabel("ECE - released (red)")
        ax.legend(fontsize=8, title="harm measures (dotted: threshold)", title_fontsize=7, loc="upper left")
        fired = [n for n in names if d[n] is not None]
        for ax in axes[:3, j]:
            ax.set_xlim(-1, max(s for s, _ in res["loss"]) + 1)
            if h is not None:
                ax.axvline(h, color="red", lw=4, alpha=0.3)
            for k, n in enumerate(fired):  # a small offset keeps alerts at one step apart
                ax.axvline(d[n] + 0.3 * (k - (len(fired) - 1) / 2), color=colors[n], ls="--", lw=1.4)
        ax = axes[3][j]
        ax.axis("off")
        cells = [f"harm step: {'none' if h is None else h}"]
        cells += [f"{n}: {'never' if d[n] is None else d[n]}" for n in names]
        half = (len(cells) + 1) // 2
        for col, chunk in enumerate((cells[:half], cells[half:])):
            ax.text(0.02 + 0.5 * col, 0.95, "\n".join(chunk), transform=ax.transAxes, fontsize=8, va="top")
    handles = [Line2D([], [], color="red", lw=4, alpha=0.3, label="harm step")]
    handles += [Line2D([], [], color=colors[n], ls="--", label=n) for n in names]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("the first alert of every detector (dashed) against the harm step (red band)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/early_warning")
    p.add_argument("--tiny", action="store_true", help="a tiny model built in memory (seconds per stage)")
    p.add_argument("--no-train", action="store_true", help="only the tables and figure, from saved JSON")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--configs", default="all", help="comma-separated stage configs, e.g. narrow-full-high")
    p.add_argument(
        "--harm", choices=sorted(HARMS), default="preregistered", help="the harm definition of the tables"
    )
    a = p.parse_args(argv)
    HARM.update(HARMS[a.harm])
    sz = Sizes(a.tiny)
    seeds = [int(s) for s in a.seeds.split(",")]
    cfgs = CONFIGS if a.configs == "all" else [tuple(c.split("-")) for c in a.configs.split(",")]
    for c in cfgs:
        if c not in CONFIGS:
            p.error(f"unknown config {'-'.join(c)}; choose from {', '.join('-'.join(x) for x in CONFIGS)}")
    if not a.no_train:
        todo = [(c, s) for s in seeds for c in cfgs]
        for i, (c, s) in enumerate(todo, 1):
            path = os.path.join(a.out, "stages", f"{stage_name(c, s)}.json")  # type: ignore[arg-type]
            if os.path.exists(path):
                print(f"[{i}/{len(todo)}] {stage_name(c, s)}: saved, skipped", flush=True)  # type: ignore[arg-type]
                continue
            res = run_stage(c, s, a.out, sz)  # type: ignore[arg-type]
            print(
                f"[{i}/{len(todo)}] {res['name']}: harm step {harm_step(res)}, {res['seconds']} s", flush=True
            )
    folder = os.path.join(a.out, "stages")
    results = [r for r in load_stages(folder) if r["tiny"] == sz.tiny]
    if not results:
        print(f"no saved stages in {folder}", file=sys.stderr)
        return 1
    text = f"Harm definition: {a.harm} {HARMS[a.harm]}\n\n" + tables(results, sz)
    suffix = "" if a.harm == "preregistered" else f"-{a.harm}"
    table_path, figure_path = (
        os.path.join(a.out, f"{n}{suffix}.{e}") for n, e in (("tables", "md"), ("stages", "png"))
    )
    with open(table_path, "w") as fh:
        fh.write(text + "\n")
    figure(results, figure_path)
    print(text)
    print(f"\ntables: {table_path}   figure: {figure_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
