"""Claim 2: different fine-tuning objectives give distinguishable metric trajectories.

Persistent-homology paper (arXiv 2606.19542): SFT with helpful, harmless and mixed objectives gives
distinguishable topological trajectories. Here: LoRA SFT of SmolLM2-135M-Instruct on the same
prompts answered with the real reply ("helpful"), a templated refusal ("refusal",
``topomon.demo.data.narrow_records``) or half each ("mixed"), 3 seeds each (a seed draws its own
prompts and sets the LoRA init and data order); the helpful runs are those of claim 1.

A run's trajectory is the vector of its metrics at every shared capture step after step 0 (every
captured layer), each as a change against the (identical) base model: log ratio for the spectral
and persistence metrics, the raw value for the H1 drift to step 0. Features are z-scored across
runs. Reported: leave-one-out nearest-centroid accuracy (chance 1/3) with an exact permutation
p-value over all 1,680 distinct labellings, and the mean distance between runs of different
objectives against the seed-to-seed distance within an objective, for all features and for
feature families (spectral only, topology only, model-level logits), also on the first 10 steps only.

    python examples/fidelity/claim2_objectives.py            # trains what is missing
    python examples/fidelity/claim2_objectives.py --no-train # numbers and figure from saved results
"""

from __future__ import annotations

import argparse
import itertools
import os
from typing import Any

import numpy as np
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

__all__ = ["objective_spec", "trajectory_features", "loo_nearest_centroid", "permutation_p", "main"]

OBJECTIVES = ("helpful", "mixed", "refusal")
SPECTRAL = ("rankme", "rankme_pca", "alpha_req", "participation_ratio", "anisotropy")
TOPOLOGY = ("h0_total_persistence", "h1_total_persistence", "h1_entropy", "topo_drift")
LOGITS = ("logit_entropy", "logit_nll", "logit_top1_prob")
FAMILIES = {
    "all hidden-state": SPECTRAL + TOPOLOGY,
    "spectral": SPECTRAL,
    "topology": TOPOLOGY,
    "logits (model)": LOGITS,
}
RAW = {"topo_drift", "anisotropy"}  # compared as differences, not log ratios


def objective_spec(objective: str, seed: int, smoke: bool) -> Spec:
    """The run of one objective and seed (``helpful`` is the shared claim-1 run)."""
    if objective == "helpful":
        return helpful_spec(seed, smoke)
    if smoke:
        return Spec(objective, seed, steps=4, every=1, smoke=True)
    return Spec(objective, seed, steps=helpful_spec(seed, False).steps, every=4)


def _feature(r: dict[str, Any], metric: str, layer: str, steps: np.ndarray) -> np.ndarray:
    s, v = series(r, metric, layer)
    if s.size == 0 or not np.isin(steps, s).all():
        return np.full(steps.size, np.nan)
    base = v[s == 0][0] if (s == 0).any() else np.nan
    x = v[np.searchsorted(s, steps)]
    if metric in RAW:
        return x - (0.0 if metric == "topo_drift" else base)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.abs(x) / abs(base))


