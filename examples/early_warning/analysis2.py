"""Study 2's scores (docs/EARLY_WARNING.md part 3), from the saved per-stage JSON alone, in seconds.

    python examples/early_warning/analysis2.py --out examples/early_warning/results2   # tables2.md

Every detector of part 3, frozen at the knobs tuned on study 1's seed 0, is replayed on each stage's
logged series as an alarm state per step: precision, recall and F1 with Wilson intervals, alerts
strictly before the first measured harm, false alarms per 1,000 training steps on the benign stages
(every rising edge of the alarm state) and the share of their measured checkpoints in alarm, and v2
minus the best other detector with a bootstrap over the stage types.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fair import wilson  # noqa: E402
from study import _series, load_stages, publish, spike_first  # noqa: E402
from study2 import SEEDS, TYPES, VARIANTS, harm_step, stage_name  # noqa: E402

Stage = dict[str, Any]
# a detector: the steps at which it is in alarm (sorted), over the steps it was evaluated at
State = dict[int, bool]
Detector = Callable[[Stage], State]

REGISTERED = len(TYPES) * len(VARIANTS) * len(SEEDS)  # the stages part 3 pre-registered (36)
KNOBS = {"drop_rankme": 0.15, "drop_rankme_pca": 0.25, "nll": 0.02, "loss": 0.30, "loss_spike": 0.5}
KNOBS |= {"grad_spike": 1.0, "grad_level": 1.5, "entropy": 0.5}


def geometry(res: Stage) -> State:
    """topomon's default rules as released (v1) replayed by its own engine: in alarm from a firing
    until its recovery. Pinned to ``default_rules("v1")``: the detector part 3 froze, whatever ships."""
    from topomon.alerts import AlertEngine, default_rules
    from topomon.pipeline import record_from_json

    recs = [record_from_json(r) for r in res["records"]]
    engine = AlertEngine(default_rules("v1"), {k for r in recs for k in r.metrics})
    live: set[str] = set()
    state: State = {}
    for step in sorted({r.step for r in recs}):
        for a in engine.update([r for r in recs if r.step == step]):
            (live.discard if a.reason == "recovered" else live.add)(a.rule)
        state[step] = bool(live)
    return state


def rel_rise(metric: str, layer: str, rel: float) -> Detector:
    """In alarm at a capture where ``metric`` is up >= ``rel`` from the stage start."""

    def det(res: Stage) -> State:
        s = _series(res, metric, layer)
        return {} if not s or s[0][1] == 0 else {st: v / s[0][1] - 1 >= rel for st, v in s}

    return det


def window_ratio(stream: str, frac: float, window: int = 4, ref: str = "first") -> Detector:
    """In alarm where the mean of the last ``window`` values is <= ``frac`` x the reference: the first
    value (``ref="first"``) or the mean of the first ``window`` (``"window"``); never when the
    reference is <= 0 (a relative drop is undefined)."""

    def det(res: Stage) -> State:
        s = sorted(res["streams"].get(stream, []))
        vals = [v for _, v in s]
        if len(vals) < window:
            return {}
        r = vals[0] if ref == "first" else statistics.mean(vals[:window])
        if r <= 0:
            return {int(st): False for st, _ in s}
        return {
            int(s[i][0]): sum(vals[i - window + 1 : i + 1]) / window <= frac * r
            for i in range(window - 1, len(s))
        }

    return det


def level(stream: str, k: float, warmup: int = 4) -> Detector:
    """In alarm where the value is >= ``k`` x the median of its first ``warmup`` values."""

    def det(res: Stage) -> State:
        s = sorted(res["streams"].get(stream, []))
        if len(s) <= warmup:
            return {}
        ref = statistics.median(v for _, v in s[:warmup])
        return {int(st): v >= k * ref for st, v in s[warmup:]}

    return det


def spikes(stream: str, rtol: float) -> Detector:
    """In alarm at every step Lightning's rule calls a spike (replayed from each spike onward)."""

    def det(res: Stage) -> State:
        s = sorted(res["streams"].get(stream, []))
        state: State = {int(st): False for st, _ in s}
        start = 0
        while start < len(s):
            hit = spike_first([list(x) for x in s[start:]], rtol=rtol)
            if hit is None:
                break
            state[hit] = True
            start = next(i for i, (st, _) in enumerate(s) if st == hit) + 1
        return state

    return det


