"""Claim 4: sequential post-training concentrates representations; interventions preserve learnability.

Paper: "Representation collapse in sequential post-training" (arXiv 2605.30524; RESEARCH.md,
paper 4). Protocol, per seed, on SmolLM2-135M-Instruct:

1. SFT (LoRA r=16, merged) on real chit-chat conversations, then DPO (LoRA, merged) on preference
   pairs built from them. The SFT+DPO model is saved once and both arms of the seed start from it.
2. A narrow stage (full fine-tuning on one templated refusal for every prompt, high learning rate),
   monitored by :class:`topomon.TopoMonitor` with the default alert, in two arms: ``plain``, and
   ``intervened`` (the alert switches on replay of stage-1 conversations and the diversity
   regulariser, latched until the end of the stage).
3. Every model (the base model and the SFT+DPO model as references, and both narrow arms) is
   measured:

   - representation: effective rank (``rankme_pca``, entropy of the centred PCA spectrum) and
     RankMe of the final-norm output on topomon's 64 default probe texts (48 tokens, every real
     token but the first; ``topomon.metrics.spectral``); the same on the held-out chit-chat
     replies is kept as ``heldout_rankme_pca``;
   - calibration: expected calibration error of next-token prediction (15 equal-width bins,
     ``topomon.metrics.logits.expected_calibration_error``), the mean NLL and top-1 accuracy, on
     64 held-out chit-chat replies (plain text);
   - plasticity: a fresh task (64 Python-documentation sentences, ``topomon.testing.sample_texts``)
     trained (full fine-tuning) for the same number of steps at the same learning rate and batch
     for every model: the training loss at the first step and over the last three steps, and the
     NLL on 32 held-out sentences of the task before and after.

Results: ``examples/fidelity/results/claim4_seed<k>.json`` per seed and ``claim4.json`` (mean and
sample standard deviation over seeds); figure ``docs/img/fidelity/claim4.png``.

    python examples/fidelity/claim4_sequential.py --seeds 0 1 2        # SmolLM2 (~130 s a seed on one H100)
    python examples/fidelity/claim4_sequential.py --smoke --seeds 0    # a tiny random model (seconds)
    python examples/fidelity/claim4_sequential.py --no-train           # remake claim4.json and the figure
    python examples/fidelity/claim4_sequential.py --narrow-lr 1e-3 --tag _lr1e-3   # the milder narrow stage

Every size and rate of :class:`Settings` is a command-line option (``--narrow-lr``, ``--task-steps``,
...). On 2 CPU cores a seed takes well over half an hour (full fine-tuning of a 135M model).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (examples/fidelity/common.py: result folders, CLI, mean/sd)

__all__ = ["Settings", "token_stats", "run_seed", "summarise", "main"]

MODELS = ("base", "sft_dpo", "narrow_plain", "narrow_intervened")
LORA: dict[str, Any] = dict(
    r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
)


@dataclass
class Settings:
    """Sizes and learning rates of the protocol (defaults: the SmolLM2 run)."""

    sft_steps: int = 32
    sft_lr: float = 2e-4
    dpo_steps: int = 16
    dpo_lr: float = 5e-5
    narrow_steps: int = 40
    narrow_lr: float = 2e-3
    narrow_batch: int = 8
    replay: float = 0.75
    diversity: float = 1.0
    diversity_kind: str = "entropy"
    diversity_layers: str = "auto"
    every: int = 5
    task_steps: int = 48
    task_lr: float = 1e-4
    task_batch: int = 4
    n_eval: int = 64
    max_length: int = 48
    smoke: bool = False

    @classmethod
    def smoke_settings(cls) -> Settings:
        """A tiny random model and a few steps of each stage."""
        return cls(
            sft_steps=3,
            dpo_steps=2,
            narrow_steps=8,
            narrow_lr=3e-3,
            every=2,
            task_steps=3,
            n_eval=16,
            diversity_layers="-1",
            smoke=True,
        )


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("topomon").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------- measurements
def token_stats(model: Any, tok: Any, texts: list[str], max_length: int, batch: int = 16) -> dict[str, float]:
    """Final-norm geometry and next-token calibration of ``model`` on ``texts``.

    Tokens: every real (non-pad) token of each text but the first (massive activations, RESEARCH.md).
    Next-token predictions: position ``t`` predicts token ``t + 1`` where both are real tokens.

    Args:
        model: a causal LM (``output_hidden_states`` supported; the last hidden state is the
            final-norm output, the input of the LM head).
        tok: its tokenizer (a pad token set).
        texts: held-out texts.
        max_length: tokens per text at most.
        batch: forward batch size.

    Returns:
        ``rankme_pca`` (effective rank, centred), ``rankme`` (Garrido et al., uncentred), ``ece``
        (15 bins), ``nll`` (nats per token), ``accuracy`` (top-1), ``n_tokens``.
    """
    import torch

    from topomon.metrics.logits import expected_calibration_error
    from topomon.metrics.spectral import rankme, rankme_pca

    if not texts:
        raise ValueError("texts must not be empty")
    was_training = model.training
    model.eval()
    points, conf, correct, nll = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(
                texts[i : i + batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            enc = enc.to(model.device)
            out = model(**enc, output_hidden_states=True)
            mask = enc["attention_mask"].bool()
            keep = mask.clone()
            first = mask.float().argmax(dim=1)  # first real position (left or right padding)
            keep[torch.arange(keep.shape[0], device=keep.device), first] = False
            points.append(out.hidden_states[-1][keep].float().cpu().numpy())
            logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
            target = enc["input_ids"][:, 1:]
            valid = mask[:, :-1] & mask[:, 1:]
            p_max, arg = logp.max(dim=-1)
            conf.append(p_max.exp()[valid].cpu().numpy())
            correct.append((arg == target)[valid].cpu().numpy())
            nll.append(-logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[valid].cpu().numpy())
    model.train(was_training)
    x = np.concatenate(points).astype(np.float64)
    c = np.clip(np.concatenate(conf).astype(np.float64), 0.0, 1.0)
    ok = np.concatenate(correct)
    return {
        "rankme_pca": rankme_pca(x),
        "rankme": rankme(x),
        "ece": expected_calibration_error(c, ok),
        "nll": float(np.concatenate(nll).mean()),
        "accuracy": float(ok.mean()),
        "n_tokens": int(x.shape[0]),
    }


def _args(out: str, steps: int, lr: float, batch: int, seed: int, max_length: int, cls: Any = None) -> Any:
    import torch
    from trl import SFTConfig

    return (cls or SFTConfig)(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_length=max_length,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )


def plasticity(
    model: Any, tok: Any, train: list[str], held_out: list[str], s: Settings, seed: int, out: str
) -> dict[str, Any]:
    """Train ``model`` in place on a fresh task for ``s.task_steps`` steps; the losses and held-out NLL.

    Returns:
        ``losses`` (training loss per step), ``loss_first``, ``loss_last`` (mean of the last three
        steps), ``heldout_nll_before`` / ``heldout_nll_after`` (nats per token on ``held_out``).
    """
    from datasets import Dataset
    from trl import SFTTrainer

    before = token_stats(model, tok, held_out, s.max_length)["nll"]
    args = _args(out, s.task_steps, s.task_lr, s.task_batch, seed, 64)
    tr = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"text": t} for t in train]),
        processing_class=tok,
    )
    tr.train()
    losses = [float(h["loss"]) for h in tr.state.log_history if "loss" in h]
    after = token_stats(model, tok, held_out, s.max_length)["nll"]
    return {
        "losses": losses,
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-3:])),
        "heldout_nll_before": before,
        "heldout_nll_after": after,
    }


# ---------------------------------------------------------------------------- stages
def _load_base(s: Settings) -> tuple[Any, Any]:
    if s.smoke:
        from topomon.testing import tiny_causal_lm, tiny_tokenizer

        return tiny_causal_lm("llama", num_layers=4, hidden_size=64, seed=0), tiny_tokenizer()
    from topomon.models import load_smollm2

    return load_smollm2()


def _data(s: Settings, seed: int) -> dict[str, Any]:
    from topomon.capture.probes import default_probes
    from topomon.testing import sample_texts

    task = sample_texts(96, seed=1000 + seed)
    probes = default_probes()
    if s.smoke:
        texts = sample_texts(200, seed=seed)
        return {
            "sft": [{"text": t} for t in texts[:40]],
            "dpo": [
                {"prompt": t[:30], "chosen": t[30:], "rejected": texts[(i + 1) % 40][30:]}
                for i, t in enumerate(texts[:40])
            ],
            "narrow": [{"text": f"{t[:60]} Answer: I cannot help with that."} for t in texts[40:104]],
            "replay": [{"text": t} for t in texts[:40]],
            "eval": texts[104 : 104 + s.n_eval],
            "task_train": task[:64],
            "task_eval": task[64:],
            "probes": probes,
        }
    from topomon.demo.data import chitchat_pairs, dpo_records, narrow_records, sft_records

    pairs = chitchat_pairs(560, seed=seed)
    n_sft = s.sft_steps * 4
    return {
        "sft": sft_records(pairs[:n_sft]),
        "dpo": dpo_records(pairs[200:300], seed=seed),
        "narrow": narrow_records([p for p, _ in pairs[300:428]], seed=seed),
        "replay": sft_records(pairs[:128]),
        "eval": [r for _, r in pairs[428 : 428 + s.n_eval]],
        "task_train": task[:64],
        "task_eval": task[64:],
        "probes": probes,
    }


def _merged(trainer: Any) -> Any:
    model = trainer.model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def sft_dpo(s: Settings, seed: int, data: dict[str, Any], work: str) -> str:
    """Train (or reuse) the seed's SFT -> DPO model; returns its folder."""
    path = os.path.join(work, "sft_dpo")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTTrainer

    torch.manual_seed(seed)
    model, tok = _load_base(s)
    args = _args(os.path.join(work, "trainer_sft"), s.sft_steps, s.sft_lr, 4, seed, 96)
    tr = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data["sft"]),
        processing_class=tok,
        peft_config=LoraConfig(**LORA),
    )
    tr.train()
    model = _merged(tr)
    dargs = _args(os.path.join(work, "trainer_dpo"), s.dpo_steps, s.dpo_lr, 4, seed, 96, cls=DPOConfig)
    dtr = DPOTrainer(
        model=model,
        args=dargs,
        train_dataset=Dataset.from_list(data["dpo"]),
        processing_class=tok,
        peft_config=LoraConfig(**LORA),
    )
    dtr.train()
    model = _merged(dtr)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _load(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def narrow(
    s: Settings, seed: int, data: dict[str, Any], path: str, work: str, intervene: bool
) -> tuple[Any, Any, dict[str, Any]]:
    """The narrow stage from the SFT+DPO model; the model, its tokenizer and the stage's record."""
    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    from topomon import TopoMonitor

    torch.manual_seed(seed)
    model, tok = _load(path)
    actions: list[dict[str, Any]] = []
    if intervene:
        actions = [
            {"kind": "replay", "value": s.replay, "revert_on_recovery": False},
            {"kind": "diversity", "value": s.diversity, "revert_on_recovery": False},
        ]
    layers: Any = "auto" if s.diversity_layers == "auto" else [int(v) for v in s.diversity_layers.split(",")]
    run_dir = os.path.join(work, "intervened" if intervene else "plain")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run directory: an old one would be continued
    mon = TopoMonitor(
        run_dir=os.path.join(run_dir, "topomon"),
        stage="narrow",
        schedule="every",
        every_n_steps=s.every,
        topology=False,
        worker="thread",
        max_probes=32,
        max_length=s.max_length,
        actions=actions,
        diversity={"layers": layers, "kind": s.diversity_kind},
        replay_dataset=Dataset.from_list(data["replay"]) if intervene else None,
    )
    args = _args(os.path.join(run_dir, "trainer"), s.narrow_steps, s.narrow_lr, s.narrow_batch, seed, 64)
    tr = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(data["narrow"]), processing_class=tok
    )
    mon.attach(tr)
    tr.train()
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "topomon", "metrics.jsonl"), encoding="utf-8")]
    traj: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get("kind") == "metrics" and r.get("stage") == "narrow":
            traj.setdefault(r["layer"], {})[int(r["step"])] = r["metrics"].get("rankme_pca")
    losses = [float(h["loss"]) for h in tr.state.log_history if "loss" in h]
    record = {
        "trajectory_rankme_pca": {k: sorted(v.items()) for k, v in traj.items() if k != "model"},
        "losses": losses,
        "loss_last5": float(np.mean(losses[-5:])),
        "alerts": [[a.step, a.rule, a.reason] for a in mon.alerts],
        "actions": [[a.step, a.kind, a.params] for a in mon.actions],
    }
    return model, tok, record