def trajectory_features(
    results: list[dict[str, Any]], metrics: tuple[str, ...], max_step: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """``(n_runs, n_features)`` z-scored trajectory features and their names.

    Steps are those captured in every run (after step 0, up to ``max_step``); features with a NaN in
    any run or no spread across runs are dropped.
    """
    common_steps = set(series(results[0], "rankme", "final_norm")[0].tolist())
    for r in results[1:]:
        common_steps &= set(series(r, "rankme", "final_norm")[0].tolist())
    steps = np.array(sorted(s for s in common_steps if s > 0 and (max_step is None or s <= max_step)))
    cols, names = [], []
    for metric in metrics:
        layers = ["model"] if metric.startswith("logit_") else layers_of(results[0])
        for layer in layers:
            block = np.vstack([_feature(r, metric, layer, steps) for r in results])
            for j, st in enumerate(steps):
                cols.append(block[:, j])
                names.append(f"{metric}/{layer}@{st}")
    x = np.column_stack(cols)
    ok = np.isfinite(x).all(0) & (x.std(0) > 0)
    x = x[:, ok]
    x = (x - x.mean(0)) / x.std(0)
    return x, [n for n, k in zip(names, ok, strict=True) if k]


def loo_nearest_centroid(x: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Leave-one-out nearest-centroid accuracy (Euclidean) and the predicted labels.

    Args:
        x: ``(n, f)`` features.
        labels: ``(n,)`` integer classes.
    """
    pred = np.empty_like(labels)
    for i in range(len(labels)):
        rest = np.arange(len(labels)) != i
        classes = np.unique(labels[rest])
        cents = np.vstack([x[rest & (labels == c)].mean(0) for c in classes])
        pred[i] = classes[int(np.argmin(((cents - x[i]) ** 2).sum(1)))]
    return float((pred == labels).mean()), pred


def permutation_p(x: np.ndarray, labels: np.ndarray) -> float:
    """Exact p-value of the LOO accuracy: share of distinct relabellings (same class sizes) doing as well."""
    acc, _ = loo_nearest_centroid(x, labels)
    labellings = sorted(set(itertools.permutations(labels.tolist())))
    hits = sum(loo_nearest_centroid(x, np.array(lab))[0] >= acc - 1e-12 for lab in labellings)
    return hits / len(labellings)


def distances(x: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Mean pairwise distance within each objective and between each pair of objectives."""
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    out: dict[str, Any] = {}
    within = []
    for a in np.unique(labels):
        idx = np.where(labels == a)[0]
        w = [d[i, j] for i, j in itertools.combinations(idx, 2)]
        within += w
        out[f"within {OBJECTIVES[a]}"] = float(np.mean(w))
    out["within (all)"] = float(np.mean(within))
    for a, b in itertools.combinations(np.unique(labels), 2):
        bet = d[np.ix_(labels == a, labels == b)].ravel()
        out[f"{OBJECTIVES[a]} vs {OBJECTIVES[b]}"] = float(bet.mean())
        out[f"{OBJECTIVES[a]} vs {OBJECTIVES[b]} / within"] = float(bet.mean() / np.mean(within))
    out["matrix"] = d.round(3).tolist()
    return out


def figure(results: list[dict[str, Any]], labels: np.ndarray, x: np.ndarray, path: str) -> None:
    """Trajectories of a few final-norm metrics per run (coloured by objective) and the distance matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"helpful": "tab:blue", "mixed": "tab:purple", "refusal": "tab:red"}
    panels = [
        ("rankme", "final_norm", "RankMe, final norm (% vs base)"),
        ("rankme_pca", "final_norm", "effective rank (PCA), final norm (% vs base)"),
        ("alpha_req", "final_norm", "alpha-ReQ, final norm (% vs base)"),
        ("h1_total_persistence", "final_norm", "H1 total persistence, final norm (% vs base)"),
        ("topo_drift", "final_norm", "H1 drift to step 0, final norm"),
        ("logit_nll", "model", "probe NLL (nats, % vs base)"),
    ]
    fig = plt.figure(figsize=(14, 7.5))
    gs = fig.add_gridspec(2, 4)
    axes = [fig.add_subplot(gs[i // 3, i % 3]) for i in range(6)]
    for ax, (metric, layer, title) in zip(axes, panels, strict=True):
        for r, lab in zip(results, labels, strict=True):
            s, v = series(r, metric, layer)
            y = v if metric == "topo_drift" else 100 * (v / v[0] - 1)
            ax.plot(s, y, "o-", ms=2.5, lw=1.2, color=colours[OBJECTIVES[lab]], alpha=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("SFT step", fontsize=8)
        ax.grid(alpha=0.3)
    for name, c in colours.items():
        axes[0].plot([], [], color=c, label=name)
    axes[0].legend(fontsize=8)
    ax = fig.add_subplot(gs[:, 3])
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    im = ax.imshow(d, cmap="magma_r")
    ticks = [f"{OBJECTIVES[lab][:4]} s{r['spec']['seed']}" for r, lab in zip(results, labels, strict=True)]
    ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
    ax.set_title("trajectory distance\n(all hidden-state features, z-scored)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(
        f"Claim 2: SFT objectives on SmolLM2-135M-Instruct (LoRA, lr 2e-4; {len(results)} runs)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    a = p.parse_args(argv)
    results, labels = [], []
    for k, obj in enumerate(OBJECTIVES):
        got = run_many([objective_spec(obj, s, a.smoke) for s in a.seeds], a)
        results += got
        labels += [k] * len(got)
    lab = np.array(labels)
    summary: dict[str, Any] = {"runs": [r["run_id"] for r in results], "labels": labels, "families": {}}
    windows = {"all steps": None, "steps <= 10": 2 if a.smoke else 10}
    for fam, metrics in FAMILIES.items():
        for wname, max_step in windows.items():
            x, names = trajectory_features(results, metrics, max_step)
            acc, pred = loo_nearest_centroid(x, lab)
            summary["families"][f"{fam}, {wname}"] = {
                "n_features": len(names),
                "loo_accuracy": acc,
                "predicted": [OBJECTIVES[i] for i in pred],
                "permutation_p": permutation_p(x, lab),
                "distances": {k: v for k, v in distances(x, lab).items() if k != "matrix"},
            }
    x_all, _ = trajectory_features(results, FAMILIES["all hidden-state"])
    summary["distance_matrix_all"] = distances(x_all, lab)["matrix"]
    end = {}
    for k, obj in enumerate(OBJECTIVES):
        rs = [r for r, lb in zip(results, labels, strict=True) if lb == k]
        end[obj] = {
            m: mean_sd(
                [100 * (series(r, m, "final_norm")[1][-1] / series(r, m, "final_norm")[1][0] - 1) for r in rs]
            )
            for m in ("rankme", "rankme_pca", "alpha_req", "h1_total_persistence")
        }
    summary["final_norm_change_pct_mean_sd"] = end
    write_json("claim2_summary.json", summary, a.smoke)
    png = os.path.join(img_dir(a.smoke), "claim2_objectives.png")
    figure(results, lab, x_all, png)
    print(f"figure: {png}")
    print(f"{'features':<34}{'n':>6}{'LOO acc':>9}{'p':>8}{'h-m/w':>7}{'h-r/w':>7}{'m-r/w':>7}")
    for name, f in summary["families"].items():
        d = f["distances"]
        print(
            f"{name:<34}{f['n_features']:>6}{f['loo_accuracy']:>9.2f}{f['permutation_p']:>8.3f}"
            f"{d['helpful vs mixed / within']:>7.2f}{d['helpful vs refusal / within']:>7.2f}"
            f"{d['mixed vs refusal / within']:>7.2f}"
        )
    for obj, e in end.items():
        print(obj, {m: f"{v[0]:+.1f}% ± {v[1]:.1f}" for m, v in e.items()})
    return summary


if __name__ == "__main__":
    main()
