"""The floor of a capture: one capture against the bare probe forward, in one process, interleaved.

SmolLM2-135M-Instruct, the default probe plan (64 texts, 512 points, batches of 16), the default
layers (4 blocks and the final norm). Timed, ``--repeats`` times each, in rotation: a capture with
logit statistics (what the default takes), one without, the decoder body alone (no LM head: what
bench/overhead.py calls the plain forward) and the full model forward (LM head on every token).
The first (cold) capture is timed apart.

    python bench/capture_floor.py [--out bench/results/capture_floor_cpu.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import emit_json

from topomon.capture.layers import model_layout
from topomon.capture.probe import ProbeCapture, _runner, plan_tokens
from topomon.capture.probes import load_probes
from topomon.models import load_smollm2

LAYERS = [7, 15, 22, 29]  # "auto" on SmolLM2's 30 blocks


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    a = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2()
    model.train()
    plan = plan_tokens(
        tok,
        load_probes(None, max_probes=64),
        max_length=64,
        batch_size=16,
        pooling="all",
        max_points=512,
        exclude_first=True,
        seed=0,
    )
    with_logits = ProbeCapture(plan, LAYERS, include_final_norm=True, logits=True)
    without = ProbeCapture(plan, LAYERS, include_final_norm=True, logits=False)
    body = _runner(model, model_layout(model))

    def forward(runner: Any) -> None:
        model.eval()
        with torch.no_grad():
            for inp, att in plan.batches:
                runner(input_ids=inp, attention_mask=att, use_cache=False)
        model.train()

    out: dict[str, Any] = {"cold_capture": _timed(lambda: with_logits.capture(model, 0, "x"))}
    runs: dict[str, Callable[[], Any]] = {
        "capture": lambda: with_logits.capture(model, 1, "x"),
        "capture_no_logits": lambda: without.capture(model, 1, "x"),
        "body": lambda: forward(body),
        "full": lambda: forward(model),
    }
    raw: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(a.repeats):  # in rotation: drift reaches every kind alike
        for name, fn in runs.items():
            raw[name].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in raw.items()}
    out.update({f"{k}_median": v for k, v in med.items()})
    out.update(
        {
            "capture/body": med["capture"] / med["body"],
            "capture/full": med["capture"] / med["full"],
            "capture_no_logits/body": med["capture_no_logits"] / med["body"],
            "cold_capture/body": out["cold_capture"] / med["body"],
            "tokens": plan.n_tokens,
            "points": plan.n_points,
            "raw": raw,
        }
    )
    emit_json(out, a.out)


if __name__ == "__main__":
    main()