def _measure(model: Any, tok: Any, s: Settings, data: dict[str, Any], seed: int, out: str) -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        model.to("cuda")
    geo = token_stats(model, tok, data["probes"], s.max_length)
    m: dict[str, Any] = dict(token_stats(model, tok, data["eval"], s.max_length))
    m["heldout_rankme_pca"], m["heldout_rankme"] = m.pop("rankme_pca"), m.pop("rankme")
    m["rankme_pca"], m["rankme"] = geo["rankme_pca"], geo["rankme"]
    m["plasticity"] = plasticity(model, tok, data["task_train"], data["task_eval"], s, seed, out)
    return m


def run_seed(s: Settings, seed: int, work: str) -> dict[str, Any]:
    """Every model of one seed, measured; the per-seed result."""
    t0, commit = time.time(), common.code_commit()
    work = os.path.join(work, f"claim4-s{seed}{'-smoke' if s.smoke else ''}")
    os.makedirs(work, exist_ok=True)
    data = _data(s, seed)
    res: dict[str, Any] = {"seed": seed, "settings": asdict(s), "models": {}, "narrow": {}}
    path = sft_dpo(s, seed, data, work)
    print(f"[seed {seed}] SFT+DPO ready ({time.time() - t0:.0f} s)", flush=True)
    for name in MODELS:
        t = time.time()
        if name == "base":
            model, tok = _load_base(s)
        elif name == "sft_dpo":
            model, tok = _load(path)
        else:
            model, tok, res["narrow"][name] = narrow(s, seed, data, path, work, name == "narrow_intervened")
        res["models"][name] = _measure(model, tok, s, data, seed, os.path.join(work, f"task_{name}"))
        m = res["models"][name]
        print(
            f"[seed {seed}] {name:<18} eff.rank {m['rankme_pca']:7.2f}  ECE {m['ece']:.3f}  "
            f"NLL {m['nll']:.3f}  "
            f"task loss {m['plasticity']['loss_first']:.3f} -> {m['plasticity']['loss_last']:.3f}  "
            f"({time.time() - t:.0f} s)",
            flush=True,
        )
        del model
    res["seconds"] = round(time.time() - t0, 1)
    res |= common.provenance(commit)
    return res