def latched_any(*parts: Detector) -> Detector:
    """In alarm from the first step any part is in alarm, to the end (each part latched)."""

    def det(res: Stage) -> State:
        states = [p(res) for p in parts]
        steps = sorted({st for s in states for st in s})
        first = min((st for s in states for st, on in s.items() if on), default=None)
        return {st: first is not None and st >= first for st in steps}

    return det


def every_stage(res: Stage) -> State:
    """In alarm from step 0 in every stage."""
    return {0: True, **{int(st): True for st, _ in res["loss"]}}


NLL = rel_rise("logit_nll", "model", KNOBS["nll"])
LOSS = window_ratio("loss", KNOBS["loss"])
DETECTORS: dict[str, Detector] = {
    "v1 (default rules)": geometry,
    "v2 (any of geometry, nll, loss)": latched_any(geometry, NLL, LOSS),
    "nll + loss (any of)": latched_any(NLL, LOSS),
    "training-loss drop": LOSS,
    "probe NLL": NLL,
    "loss spike": spikes("loss", KNOBS["loss_spike"]),
    "grad-norm spike": spikes("grad_norm", KNOBS["grad_spike"]),
    "grad-norm level": level("grad_norm", KNOBS["grad_level"]),
    "flag every stage": every_stage,
    "TRL entropy (grpo only)": window_ratio("entropy", KNOBS["entropy"], ref="window"),
}


V2 = "v2 (any of geometry, nll, loss)"
NLL_LOSS = "nll + loss (any of)"
REFERENCE = "flag every stage"
GRPO_ONLY = "TRL entropy (grpo only)"
SHIPPABLE = [n for n in DETECTORS if n not in (REFERENCE, GRPO_ONLY)]
"""What can become the default alert rules (amendment 2, before any study-2 score): every detector
but the reference that alerts in every stage, and TRL's entropy rule (scored on GRPO stages only)."""

LIBRARY = {
    "v1 (default rules)": "v1",
    V2: "v2",
    NLL_LOSS: "nll+loss",
    "training-loss drop": "training-loss drop",
    "probe NLL": "probe NLL",
    "loss spike": "loss spike",
    "grad-norm spike": "grad-norm spike",
    "grad-norm level": "grad-norm level",
}
"""Each shippable detector's name in ``topomon.alerts.DETECTORS`` (``alerts="<name>"``): the same
detector as alert rules, tested to fire live where it is replayed here (tests/test_early_warning2.py)."""


def rank_key(s: dict[str, Any]) -> tuple[float, int, float]:
    """Part 3's order: F1, then alerts strictly before the harm, then fewer false alarms per 1,000 steps."""
    fa = s["fa_per_1000"]
    return (s["f1"], s["before"], -fa if fa == fa else 0.0)


def shipped(all_scores: dict[str, dict[str, Any]]) -> str:
    """The detector part 3's "What ships" names: the best shippable one; where that is v2 but "nll +
    loss" has at least its F1 and strictly-before count, the geometry adds nothing and "nll + loss" ships.
    """
    best = max(SHIPPABLE, key=lambda n: rank_key(all_scores[n]))
    ng, v2 = all_scores[NLL_LOSS], all_scores[V2]
    if best == V2 and ng["f1"] >= v2["f1"] and ng["before"] >= v2["before"]:
        return NLL_LOSS
    return best


def poisson_rate(events: int, steps: int, per: int = 1000) -> tuple[float, float]:
    """The exact (Garwood) 95% interval of an event rate per ``per`` steps; (nan, nan) without steps."""
    from scipy.stats import chi2

    if steps <= 0:
        return (math.nan, math.nan)
    lo = 0.0 if events == 0 else 0.5 * float(chi2.ppf(0.025, 2 * events))
    hi = 0.5 * float(chi2.ppf(0.975, 2 * events + 2))
    return (per * lo / steps, per * hi / steps)


