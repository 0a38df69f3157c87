"""Detector v2, chosen on study 1 only (docs/EARLY_WARNING.md part 3).

    python examples/early_warning/v2.py --out examples/early_warning/results   # v2-choice.md, seconds

Each candidate combines the parts of the fair re-scoring (``fair.py``), every part at the knob tuned
on seed 0 there: topomon's default geometric rules as released, the probe ``logit_nll`` rise and the
training-loss drop. A combination fires at the first step its condition holds, each part latched
from its own first alert (what the alert engine's composite rules do). Detector v2 is the candidate
with the highest F1 on seed 0, then the most alerts strictly before the first measured harm, then the
longest median lead, then the fewest false alarms, then the *most* signal families (on a stage type
never seen, a family that study 1 did not need may be the only one that fires; the price of each
extra family, its false alarms, is what study 2 measures). The held-out seeds are shown, not used.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fair import HEADER, TUNABLE, First, Stage, released, row, tune  # noqa: E402
from study import HARM, HARMS, load_stages, publish, score  # noqa: E402

LOSS = "training-loss drop (4-step mean vs step 1)"
NLL = "probe logit_nll rise"


def v2_rules() -> list[dict[str, Any]]:
    """Detector v2 as topomon alert rules (``MonitorConfig.alerts``): one any-of composite whose parts
    are the default geometric rules as released, the probe NLL rise and the training-loss drop, at
    the knobs part 3 registered; the non-finite rule stays on as in every configuration."""
    return [
        {
            "type": "composite",
            "name": "v2",
            "k": 1,
            "parts": [
                {
                    "type": "drop",
                    "layer": "final_norm",
                    "metric": "rankme",
                    "threshold": 0.15,
                    "name": "rankme",
                },
                {
                    "type": "drop",
                    "layer": "final_norm",
                    "metric": "rankme_pca",
                    "threshold": 0.25,
                    "name": "rankme_pca",
                },
                {
                    "type": "drop",
                    "layer": "model",
                    "metric": "logit_nll",
                    "direction": "rise",
                    "threshold": 0.02,
                    "name": "probe_nll",
                },
                {
                    "type": "drop",
                    "layer": "trainer",
                    "metric": "loss",
                    "threshold": 0.70,
                    "window": 4,
                    "reference_window": 1,
                    "reference_floor": 0.0,
                    "name": "training_loss",
                },
            ],
        },
        {"type": "nonfinite"},
    ]


def k_of(k: int, *parts: First) -> First:
    """Fires at the first step at which ``k`` of ``parts`` have fired (each latched from its first alert)."""

    def first(res: Stage) -> int | None:
        steps = sorted(s for s in (p(res) for p in parts) if s is not None)
        return steps[k - 1] if len(steps) >= k else None

    return first


def candidates(tuning: list[Stage]) -> list[tuple[str, First, int]]:
    """(name, detector, number of parts) of every v2 candidate, the parts' knobs tuned on ``tuning``."""
    part: dict[str, Callable[[Stage], int | None]] = {"geometry": released}
    knobs = {}
    for key, short in ((NLL, "nll"), (LOSS, "loss")):
        grid, make, fmt = TUNABLE[key]
        k = tune(tuning, grid, make)
        part[short] = make(k)
        knobs[short] = fmt.format(k)
    g, n, lo = part["geometry"], part["nll"], part["loss"]
    desc = f"geometry = default rules; nll = logit_nll {knobs['nll']}; loss = {knobs['loss']}"
    return [
        (f"geometry alone ({desc})", g, 1),
        ("nll alone", n, 1),
        ("loss alone", lo, 1),
        ("any of geometry, nll", k_of(1, g, n), 2),
        ("any of geometry, loss", k_of(1, g, lo), 2),
        ("any of nll, loss", k_of(1, n, lo), 2),
        ("any of geometry, nll, loss", k_of(1, g, n, lo), 3),
        ("2 of geometry, nll, loss", k_of(2, g, n, lo), 3),
        ("geometry confirmed by nll or loss", lambda r: k_of(2, g, k_of(1, n, lo))(r), 3),
    ]


def choose(tuning: list[Stage]) -> str:
    """The best candidate on seed 0: F1, strictly before, lead, fewest false alarms, most parts."""
    best: tuple[tuple[float, int, float, int, int], str] | None = None
    for name, det, n_parts in candidates(tuning):
        s = score(tuning, "", first=det)
        lead = s["lead_median"] if s["lead_median"] is not None else -999.0
        key = (s["f1"], s["before"], lead, -s["fp"], n_parts)
        if best is None or key > best[0]:
            best = (key, name)
    assert best is not None
    return best[1]


def report(stages: list[Stage]) -> str:
    """The candidates on seed 0 (where v2 is chosen) and on seeds 1-2 (shown only), as markdown."""
    tuning = [r for r in stages if r["seed"] == 0]
    held = [r for r in stages if r["seed"] != 0]
    cands = candidates(tuning)
    out = [f"Chosen on seed 0: **{choose(tuning)}**.\n", "Seed 0 (the choice):\n", *HEADER]
    out += [row(name, "-", tuning, det) for name, det, _ in cands]
    out += ["\nSeeds 1-2 (shown, not used for the choice):\n", *HEADER]
    out += [row(name, "-", held, det) for name, det, _ in cands]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="examples/early_warning/results")
    p.add_argument("--harm", choices=sorted(HARMS), default="amended")
    a = p.parse_args(argv)
    HARM.update(HARMS[a.harm])
    stages = load_stages(os.path.join(a.out, "stages"))
    text = f"Harm definition: {a.harm} {HARMS[a.harm]}\n\n" + report(stages)
    return publish(os.path.join(a.out, f"v2-choice-{a.harm}.md"), text)


if __name__ == "__main__":
    raise SystemExit(main())
