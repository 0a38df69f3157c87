"""Claim 1: an early transient of topological activity, then stabilisation, during SFT.

Persistent-homology paper (arXiv 2606.19542): most topological reorganisation happens in the first
steps of SFT; a dense checkpoint analysis shows a transient peak of "topological activity", then
rapid stabilisation. topomon's topological activity is the bottleneck distance between the H1 (and
H0) persistence diagrams of consecutive captures of the same probe tokens (docs/METRICS.md).

Runs: SmolLM2-135M-Instruct on real chit-chat replies, constant learning rate (no warm-up, so a
transient is not the shadow of a warm-up ramp), 20 steps of batch 4, a capture every 2 steps
(uniform spacing, so the activity of every interval is comparable), persistent homology on every
captured layer, 3 seeds, in two settings: LoRA at lr 2e-4 (the runs shared with claims 2 and 3) and
full fine-tuning at lr 5e-5 (the setting of the first scratch run in RESEARCH.md). Also reported:
the per-step rate a log-spaced schedule (0, 2, 4, 8, 16) would show, from the drift to step 0.
Writes ``results/claim1_summary.json`` and ``docs/img/fidelity/claim1_transient_{lora,full}.png``.

    python examples/fidelity/claim1_transient.py            # trains what is missing
    python examples/fidelity/claim1_transient.py --no-train # figures and numbers from saved results
"""

from __future__ import annotations

import argparse
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

__all__ = ["full_ft_spec", "transient_stats", "log_schedule_rates", "summarise", "main"]

EARLY = 3  # first intervals (steps 0-6 at every=2)
LATE = 4  # last intervals (steps 12-20)
LOG_STEPS = (2, 4, 8, 16)


def full_ft_spec(seed: int, smoke: bool) -> Spec:
    """Full fine-tuning (every weight) at lr 5e-5: the setting of the first scratch run (RESEARCH.md)."""
    if smoke:
        return Spec("helpful", seed, lr=5e-5, steps=4, every=1, full_ft=True, smoke=True)
    return Spec("helpful", seed, lr=5e-5, steps=helpful_spec(seed, False).steps, every=2, full_ft=True)


def log_schedule_rates(steps: np.ndarray, drift: np.ndarray, at: tuple[int, ...] = LOG_STEPS) -> list[float]:
    """The per-step activity a log-spaced schedule would report for its growing first intervals.

    ``drift[i]`` is the bottleneck distance of capture i to the step-0 diagram, so ``drift(t) / t``
    is the rate that a schedule with captures at 0 and t reports for that interval. A drift that
    grows like a random walk (sqrt(t)) makes this rate fall like 1/sqrt(t) with no change at all in
    the training dynamics: the artefact a uniform schedule avoids.

    Args:
        steps: ``(n,)`` capture steps.
        drift: ``(n,)`` bottleneck distance to the step-0 diagram.
        at: the steps to evaluate.

    Returns:
        ``drift(t) / t`` for each ``t`` in ``at`` (NaN where not captured).
    """
    out = []
    for t in at:
        hit = np.where(steps == t)[0]
        out.append(float(drift[hit[0]] / t) if hit.size else float("nan"))
    return out


def transient_stats(steps: np.ndarray, activity: np.ndarray) -> dict[str, float]:
    """Early/late ratio and peak position of an activity series (one value per capture interval).

    Args:
        steps: ``(n,)`` capture steps; ``activity[i]`` is the distance between captures i-1 and i.
        activity: ``(n,)`` activity, NaN at the first capture.

    Returns:
        ``early`` (mean of the first ``EARLY`` intervals), ``late`` (mean of the last ``LATE``),
        ``ratio`` = early / late, ``peak_step`` (end step of the largest interval),
        ``peak_over_late`` = max / late.
    """
    ok = np.isfinite(activity)
    s, a = steps[ok], activity[ok]
    if a.size < EARLY + LATE:
        return dict(early=np.nan, late=np.nan, ratio=np.nan, peak_step=np.nan, peak_over_late=np.nan)
    early, late = float(a[:EARLY].mean()), float(a[-LATE:].mean())
    return dict(
        early=early,
        late=late,
        ratio=early / late if late > 0 else np.nan,
        peak_step=float(s[int(np.argmax(a))]),
        peak_over_late=float(a.max() / late) if late > 0 else np.nan,
    )