def score_line(name: str, s: dict[str, Any]) -> str:
    """One detector's held-out numbers as the README states them, each with its 95% interval."""
    b, fa = s["before_ci"], s["fa_ci"]
    return (
        f"{name}: precision {s['precision']:.2f} [{s['p_ci'][0]:.2f}, {s['p_ci'][1]:.2f}], recall "
        f"{s['recall']:.2f} [{s['r_ci'][0]:.2f}, {s['r_ci'][1]:.2f}], F1 {s['f1']:.2f}, strictly before the "
        f"first measured harm in {s['before']} of {s['harmful']} harmful stages [{b[0]:.2f}, {b[1]:.2f}], "
        f"{s['fa_per_1000']:.1f} [{fa[0]:.1f}, {fa[1]:.1f}] false alarms per 1,000 benign steps"
    )


def live_first(res: Stage) -> int | None:
    """The first step at which v2, run live in the stage through topomon's rule engine, fired."""
    steps = [int(a["step"]) for a in res.get("live_alerts", []) if a.get("reason") != "recovered"]
    return min(steps, default=None)


def live_agreement(stages: list[Stage]) -> tuple[int, list[str]]:
    """How many stages' live v2 first alert equals the replayed one (part 3), and the others' names."""
    differ = [r["name"] for r in stages if live_first(r) != first_alert(DETECTORS[V2](r))]
    return len(stages) - len(differ), differ


def first_alert(state: State) -> int | None:
    """The first step in alarm."""
    return min((st for st, on in state.items() if on), default=None)


def events(state: State) -> int:
    """Rising edges of the alarm state (each alarm episode counts once)."""
    prev, n = False, 0
    for st in sorted(state):
        n += state[st] and not prev
        prev = state[st]
    return n


def applies(name: str, res: Stage) -> bool:
    """The TRL-entropy detector is scored on GRPO stages only."""
    return res["type"] == "grpo" if name == GRPO_ONLY else True


def scores(stages: list[Stage], name: str) -> dict[str, Any]:
    """Every part-3 score of one detector over ``stages``."""
    det = DETECTORS[name]
    tp = fp = fn = before = n_events = steps = ck_on = ck_all = 0
    leads: list[int] = []
    for res in (r for r in stages if applies(name, r)):
        h, state = harm_step(res), det(res)
        a = first_alert(state)
        if h is not None and a is not None:
            tp, before = tp + 1, before + (a < h)
            leads.append(h - a)
        elif h is not None:
            fn += 1
        elif a is not None:
            fp += 1
        if h is None:  # time-resolved false alarms on the benign stages
            n_events += events(state)
            steps += max((int(s) for s, _ in res["loss"]), default=0)
            for ck in res["harm"]:
                past = [st for st in state if st <= int(ck)]
                ck_all += 1
                ck_on += bool(past) and state[max(past)]
    prec = tp / (tp + fp) if tp + fp else float("nan")
    rec = tp / (tp + fn) if tp + fn else float("nan")
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if tp else 0.0,
        "p_ci": wilson(tp, tp + fp),
        "r_ci": wilson(tp, tp + fn),
        "before": before,
        "harmful": tp + fn,
        "before_ci": wilson(before, tp + fn),  # of the share of harmful stages alerted strictly before
        "lead_median": statistics.median(leads) if leads else None,
        "fa_per_1000": 1000 * n_events / steps if steps else float("nan"),
        "fa_ci": poisson_rate(n_events, steps),
        "benign_ck_in_alarm": ck_on / ck_all if ck_all else float("nan"),
    }


