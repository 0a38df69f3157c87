"""Study 1 re-scored fairly: every detector tuned the same way, with intervals and a shuffle null.

    python examples/early_warning/fair.py --harm amended --out examples/early_warning/results

The first analysis (``study.py --no-train``) compared topomon's default rules, tuned on seed 0, with
baselines at fixed settings (Lightning's ``SpikeDetection`` defaults). Here every detector has one
knob, tuned on the same grid size by the same rule (seed 0, the highest F1, then the longest median
lead, then the most conservative setting), and is judged on seeds 1-2. Besides precision, recall and
F1 it reports Wilson 95% intervals, the count of alerts *strictly before* the first measured harm,
how many of the 8 configurations each detector and the harm label split across seeds (the effective
sample), and a label-shuffle null for the best of the AUC table's metric/layer pairs.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study import (  # noqa: E402
    CONFIGS,
    HARM,
    HARMS,
    Sizes,
    _config,
    _fmt,
    _series,
    auc,
    early_change,
    harm_step,
    load_stages,
    publish,
    score,
    spike_first,
    topomon_first,
)

Stage = dict[str, Any]
First = Callable[[Stage], "int | None"]


# ---------------------------------------------------------------- the detectors, each with one knob
def loss_drop_first(res: Stage, frac: float, window: int = 4) -> int | None:
    """First step whose mean training loss over the last ``window`` steps is <= ``frac`` x the step-1 loss."""
    loss = [v for _, v in sorted(res["loss"])]
    steps = [int(s) for s, _ in sorted(res["loss"])]
    if not loss:
        return None
    for i in range(window - 1, len(loss)):
        if sum(loss[i - window + 1 : i + 1]) / window <= frac * loss[0]:
            return steps[i]
    return None


def level_first(series: list[list[float]], k: float, warmup: int = 4) -> int | None:
    """First step after ``warmup`` whose value is >= ``k`` x the median of the first ``warmup`` values."""
    vals = sorted(series)
    if len(vals) <= warmup:
        return None
    ref = statistics.median(v for _, v in vals[:warmup])
    return next((int(s) for s, v in vals[warmup:] if v >= k * ref), None)


def rise_first(res: Stage, metric: str, layer: str, rel: float) -> int | None:
    """First capture where ``metric`` at ``layer`` is up >= ``rel`` (relative) from the stage start."""
    s = _series(res, metric, layer)
    if not s or s[0][1] == 0:
        return None
    for step, v in s[1:]:
        if v / s[0][1] - 1 >= rel:
            return step
    return None


def either(*firsts: First) -> First:
    """A detector that fires at the first step any of ``firsts`` fires."""

    def first(res: Stage) -> int | None:
        steps = [s for s in (f(res) for f in firsts) if s is not None]
        return min(steps) if steps else None

    return first


def released(res: Stage) -> int | None:
    """topomon's default rules as released (final-norm RankMe -15%, rankme_pca -25%)."""
    return topomon_first(res)


DROPS = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40)  # topomon's thresholds, as pre-registered

# name -> (grid of the knob, the detector at a knob value, how the knob is written)
TUNABLE: dict[str, tuple[Sequence[Any], Callable[[Any], First], str]] = {
    "topomon rules (both drop thresholds tuned)": (
        [(a, b) for a in DROPS for b in DROPS],
        lambda k: lambda r: topomon_first(r, k[0], k[1]),
        "RankMe -{0[0]:.0%}, rankme_pca -{0[1]:.0%}",
    ),
    "loss spike (Lightning rule, rtol tuned)": (
        (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0),
        lambda k: lambda r: spike_first(r["loss"], rtol=k),
        "rtol {0}",
    ),
    "grad-norm spike (rtol tuned)": (
        (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0),
        lambda k: lambda r: spike_first(r["grad_norm"], rtol=k),
        "rtol {0}",
    ),
    "grad-norm level (x the median of steps 1-4)": (
        (1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0),
        lambda k: lambda r: level_first(r["grad_norm"], k),
        ">= {0}x",
    ),
    "training-loss drop (4-step mean vs step 1)": (
        (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2),
        lambda k: lambda r: loss_drop_first(r, k),
        "<= {0:.0%} of the step-1 loss",
    ),
    "probe logit_nll rise": (
        (0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.50),
        lambda k: lambda r: rise_first(r, "logit_nll", "model", k),
        "up >= {0:.0%}",
    ),
}


