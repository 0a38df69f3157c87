"""Claim 3: SFT and DPO are "entropy-seeking" (effective rank rises, alpha-ReQ falls).

Spectral-geometry paper (Li et al., arXiv 2509.23024): on the final-layer, last-token
representations of many documents, SFT and DPO expand the spectrum (RankMe / effective rank up,
alpha-ReQ down); RLVR compresses it. Here, SmolLM2-135M-Instruct:

- LoRA SFT on real chit-chat replies at two learning rates (2e-4, the claim-1 runs, and 8e-4), 3 seeds;
- full fine-tuning at lr 5e-5 (the claim-1 runs; packaged probes only), 3 seeds;
- DPO (LoRA, lr 1e-4, 8 steps) on chit-chat preference pairs after the lr-2e-4 SFT, 3 seeds;
- three probe sets, each its own monitor: the packaged probes (all tokens), 32 pydoc sentences (all
  tokens), 96 further pydoc sentences (last token only: the paper's pooling);
- every captured layer; the change of RankMe (uncentred, Garrido et al.), effective rank (centred
  PCA entropy, Li et al.'s) and alpha-ReQ from the start to the end of each stage.

    python examples/fidelity/claim3_entropy.py            # trains what is missing
    python examples/fidelity/claim3_entropy.py --no-train # numbers and figure from saved results
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
from claim1_transient import full_ft_spec
from common import (
    Spec,
    add_common_arguments,
    helpful_spec,
    img_dir,
    layers_of,
    mean_sd,
    run_many,
    series,
    write_json,
)

__all__ = ["high_lr_spec", "stage_change", "main"]

METRICS = ("rankme", "rankme_pca", "alpha_req")
PROBES = ("main", "pydoc", "pydoc_last")
PROBE_LABEL = {
    "main": "packaged probes, all tokens",
    "pydoc": "pydoc x32, all tokens",
    "pydoc_last": "pydoc x96, last token",
}
ENTROPY_SIGN = {"rankme": 1, "rankme_pca": 1, "alpha_req": -1}  # the sign of "entropy-seeking"


def high_lr_spec(seed: int, smoke: bool) -> Spec:
    """SFT at the higher learning rate (8e-4), sparse main captures, the extra probe sets."""
    if smoke:
        return Spec("helpful", seed, lr=8e-4, steps=4, every=2, extra_probes=True, smoke=True)
    return Spec("helpful", seed, lr=8e-4, steps=helpful_spec(seed, False).steps, every=10, extra_probes=True)


def stage_change(r: dict[str, Any], metric: str, layer: str, probes: str, stage: str) -> float:
    """Percent change of a metric from the stage's first capture to its last (NaN if missing)."""
    s, v = series(r, metric, layer, probes=probes, stage=stage)
    if v.size < 2 or not np.isfinite(v[[0, -1]]).all() or v[0] == 0:
        return float("nan")
    return float(100 * (v[-1] / v[0] - 1))


def summarise(conditions: dict[str, tuple[list[dict[str, Any]], str]]) -> dict[str, Any]:
    """``{condition: {probes: {layer: {metric: {per_seed, mean, sd, entropy_seeking_seeds}}}}}``."""
    out: dict[str, Any] = {}
    for cond, (results, stage) in conditions.items():
        per_probe: dict[str, Any] = {}
        for probes in PROBES:
            per_layer: dict[str, Any] = {}
            for layer in layers_of(results[0], probes, stage):
                per_layer[layer] = {}
                for m in METRICS:
                    vals = [stage_change(r, m, layer, probes, stage) for r in results]
                    mu, sd = mean_sd(vals)
                    per_layer[layer][m] = {
                        "per_seed": vals,
                        "mean": mu,
                        "sd": sd,
                        "entropy_seeking_seeds": int(sum(ENTROPY_SIGN[m] * v > 0 for v in vals)),
                    }
            per_probe[probes] = per_layer
        out[cond] = per_probe
    return out