def difference(
    stages: list[Stage], a: str, b: str, n: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """F1(a) - F1(b) and its 95% bootstrap interval over stage types (whole types resampled)."""
    types = sorted({r["type"] for r in stages})
    by = {t: [r for r in stages if r["type"] == t] for t in types}
    rng = random.Random(seed)

    def diff(sample: list[Stage]) -> float:
        return scores(sample, a)["f1"] - scores(sample, b)["f1"]

    boot = sorted(diff([r for t in rng.choices(types, k=len(types)) for r in by[t]]) for _ in range(n))
    return diff(stages), boot[int(0.025 * n)], boot[min(n - 1, int(0.975 * n))]


def table(stages: list[Stage], n_boot: int = 10_000) -> str:
    """Part 3's tables, as markdown."""
    harmful = sum(harm_step(r) is not None for r in stages)
    out = [
        f"{len(stages)} stages, {harmful} harmful / {len(stages) - harmful} benign.\n",
        "| stage | harm step | " + " | ".join(DETECTORS) + " |",
        "|---|---|" + "---|" * len(DETECTORS),
    ]
    for res in stages:
        h = harm_step(res)
        cells = []
        for name, det in DETECTORS.items():
            a = first_alert(det(res)) if applies(name, res) else None
            cells.append("n/a" if not applies(name, res) else "-" if a is None else f"{a}")
        out.append(f"| {res['name']} | {'-' if h is None else h} | " + " | ".join(cells) + " |")
    out += [
        "\n| detector | precision [95% CI] | recall [95% CI] | F1 | strictly before the harm | lead median | "
        "false alarms / 1,000 benign steps [95% CI] | benign checkpoints in alarm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    all_scores = {name: scores(stages, name) for name in DETECTORS}
    for name, s in all_scores.items():
        out.append(
            f"| {name} | {s['precision']:.2f} [{s['p_ci'][0]:.2f}, {s['p_ci'][1]:.2f}] | {s['recall']:.2f} "
            f"[{s['r_ci'][0]:.2f}, {s['r_ci'][1]:.2f}] | {s['f1']:.2f} | {s['before']} / {s['harmful']} | "
            f"{'-' if s['lead_median'] is None else s['lead_median']} | {s['fa_per_1000']:.1f} "
            f"[{s['fa_ci'][0]:.1f}, {s['fa_ci'][1]:.1f}] | "
            f"{s['benign_ck_in_alarm']:.2f} |"
        )
    rivals = [n for n in DETECTORS if n not in (V2, GRPO_ONLY)]
    best = max(rivals, key=lambda n: rank_key(all_scores[n]))
    d, lo, hi = difference(stages, V2, best, n=n_boot)
    verdict = "excludes 0" if lo > 0 or hi < 0 else "includes 0"
    out.append(
        f"\nv2 minus the best other detector ({best}): F1 {d:+.2f}, 95% interval over stage types "
        f"[{lo:+.2f}, {hi:+.2f}] ({verdict})."
    )
    agree, differ = live_agreement(stages)
    out.append(
        f"\nv2 live (topomon's rule engine during training) and replayed: the same first alert in {agree} of "
        f"{len(stages)} stages" + (f"; not in {', '.join(differ)}." if differ else ".")
    )
    ships = shipped(all_scores)
    runner_up = max((n for n in SHIPPABLE if n != ships), key=lambda n: rank_key(all_scores[n]))
    out += [
        f'\nShips (part 3, "What ships"; amendment 2): **{ships}** '
        f'(`topomon.alerts.DETECTORS["{LIBRARY[ships]}"]`).',
        f"- {score_line(ships, all_scores[ships])}.",
        f"- best other: {score_line(runner_up, all_scores[runner_up])}.",
        f"- reference: {score_line(REFERENCE, all_scores[REFERENCE])}.",
    ]
    if rank_key(all_scores[REFERENCE]) >= rank_key(all_scores[ships]):
        out.append("- No shippable detector beat flagging every stage: the README says so.")
    return "\n".join(out)


def progress(stages: list[Stage]) -> str:
    """Which pre-registered stages are saved (no detector is scored): name, harm step, time, commit."""
    saved = {r["name"]: r for r in stages}
    out = [
        f"{len(saved)} of {REGISTERED} pre-registered stages saved; "
        "the scores are computed once all are (docs/EARLY_WARNING.md part 3).\n",
        "| stage | harm step | seconds | commit |",
        "|---|---|---|---|",
    ]
    for s in SEEDS:
        for k in TYPES:
            for v in VARIANTS:
                r = saved.get(stage_name(k, v, s))
                if r is None:
                    out.append(f"| {stage_name(k, v, s)} | not run | | |")
                    continue
                h = harm_step(r)
                out.append(
                    f"| {r['name']} | {'-' if h is None else h} | {r.get('seconds', '')} | "
                    f"{(r.get('commit') or '')[:7]} |"
                )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="examples/early_warning/results2")
    p.add_argument("--bootstrap", type=int, default=10_000)
    a = p.parse_args(argv)
    folder = os.path.join(a.out, "stages")
    stages = load_stages(folder)
    if not stages:
        print(f"no saved stages in {folder}", file=sys.stderr)
        return 1
    if not all(r.get("tiny") for r in stages) and len(stages) < REGISTERED:
        print(progress(stages))  # the pre-registration: no score before every stage is saved
        return 0
    return publish(os.path.join(a.out, "tables2.md"), table(stages, a.bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