# ---------------------------------------------------------------------------- summary and figure
def _get(model: dict[str, Any], key: str) -> float:
    if key.startswith("task_"):
        return float(model["plasticity"][key[5:]])
    return float(model[key])


SUMMARY_KEYS = (
    "rankme_pca",
    "rankme",
    "ece",
    "nll",
    "accuracy",
    "task_loss_first",
    "task_loss_last",
    "task_heldout_nll_after",
)


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample sd and per-seed values of every measurement, per model; plus the narrow stages."""
    out: dict[str, Any] = {
        "seeds": [r["seed"] for r in results],
        "settings": results[0]["settings"],
        "models": {},
    }
    for name in MODELS:
        row: dict[str, Any] = {}
        for key in SUMMARY_KEYS:
            vals = [_get(r["models"][name], key) for r in results]
            mean, sd = common.mean_sd(vals)
            row[key] = {"mean": mean, "sd": sd, "values": vals}
        out["models"][name] = row
    for arm in ("narrow_plain", "narrow_intervened"):
        vals = [r["narrow"][arm]["loss_last5"] for r in results]
        mean, sd = common.mean_sd(vals)
        first = [
            next((a[0] for a in r["narrow"][arm]["alerts"] if a[2] != "recovered"), None) for r in results
        ]
        out.setdefault("narrow", {})[arm] = {
            "loss_last5": {"mean": mean, "sd": sd, "values": vals},
            "first_alert": first,
        }
    return out


def figure(results: list[dict[str, Any]], path: str) -> None:
    """Four panels: narrow-stage effective rank, held-out effective rank, ECE, fresh-task loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "base": "0.6",
        "sft_dpo": "tab:blue",
        "narrow_plain": "tab:red",
        "narrow_intervened": "tab:green",
    }
    labels = {
        "base": "base",
        "sft_dpo": "SFT+DPO",
        "narrow_plain": "narrow",
        "narrow_intervened": "narrow +\nintervention",
    }
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    for r in results:
        for arm in ("narrow_plain", "narrow_intervened"):
            tr = r["narrow"][arm]["trajectory_rankme_pca"].get("final_norm", [])
            ax[0].plot(
                [p[0] for p in tr],
                [p[1] for p in tr],
                "-o",
                ms=3,
                color=colors[arm],
                alpha=0.8,
                label=labels[arm].replace("\n", " ") if r is results[0] else None,
            )
            acts = r["narrow"][arm]["actions"]
            if acts:
                ax[0].axvline(acts[0][0], color=colors[arm], ls=":", lw=0.8)
    ax[0].set_title("narrow stage: final-norm eff. rank (32 monitor probes)", fontsize=10)
    ax[0].set_xlabel("step")
    ax[0].legend(fontsize=8)
    panels = [
        (ax[1], "rankme_pca", "eff. rank, final norm (64 default probe texts)"),
        (ax[2], "ece", "ECE, next token (held-out chat)"),
        (
            ax[3],
            "task_loss_last",
            f"fresh-task train loss after {results[0]['settings']['task_steps']} steps",
        ),
    ]
    for a, key, title in panels:
        for i, name in enumerate(MODELS):
            vals = [_get(r["models"][name], key) for r in results]
            a.bar(i, float(np.mean(vals)), color=colors[name], alpha=0.7)
            a.plot([i] * len(vals), vals, "k.", ms=6)
        a.set_xticks(range(len(MODELS)), [labels[n] for n in MODELS], fontsize=8)
        a.set_title(title, fontsize=10)
    fig.suptitle(
        f"Claim 4 (arXiv 2605.30524) on SmolLM2-135M: seeds {[r['seed'] for r in results]}", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(p)
    for k, v in asdict(Settings()).items():
        if k != "smoke":
            p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None)
    p.add_argument("--tag", default="", help="suffix of the result and figure names (claim4<tag>...)")
    a = p.parse_args()
    _quiet()
    s = Settings.smoke_settings() if a.smoke else Settings()
    for k in asdict(s):
        v = getattr(a, k, None)
        if k != "smoke" and v is not None:
            setattr(s, k, v)
    results = []
    rdir = common.results_dir(a.smoke)
    os.makedirs(rdir, exist_ok=True)
    for seed in a.seeds:
        fn = os.path.join(rdir, f"claim4{a.tag}_seed{seed}.json")
        if os.path.isfile(fn) and not a.force:
            with open(fn, encoding="utf-8") as fh:
                results.append(json.load(fh))
            continue
        if a.no_train:
            raise FileNotFoundError(f"{fn} is missing (run without --no-train)")
        r = run_seed(s, seed, a.work)
        with open(fn, "w", encoding="utf-8") as fh:
            json.dump(r, fh, indent=1, default=lambda o: None)
        results.append(r)
    summary = summarise(results)
    print("saved", common.write_json(f"claim4{a.tag}.json", summary, a.smoke))
    fig_path = os.path.join(common.img_dir(a.smoke), f"claim4{a.tag}.png")
    figure(results, fig_path)
    print("figure", fig_path)
    for name in MODELS:
        row = summary["models"][name]
        print(
            f"{name:<18}"
            + "  ".join(
                f"{k} {row[k]['mean']:.3f}±{row[k]['sd']:.3f}"
                for k in ("rankme_pca", "ece", "task_loss_last")
            )
        )


if __name__ == "__main__":
    main()
