"""Part 2 of the robust-metrics study (``docs/METRICS.md``, issue 25): judge every preprocessing
treatment on the same saved activations (``collect.py``), in seconds.

For each treatment (``topomon.metrics.preprocess.TREATMENTS`` x per-token normalisation off/on) and
every saved capture, the spectral metrics of every monitored layer, then:

* **stability**: the largest capture-to-capture ratio of ``rankme_pca`` and ``participation_ratio``
  per layer and stage run, and how often a layer's ``rankme_pca`` changes > 3x while the final norm
  changes < 1.5x; zero change on an unchanged model (the base capture and the SFT stage's first
  capture are of the same model);
* **sensitivity**: the narrow-stage change (last / first capture) at the final norm and the middle
  blocks, mean and sample sd over the seeds, and the SFT and DPO changes;
* **cost**: seconds per capture (5 layers: preprocessing + spectral metrics).

Writes ``results/evaluation.json`` (every number of the table and the series of the figure); the
table is printed and ``--figure`` draws ``docs/img/massive_activations.png``.

    .venv/bin/python examples/robust_metrics/evaluate.py --data /tmp/topomon_robust
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import time
from typing import Any

import numpy as np

from topomon.metrics.preprocess import TREATMENTS, prepare_points
from topomon.metrics.spectral import spectral_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
LAYERS = ("layer_7", "layer_14", "layer_22", "layer_29", "final_norm")
MIDDLE = ("layer_14", "layer_22")
KEYS = ("rankme_pca", "participation_ratio", "top_pc_share", "rankme")
DEFAULT = "robust"


def treatments() -> list[tuple[str, dict[str, Any]]]:
    """Every candidate: a name and the keyword arguments of ``prepare_points``."""
    out = []
    for t in TREATMENTS:
        out.append((t, {"treatment": t}))
        out.append((f"{t}+normalize", {"treatment": t, "normalize": True}))
    return out


def captures(data: str) -> dict[str, list[tuple[str, int, str]]]:
    """Stage run -> its captures in order, as (stage, step, path)."""
    runs: dict[str, list[tuple[str, int, str]]] = {}
    for path in glob.glob(os.path.join(data, "*", "raw", "*.npz")):
        run = os.path.basename(os.path.dirname(os.path.dirname(path)))
        m = re.match(r"(.+)__(\d+)\.npz$", os.path.basename(path))
        assert m is not None
        stage, step = m.group(1), int(m.group(2))
        key = stage if run == "base_run" else f"{stage}_{run.split('_')[-1]}"
        runs.setdefault(key, []).append((stage, step, path))
    return {k: sorted(v, key=lambda c: c[1]) for k, v in sorted(runs.items())}


def compute(data: str) -> dict[str, Any]:
    runs = captures(data)
    cands = treatments()
    series: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = {}
    massive: dict[str, dict[str, dict[str, list[float]]]] = {}
    steps: dict[str, list[int]] = {}
    cost: dict[str, float] = {name: 0.0 for name, _ in cands}
    n_caps = 0
    for run, caps in runs.items():
        steps[run] = [s for _, s, _ in caps]
        for _stage, _step, path in caps:
            z = np.load(path)
            n_caps += 1
            for name, kw in cands:
                t0 = time.perf_counter()
                for layer in LAYERS:
                    p = prepare_points(z[layer], **kw)
                    m = spectral_metrics(p.points)
                    dst = series.setdefault(name, {}).setdefault(run, {}).setdefault(layer, {})
                    for k in KEYS:
                        dst.setdefault(k, []).append(float(m[k]))
                    dst.setdefault("n_outliers", []).append(float(p.n_outliers))
                    if name == "cut":
                        mm = massive.setdefault(run, {}).setdefault(layer, {})
                        mm.setdefault("massive_tokens", []).append(float(p.massive_tokens))
                        mm.setdefault("massive_dims", []).append(float(p.massive_dims))
                        mm.setdefault("massive_share", []).append(float(p.massive_share))
                cost[name] += time.perf_counter() - t0
    cost = {k: v / max(n_caps, 1) for k, v in cost.items()}
    return {"steps": steps, "series": series, "massive": massive, "cost_s": cost}


def _ratio(a: float, b: float) -> float:
    if not (a > 0 and b > 0):
        return math.nan
    return max(a / b, b / a)


def preprocessing_cost(data: str, repeats: int = 20) -> dict[str, float]:
    """Seconds of ``prepare_points`` for the 5 layers of one capture (narrow seed 0, its last), per
    treatment, the best of ``repeats``; and of the spectral metrics that follow, for scale."""
    path = captures(data)["narrow_seed0"][-1][2]
    z = np.load(path)
    layers = [z[la] for la in LAYERS]
    out: dict[str, float] = {}
    for name, kw in treatments():
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            for x in layers:
                prepare_points(x, **kw)
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for x in layers:
            spectral_metrics(prepare_points(x).points)
        best = min(best, time.perf_counter() - t0)
    out["spectral_metrics_for_scale"] = best
    return out


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, runs in res["series"].items():
        row: dict[str, Any] = {"max_ratio": {}, "violations": 0, "pairs": 0, "unchanged_max_change": 0.0}
        for key in ("rankme_pca", "participation_ratio"):
            for layer in LAYERS:
                worst = 1.0
                for per in runs.values():
                    v = per[layer][key]
                    worst = max([worst, *(_ratio(a, b) for a, b in zip(v[1:], v[:-1], strict=True))])
                row["max_ratio"][f"{key}/{layer}"] = worst
        for per in runs.values():
            fin = per["final_norm"]["rankme_pca"]
            for i in range(1, len(fin)):
                row["pairs"] += 1
                big = [
                    la
                    for la in LAYERS
                    if _ratio(per[la]["rankme_pca"][i], per[la]["rankme_pca"][i - 1]) > 3.0
                ]
                if big and _ratio(fin[i], fin[i - 1]) <= 1.5:
                    row["violations"] += 1
        # the same model captured several times: the first capture of every narrow seed (each
        # starts from the same model; captured with the same number of threads)
        firsts = [per for r, per in runs.items() if r.startswith("narrow_")]
        row["unchanged_max_change"] = max(
            (abs(a[la][k][0] - b[la][k][0]) for a in firsts for b in firsts for la in LAYERS for k in KEYS),
            default=math.nan,
        )
        # sensitivity
        seeds = sorted(r for r in runs if r.startswith("narrow_"))
        sens = {}
        for layer in LAYERS:
            for key in ("rankme_pca", "participation_ratio"):
                ch = [100 * (runs[r][layer][key][-1] / runs[r][layer][key][0] - 1) for r in seeds]
                lows = [100 * (min(runs[r][layer][key]) / runs[r][layer][key][0] - 1) for r in seeds]
                sd = float(np.std(ch, ddof=1)) if len(ch) > 1 else math.nan
                sens[f"{key}/{layer}"] = {
                    "narrow_change_pct": ch,
                    "mean": float(np.mean(ch)) if ch else math.nan,
                    "sd": sd,
                    "mean_over_sd": abs(float(np.mean(ch))) / sd if sd and sd > 0 else math.nan,
                    "narrow_lowest_pct": lows,
                }
                for st in ("sft", "dpo"):
                    if st in runs:
                        v = runs[st][layer][key]
                        sens[f"{key}/{layer}"][f"{st}_change_pct"] = 100 * (v[-1] / v[0] - 1)
        row["sensitivity"] = sens
        row["cost_s"] = res.get("prep_cost_s", res["cost_s"])[name]
        out[name] = row
    return out


def print_table(summary: dict[str, Any]) -> None:
    head = "treatment".ljust(22) + "".join(f"{la[-7:]:>16}" for la in LAYERS) + "   viol  cost ms"
    print("max capture-to-capture ratio, rankme_pca / participation_ratio")
    print(head)
    for name, row in summary.items():
        cells = "".join(
            f"{row['max_ratio'][f'rankme_pca/{la}']:>8.2f}/{row['max_ratio'][f'participation_ratio/{la}']:<7.2f}"
            for la in LAYERS
        )
        print(f"{name:<22}{cells}   {row['violations']:>2}/{row['pairs']:<3}{1000 * row['cost_s']:>6.0f}")
    print("\nnarrow-stage change of rankme_pca, % mean +- sd over seeds (|mean|/sd); SFT, DPO change %")
    for name, row in summary.items():
        cells = []
        for la in ("final_norm", *MIDDLE):
            s = row["sensitivity"][f"rankme_pca/{la}"]
            cells.append(
                f"{la[-7:]}: {s['mean']:+6.1f} +- {s['sd']:4.1f} ({s['mean_over_sd']:4.1f}) "
                f"sft {s.get('sft_change_pct', math.nan):+5.1f} dpo {s.get('dpo_change_pct', math.nan):+5.1f}"
            )
        print(f"{name:<22}" + " | ".join(cells))


def describe_massive(data: str, run: str = "narrow_seed0") -> dict[str, Any]:
    """Which tokens and dimensions are massive, per layer and capture of one narrow run."""
    from topomon.metrics.preprocess import massive_part

    with open(os.path.join(data, "tokens.json")) as fh:
        tokens = json.load(fh)
    out: dict[str, Any] = {}
    for _stage, step, path in captures(data).get(run, []):
        z = np.load(path)
        for layer in LAYERS:
            x = z[layer].astype(np.float64)
            norms = np.linalg.norm(x, axis=1)
            ratio = norms / np.median(norms)
            m = massive_part(x)
            idx = np.flatnonzero(m.tokens)
            mag = np.abs(x[idx]).mean(axis=0) if len(idx) else np.zeros(x.shape[1])
            top_dims = np.argsort(-mag)[:4].tolist()
            xc = x - x.mean(axis=0)
            total = float(np.square(xc).sum())
            out.setdefault(layer, []).append(
                {
                    "step": step,
                    "massive_tokens": int(m.tokens.sum()),
                    "massive_dims": np.flatnonzero(m.dims).tolist(),
                    "share": m.share,
                    "norm_ratio_max": float(ratio.max()),
                    "n_over_3x": int((ratio > 3).sum()),
                    "n_over_10x": int((ratio > 10).sum()),
                    "massive_token_strings": sorted({tokens["token"][i] for i in idx}),
                    "massive_positions": sorted({tokens["position"][i] for i in idx}),
                    "top_dims_of_massive_tokens": top_dims,
                    "top_dims_share": float(np.square(xc[:, top_dims]).sum() / total) if total else math.nan,
                }
            )
            if layer == "layer_14":  # the figure's panel (a)
                out[layer][-1]["norm_ratios"] = np.round(ratio, 3).tolist()
    return out


def figure(res: dict[str, Any], data: str | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    desc = res.get("describe", {})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    # (a) norm distribution, middle block, the capture with the most massive tokens
    ax = axes[0, 0]
    layer = "layer_14"
    caps = desc.get(layer, [])
    if caps:
        worst = max(caps, key=lambda c: c["massive_tokens"])
        first = caps[0]
        bins = np.logspace(-0.5, 2.2, 60)
        ax.hist(first["norm_ratios"], bins=bins, alpha=0.6, label=f"step {first['step']} (start)")
        ax.hist(worst["norm_ratios"], bins=bins, alpha=0.6, label=f"step {worst['step']}")
        ax.axvline(10, color="k", ls="--", lw=1, label="old cut: 10x median")
        ax.axvline(3, color="r", ls=":", lw=1, label="robust rule's floor: 3x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("token norm / median norm")
        ax.set_ylabel("tokens")
        ax.set_title(f"(a) {layer}, narrow stage (seed 0): token norms", fontsize=10)
        ax.legend(fontsize=8)
    # (b) rankme_pca of the middle blocks, every narrow seed, cut vs robust; final norm
    ax = axes[0, 1]
    steps = res["steps"]
    colors = {"layer_14": "C0", "layer_22": "C1", "final_norm": "k"}
    for run in [r for r in steps if r.startswith("narrow_")]:
        for la, c in colors.items():
            for name, ls in (("cut", "--"), (DEFAULT, "-")):
                v = res["series"][name][run][la]["rankme_pca"]
                lab = f"{la} {name}" if run.endswith("0") else None
                ax.plot(steps[run], v, ls=ls, color=c, alpha=0.8, lw=1.2, label=lab)
    ax.set_yscale("log")
    ax.set_xlabel("narrow-stage step")
    ax.set_ylabel("rankme_pca")
    ax.set_title("(b) effective rank, 3 seeds: old cut (dashed) vs default (solid)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    # (c) the massive part as a signal: share of variance per layer, seed 0
    ax = axes[1, 0]
    for la in LAYERS:
        cs = desc.get(la, [])
        if cs:
            ax.plot([c["step"] for c in cs], [c["share"] for c in cs], marker="o", ms=3, label=la)
    ax.set_xlabel("narrow-stage step")
    ax.set_ylabel("massive_share")
    ax.set_title("(c) share of the variance in massive tokens + dimensions (seed 0)", fontsize=10)
    ax.legend(fontsize=8)
    # (d) largest capture-to-capture ratio per layer and treatment
    ax = axes[1, 1]
    names = list(res["summary"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [res["summary"][name]["max_ratio"][f"rankme_pca/{la}"] for la in LAYERS]
        ax.bar(np.arange(len(LAYERS)) + i * width, vals, width, label=name)
    ax.axhline(3, color="k", ls="--", lw=1)
    ax.set_xticks(np.arange(len(LAYERS)) + 0.4 - width / 2)
    ax.set_xticklabels(LAYERS, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("largest capture-to-capture ratio")
    ax.set_title("(d) rankme_pca jumps, every stage run, per treatment", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def topology_jitter(data: str, names: tuple[str, ...] = ("cut", DEFAULT)) -> dict[str, Any]:
    """The monitor's topology inputs (256 fixed points, PCA to 32) under two treatments: the largest
    capture-to-capture ratio of H0 / H1 total persistence per layer over every stage run."""
    from topomon.metrics.preprocess import subsample_indices
    from topomon.metrics.topology import topology_metrics

    out: dict[str, Any] = {}
    for name in names:
        series: dict[str, dict[str, dict[str, list[float]]]] = {}
        for run, caps in captures(data).items():
            for _stage, _step, path in caps:
                z = np.load(path)
                for layer in LAYERS:
                    x = z[layer]
                    idx = subsample_indices(len(x), 256, 0)
                    pts = prepare_points(x[idx], treatment=name).points
                    vals, _ = topology_metrics(pts, maxdim=1, pca_dim=32, seed=0)
                    dst = series.setdefault(run, {}).setdefault(layer, {})
                    for k in ("h0_total_persistence", "h1_total_persistence"):
                        dst.setdefault(k, []).append(float(vals[k]))
        worst = {}
        for layer in LAYERS:
            for k in ("h0_total_persistence", "h1_total_persistence"):
                w = 1.0
                for per in series.values():
                    v = per[layer][k]
                    w = max([w, *(_ratio(a, b) for a, b in zip(v[1:], v[:-1], strict=True))])
                worst[f"{k}/{layer}"] = w
        out[name] = {"max_ratio": worst, "series": series}
    return out


def markdown_table(summary: dict[str, Any]) -> str:
    """The table of docs/METRICS.md (the default's row in bold)."""
    head = (
        "| treatment | max ratio block 7 | block 14 | block 22 | block 29 | final norm "
        "| > 3x jumps the final norm does not make | narrow change, final norm | block 14 | block 22 "
        "| SFT change, final norm / block 14 | preprocessing ms |"
    )
    lines = [head, "|" + "---|" * (len(LAYERS) + 7)]
    for name, row in summary.items():
        mr = row["max_ratio"]
        ratios = [f"{mr[f'rankme_pca/{la}']:.2f} / {mr[f'participation_ratio/{la}']:.2f}" for la in LAYERS]
        sens = []
        for la in ("final_norm", *MIDDLE):
            sv = row["sensitivity"][f"rankme_pca/{la}"]
            sens.append(f"{sv['mean']:+.1f} ± {sv['sd']:.1f}% ({sv['mean_over_sd']:.1f} sd)")
        sft = "{:+.1f}% / {:+.1f}%".format(
            row["sensitivity"]["rankme_pca/final_norm"].get("sft_change_pct", math.nan),
            row["sensitivity"]["rankme_pca/layer_14"].get("sft_change_pct", math.nan),
        )
        cells = [
            name,
            *ratios,
            f"{row['violations']} of {row['pairs']}",
            *sens,
            sft,
            f"{1000 * row['cost_s']:.0f}",
        ]
        if name == DEFAULT:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="/tmp/topomon_robust")
    p.add_argument("--no-compute", action="store_true", help="reuse results/evaluation.json")
    p.add_argument("--cost", action="store_true", help="with --no-compute: remeasure the cost only")
    p.add_argument("--topology", action="store_true", help="also the topology inputs (results/topology.json)")
    p.add_argument(
        "--figure", default=os.path.join(HERE, "..", "..", "docs", "img", "massive_activations.png")
    )
    a = p.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "evaluation.json")
    if a.no_compute:
        with open(path) as fh:
            res = json.load(fh)
        if a.cost:
            res["prep_cost_s"] = preprocessing_cost(a.data)
            res["summary"] = summarise(res)
            with open(path, "w") as fh:
                json.dump(res, fh)
    else:
        res = compute(a.data)
        res["prep_cost_s"] = preprocessing_cost(a.data)
        res["summary"] = summarise(res)
        res["describe"] = describe_massive(a.data)
        with open(path, "w") as fh:
            json.dump(res, fh)
    print_table(res["summary"])
    if a.topology:
        topo = topology_jitter(a.data)
        with open(os.path.join(RESULTS, "topology.json"), "w") as fh:
            json.dump(topo, fh)
    if os.path.exists(os.path.join(RESULTS, "topology.json")):
        with open(os.path.join(RESULTS, "topology.json")) as fh:
            topo = json.load(fh)
        print("\ntopology inputs: largest capture-to-capture ratio of H0 / H1 total persistence")
        for name, t in topo.items():
            cells = [
                f"{la}: {t['max_ratio'][f'h0_total_persistence/{la}']:.2f} / "
                f"{t['max_ratio'][f'h1_total_persistence/{la}']:.2f}"
                for la in LAYERS
            ]
            print(f"{name:<10}" + " | ".join(cells))
    print()
    print(markdown_table(res["summary"]))
    figure(res, a.data, a.figure)


if __name__ == "__main__":
    main()