def figure(summary: dict[str, Any], path: str) -> None:
    """Rows: conditions; columns: metrics; x: layer; one series per probe set (mean ± sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(summary)
    fig, axes = plt.subplots(len(conds), len(METRICS), figsize=(13, 3.2 * len(conds)), squeeze=False)
    colours = {"main": "tab:blue", "pydoc": "tab:orange", "pydoc_last": "tab:green"}
    for i, cond in enumerate(conds):
        for j, m in enumerate(METRICS):
            ax = axes[i, j]
            for k, probes in enumerate(PROBES):
                per_layer = summary[cond][probes]
                if not per_layer:
                    continue
                layers = list(per_layer)
                x = np.arange(len(layers)) + (k - 1) * 0.12
                mu = [per_layer[ly][m]["mean"] for ly in layers]
                sd = [per_layer[ly][m]["sd"] for ly in layers]
                ax.errorbar(
                    x,
                    mu,
                    yerr=sd,
                    fmt="o-",
                    ms=4,
                    capsize=3,
                    color=colours[probes],
                    label=PROBE_LABEL[probes],
                )
                for ly_i, ly in enumerate(layers):
                    vals = per_layer[ly][m]["per_seed"]
                    ax.scatter(
                        [x[ly_i]] * len(vals),
                        vals,
                        s=6,
                        color=colours[probes],
                        alpha=0.5,
                    )
            ax.axhline(0, color="k", lw=0.8)
            main_layers = list(summary[cond]["main"])
            ax.set_xticks(
                range(len(main_layers)), [ly.replace("layer_", "L") for ly in main_layers], fontsize=8
            )
            ax.set_title(f"{cond}: {m} change (%)", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        "Claim 3: stage start -> end change per layer (mean ± sd over seeds, dots = seeds); "
        "entropy-seeking = RankMe / eff. rank up, alpha down",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    a = p.parse_args(argv)
    low = run_many([helpful_spec(s, a.smoke) for s in a.seeds], a)
    high = run_many([high_lr_spec(s, a.smoke) for s in a.seeds], a)
    full = run_many([full_ft_spec(s, a.smoke) for s in a.seeds], a)

    def lr(x: float) -> str:
        return f"{x:.0e}".replace("e-0", "e-")

    conditions = {
        f"SFT lr {lr(low[0]['spec']['lr'])}": (low, "sft"),
        f"SFT lr {lr(high[0]['spec']['lr'])}": (high, "sft"),
        f"DPO lr {lr(low[0]['spec']['dpo_lr'])} (after SFT lr {lr(low[0]['spec']['lr'])})": (low, "dpo"),
    }
    if full:  # the claim-1 full fine-tuning runs (packaged probes only): the scratch run's setting
        conditions[f"SFT full fine-tuning lr {lr(full[0]['spec']['lr'])}"] = (full, "sft")
    summary = summarise(conditions)
    summary["runs"] = {c: [r["run_id"] for r in rs] for c, (rs, _) in conditions.items()}
    write_json("claim3_summary.json", summary, a.smoke)
    png = os.path.join(img_dir(a.smoke), "claim3_entropy.png")
    figure({c: summary[c] for c in conditions}, png)
    print(f"figure: {png}")
    for cond, (rs, _) in conditions.items():
        n = len(rs)
        print(f"\n{cond}  (final_norm; mean ± sd over {n} seeds; [seeds entropy-seeking])")
        for probes in PROBES:
            row = summary[cond][probes].get("final_norm", {})
            cells = [
                f"{m} {row[m]['mean']:+.1f}% ± {row[m]['sd']:.1f} [{row[m]['entropy_seeking_seeds']}/{n}]"
                for m in METRICS
                if m in row
            ]
            print(f"  {PROBE_LABEL[probes]:<30}" + "   ".join(cells))
        for m in METRICS:
            print(f"  {m} by layer (mean % change; packaged / pydoc all / pydoc last):")
            for ly in summary[cond]["main"]:
                vals = [summary[cond][pr].get(ly, {}).get(m, {}).get("mean", float("nan")) for pr in PROBES]
                print(f"    {ly:<11}" + " / ".join(f"{v:+6.1f}" for v in vals))
    return summary


if __name__ == "__main__":
    main()