# ---------------------------------------------------------------- scores with intervals
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (95% by default); (nan, nan) when ``n`` is 0."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def counts(stages: list[Stage], first: First) -> dict[str, Any]:
    """True/false positives, misses, alerts strictly before the harm, and the leads of one detector."""
    return score(stages, "", first=first)


def tune(stages: list[Stage], grid: Sequence[Any], make: Callable[[Any], First]) -> Any:
    """The knob with the highest F1 on ``stages``, then the longest median lead, then the fewest false
    alarms; a tie left after that goes to the most conservative knob (every grid runs from the most
    sensitive setting to the most conservative one, and a later setting wins a tie)."""
    best: tuple[tuple[float, float, int], Any] | None = None
    for k in grid:
        c = counts(stages, make(k))
        key = (c["f1"], c["lead_median"] if c["lead_median"] is not None else -999.0, -c["fp"])
        if best is None or key >= best[0]:
            best = (key, k)
    assert best is not None
    return best[1]


def _ci(lo_hi: tuple[float, float]) -> str:
    return "-" if math.isnan(lo_hi[0]) else f"[{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]"


def _p(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def row(name: str, knob: str, stages: list[Stage], first: First) -> str:
    """One table row: P [CI] / R [CI] / F1, false alarms, strictly-before count, median lead."""
    c = counts(stages, first)
    n_alarm = c["tp"] + c["fp"]
    return (
        f"| {name} | {knob} | {_p(c['precision'])} {_ci(wilson(c['tp'], n_alarm))} | "
        f"{_p(c['recall'])} {_ci(wilson(c['tp'], c['harmful']))} | {c['f1']:.2f} | {c['fp']} | "
        f"{c['before']} / {c['harmful']} | {_fmt(c['lead_median'])} |"
    )


def detectors(tuning: list[Stage]) -> list[tuple[str, str, First]]:
    """Every detector of the fair table, its knob tuned on ``tuning``: (name, knob, first-alert function)."""
    out: list[tuple[str, str, First]] = [
        ("topomon defaults (as released)", "RankMe -15%, rankme_pca -25%", released)
    ]
    picked: dict[str, First] = {}
    for name, (grid, make, fmt) in TUNABLE.items():
        k = tune(tuning, grid, make)
        picked[name] = make(k)
        out.append((name, fmt.format(k), picked[name]))
    out.append(
        (
            "topomon defaults OR the training-loss drop",
            "both as above",
            either(released, picked["training-loss drop (4-step mean vs step 1)"]),
        )
    )
    out.append(("flag every stage", "-", lambda r: 0))
    narrow: First = lambda r: 0 if r["data"] == "narrow" else None  # noqa: E731
    out.append(("'narrow data' (knows the stage's data, no signal)", "-", narrow))
    return out


HEADER = [
    "| detector | knob (tuned on seed 0) | precision [95% CI] | recall [95% CI] | F1 | false alarms | "
    "strictly before the harm | lead median |",
    "|---|---|---|---|---|---|---|---|",
]


# ---------------------------------------------------------------- the effective sample
def consistency(stages: list[Stage], dets: list[tuple[str, str, First]]) -> list[str]:
    """Per detector: in how many configurations its firing (and the harm label) is the same in every seed."""
    cfgs = ["-".join(c) for c in CONFIGS if any(_config(r) == "-".join(c) for r in stages)]
    by = {c: [r for r in stages if _config(r) == c] for c in cfgs}
    label = sum(len({harm_step(r) is not None for r in by[c]}) == 1 for c in cfgs)
    out = [
        f"The harm label is the same in every seed in {label} of {len(cfgs)} configurations.\n",
        "| detector | configurations where it fires in every seed or in none |",
        "|---|---|",
    ]
    for name, _, first in dets:
        same = sum(len({first(r) is not None for r in by[c]}) == 1 for c in cfgs)
        out.append(f"| {name} | {same} / {len(cfgs)} |")
    return out


# ---------------------------------------------------------------- the AUC table's multiple comparisons
def best_heldout_auc(
    stages: list[Stage], labels: list[bool], changes: dict[tuple[str, str], list[float]]
) -> float:
    """The best held-out AUC over metric/layer pairs, each pair's sign chosen on seed 0 (as the AUC table)."""
    tune_i = [i for i, r in enumerate(stages) if r["seed"] == 0]
    held_i = [i for i, r in enumerate(stages) if r["seed"] != 0]
    best = -1.0
    for ch in changes.values():
        drop = [-c for c in ch]
        at = auc([drop[i] for i in tune_i], [labels[i] for i in tune_i])
        ah = auc([drop[i] for i in held_i], [labels[i] for i in held_i])
        if math.isnan(ah):
            continue
        best = max(best, ah if math.isnan(at) or at >= 0.5 else 1 - ah)
    return best


def shuffle_null(stages: list[Stage], sz: Sizes, n: int = 1000, seed: int = 0) -> list[str]:
    """The observed best held-out AUC against the best one reached with shuffled harm labels."""
    keys = sorted({(k, r["layer"]) for res in stages for r in res["records"] for k in r["metrics"]})
    changes: dict[tuple[str, str], list[float]] = {}
    for metric, layer in keys:
        ch = [early_change(r, metric, layer, sz.early) for r in stages]
        if all(c is not None for c in ch) and len(set(ch)) > 1:
            changes[(metric, layer)] = [float(c) for c in ch]  # type: ignore[arg-type]
    labels = [harm_step(r) is not None for r in stages]
    observed = best_heldout_auc(stages, labels, changes)
    rng = random.Random(seed)
    cfgs = sorted({_config(r) for r in stages})
    cfg_label = {c: next(harm_step(r) is not None for r in stages if _config(r) == c) for c in cfgs}
    null_stage, null_cfg = [], []
    for _ in range(n):
        null_stage.append(best_heldout_auc(stages, rng.sample(labels, len(labels)), changes))
        perm = dict(zip(cfgs, rng.sample([cfg_label[c] for c in cfgs], len(cfgs)), strict=True))
        null_cfg.append(best_heldout_auc(stages, [perm[_config(r)] for r in stages], changes))

    def q(xs: list[float], p: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]

    def share(xs: list[float]) -> float:
        return sum(x >= observed for x in xs) / len(xs)

    return [
        f"{len(changes)} metric/layer pairs; the best held-out AUC (sign chosen on seed 0) is "
        f"**{observed:.2f}**. With the harm labels shuffled {n} times (seed {seed}):\n",
        "| labels shuffled | best held-out AUC: median | 95th percentile | share >= the observed |",
        "|---|---|---|---|",
        f"| between stages | {q(null_stage, 0.5):.2f} | {q(null_stage, 0.95):.2f} | "
        f"{share(null_stage):.2f} |",
        f"| between the {len(cfgs)} configurations (seeds kept together; each configuration labelled by its "
        f"seed 0) | {q(null_cfg, 0.5):.2f} | {q(null_cfg, 0.95):.2f} | {share(null_cfg):.2f} |",
    ]


def report(stages: list[Stage], sz: Sizes, n_shuffle: int = 1000) -> str:
    """Every table of the fair re-scoring, as markdown."""
    tuning = [r for r in stages if r["seed"] == 0]
    held = [r for r in stages if r["seed"] != 0]
    dets = detectors(tuning)
    h = sum(harm_step(r) is not None for r in held)
    out = [f"Held out (seeds 1-2): {len(held)} stages, {h} harmful / {len(held) - h} benign.\n", *HEADER]
    out += [row(name, knob, held, first) for name, knob, first in dets]
    out.append(f"\nAll {len(stages)} stages (the knobs as tuned on seed 0):\n")
    out += HEADER
    out += [row(name, knob, stages, first) for name, knob, first in dets]
    out.append("\nThe effective sample:\n")
    out += consistency(stages, dets)
    out.append("\nThe AUC table's multiple comparisons:\n")
    out += shuffle_null(stages, sz, n=n_shuffle)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="examples/early_warning/results")
    p.add_argument("--harm", choices=sorted(HARMS), default="amended")
    p.add_argument("--shuffles", type=int, default=1000)
    a = p.parse_args(argv)
    HARM.update(HARMS[a.harm])
    folder = os.path.join(a.out, "stages")
    stages = load_stages(folder)
    stages = [r for r in stages if not r["tiny"]] or stages
    if not stages:
        print(f"no saved stages in {folder}", file=sys.stderr)
        return 1
    sz = Sizes(stages[0]["tiny"])
    text = f"Harm definition: {a.harm} {HARMS[a.harm]}\n\n" + report(stages, sz, a.shuffles)
    return publish(os.path.join(a.out, f"fair-{a.harm}.md"), text)


if __name__ == "__main__":
    raise SystemExit(main())