def _stack(results: list[dict[str, Any]], metric: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [series(r, metric, layer) for r in results]
    steps = rows[0][0]
    n = min(len(v) for _, v in rows)
    return steps[:n], np.vstack([v[:n] for _, v in rows])


def figure(results: list[dict[str, Any]], path: str, title: str) -> None:
    """Four panels: H1 and H0 activity per interval, drift to step 0, training loss (mean ± sd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = layers_of(results[0])
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        ("topo_activity", "H1 topological activity\n(bottleneck, consecutive captures)"),
        ("topo_activity_h0", "H0 topological activity\n(bottleneck, consecutive captures)"),
        ("topo_drift", "H1 drift: bottleneck to step 0"),
    ]
    for ax, (metric, panel_title) in zip(axes.flat, panels, strict=False):
        for i, layer in enumerate(layers):
            steps, v = _stack(results, metric, layer)
            m = np.nanmean(v, 0)
            sd = np.nanstd(v, 0, ddof=1) if len(results) > 1 else np.zeros_like(m)
            if metric == "topo_drift":  # relative to its end value, so every layer fits one axis
                m, sd = m / m[-1], sd / m[-1] if m[-1] else sd
            c = cmap(i / max(1, len(layers) - 1))
            ax.plot(steps, m, "o-", ms=3, color=c, label=layer)
            ax.fill_between(steps, m - sd, m + sd, color=c, alpha=0.15)
        if metric == "topo_drift":
            ax.plot(steps, np.sqrt(steps / steps[-1]), "k:", lw=1, label="sqrt(t / t_end)")
            ax.plot(steps, steps / steps[-1], "k--", lw=1, label="t / t_end")
            ax.legend(fontsize=7)
            ax.set_title(panel_title + "\n(divided by its value at the last step)", fontsize=10)
        else:
            ax.set_title(panel_title + " (log scale)", fontsize=10)
            ax.set_yscale("log")
        ax.set_xlabel("SFT step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, title=f"mean ± sd, {len(results)} seeds", title_fontsize=8)
    ax = axes.flat[3]
    for r in results:
        lo = np.array(r["loss"]["sft"], dtype=float)
        ax.plot(lo[:, 0], lo[:, 1], alpha=0.7, label=f"seed {r['spec']['seed']}")
    lora = [series(r, "lora_norm_total", "model") for r in results]
    lora = [(st, v) for st, v in lora if v.size and np.isfinite(v).any()]
    ax.set_title(
        "training loss" + (" (lines) and LoRA update norm (dots, right axis)" if lora else ""), fontsize=10
    )
    ax.set_xlabel("SFT step")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    if lora:
        ax2 = ax.twinx()
        for st, v in lora:
            ax2.plot(st, v, ".", color="k", alpha=0.5)
        ax2.set_ylabel("||Delta W|| summed over adapted modules", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per layer: transient statistics per seed and their mean ± sd; log-schedule rates; loss; LoRA norm."""
    out: dict[str, Any] = {"seeds": [r["spec"]["seed"] for r in results], "layers": {}}
    for layer in layers_of(results[0]):
        per: dict[str, Any] = {}
        for metric in ("topo_activity", "topo_activity_h0"):
            stats = [transient_stats(*series(r, metric, layer)) for r in results]
            per[metric] = {
                "per_seed": stats,
                **{f"{k}_mean_sd": mean_sd([s[k] for s in stats]) for k in stats[0]},
                "seeds_ratio_above_1": int(sum(s["ratio"] > 1 for s in stats)),
            }
        rates = [log_schedule_rates(*series(r, "topo_drift", layer)) for r in results]
        per["log_schedule_rate"] = {
            "steps": list(LOG_STEPS),
            "per_seed": rates,
            "mean": [mean_sd([x[i] for x in rates])[0] for i in range(len(LOG_STEPS))],
            "first_over_last_mean_sd": mean_sd([x[0] / x[-1] for x in rates]),
        }
        half = []
        for r in results:  # share of the final drift already reached at half time (sqrt(t) -> 0.71)
            st, dr = series(r, "topo_drift", layer)
            mid = np.where(st == st[-1] // 2)[0]
            half.append(float(dr[mid[0]] / dr[-1]) if mid.size and dr[-1] > 0 else float("nan"))
        per["drift_half_time_over_end_mean_sd"] = mean_sd(half)
        out["layers"][layer] = per
    incr = []
    for r in results:  # LoRA update norm gained per interval, early vs late (is the optimiser slowing?)
        s, v = series(r, "lora_norm_total", "model")
        d = np.diff(v[np.isfinite(v)])
        incr.append(d[:EARLY].mean() / d[-LATE:].mean() if d.size >= EARLY + LATE else np.nan)
    out["lora_norm_increment_early_over_late_mean_sd"] = mean_sd(incr)
    lo = [np.array(r["loss"]["sft"], dtype=float)[:, 1] for r in results]
    out["loss"] = {
        "first3_mean_sd": mean_sd([x[:3].mean() for x in lo]),
        "last5_mean_sd": mean_sd([x[-5:].mean() for x in lo]),
    }
    return out


def _print(summary: dict[str, Any], n: int) -> None:
    print(
        f"{'layer':<12}{'metric':<18}{'early/late':>16}{'peak step':>14}{'seeds >1':>9}"
        f"{'log-rate 2/16':>16}{'drift t/2 / end':>18}"
    )
    for layer, per in summary["layers"].items():
        lr_, lrs = per["log_schedule_rate"]["first_over_last_mean_sd"]
        for metric in ("topo_activity", "topo_activity_h0"):
            s = per[metric]
            r, rs = s["ratio_mean_sd"]
            pk, pks = s["peak_step_mean_sd"]
            h, hs = per["drift_half_time_over_end_mean_sd"]
            extra = f"{lr_:>9.2f} ± {lrs:<4.2f}{h:>11.2f} ± {hs:<4.2f}" if metric == "topo_activity" else ""
            print(
                f"{layer:<12}{metric:<18}{r:>9.2f} ± {rs:<4.2f}{pk:>8.1f} ± {pks:<4.1f}"
                f"{s['seeds_ratio_above_1']:>5}/{n}{extra}"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    a = p.parse_args(argv)
    conditions = {
        "lora": ("LoRA SFT, lr 2e-4", [helpful_spec(s, a.smoke) for s in a.seeds]),
        "full": ("full fine-tuning, lr 5e-5", [full_ft_spec(s, a.smoke) for s in a.seeds]),
    }
    summary: dict[str, Any] = {}
    for key, (label, specs) in conditions.items():
        results = run_many(specs, a)
        if not results:
            continue
        summary[key] = summarise(results) | {"label": label, "runs": [r["run_id"] for r in results]}
        png = os.path.join(img_dir(a.smoke), f"claim1_transient_{key}.png")
        seeds = [r["spec"]["seed"] for r in results]
        figure(
            results,
            png,
            f"Claim 1: SmolLM2-135M-Instruct, {label} constant, chit-chat, "
            f"captures every 2 steps, seeds {seeds}",
        )
        print(f"\n{label}: figure {png}")
        _print(summary[key], len(results))
    write_json("claim1_summary.json", summary, a.smoke)
    return summary


if __name__ == "__main__":
    main()
