"""Bad numbers: NaN/Inf activations (an fp16 overflow), all-identical points, a collapsed rank-1 layer.

No crash; each metric is a number or a documented NaN; the non-finite activations are counted
(``n_nonfinite``) and the default ``nonfinite`` alert fires. Unit-level properties of the metric
functions on such inputs live in ``tests/metrics/test_properties.py`` and ``test_spectral.py``; here
they go through the engine, the JSONL log, the alert engine and real trainers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from transformers import TrainerCallback

from tests.integrations.test_monitor import run_sft
from tests.reliability._support import jsonl, metric_lines, same_metrics, sft_data
from topomon import TopoMonitor
from topomon.alerts import AlertEngine, default_rules
from topomon.capture.layers import decoder_layers
from topomon.metrics.families import metric_names
from topomon.testing import tiny_causal_lm, tiny_tokenizer
from topomon.types import Snapshot
from topomon.worker.engine import ComputeOptions, MetricEngine

OPTS = ComputeOptions(topology_points=48, pca_dim=None)
RNG = np.random.default_rng(0)


def _fp16_overflow(n: int = 40, d: int = 12) -> np.ndarray:
    x = RNG.standard_normal((n, d)).astype(np.float32)
    with np.errstate(over="ignore"):
        x[:5] = (x[:5].astype(np.float16) * np.float16(1e5)).astype(np.float32)  # |x| > 0.66 -> inf
    return x


def _process(x: np.ndarray) -> dict[str, float]:
    rec = next(r for r in MetricEngine(OPTS).process(Snapshot(0, "sft", {"l": x})) if r.layer == "l")
    json.dumps(rec.to_json(), allow_nan=False)  # the JSONL line is writable whatever the input
    return rec.metrics


def test_identical_points_give_the_documented_values():
    m = _process(np.full((40, 12), 0.5, np.float32))
    # one raw direction: RankMe = exp(entropy of (1, eps, ...)) ~ 1; stable rank 1; cosine 1
    assert m["rankme"] == pytest.approx(1.0, abs=1e-4)
    assert m["stable_rank"] == pytest.approx(1.0) and m["anisotropy"] == pytest.approx(1.0)
    # no variance: every centred-spectrum metric is NaN (documented in topomon.metrics.spectral)
    for k in ("rankme_pca", "participation_ratio", "top_pc_share", "alpha_req"):
        assert math.isnan(m[k]), k
    # every point at one place: zero persistence, no H1, entropy of an all-zero diagram is NaN
    assert m["h0_total_persistence"] == 0.0 and m["h1_count"] == 0.0 and math.isnan(m["h0_entropy"])
    assert m["n_points"] == 40 and m["n_nonfinite"] == 0


def test_a_rank_one_layer_gives_rank_one():
    x = np.outer(RNG.standard_normal(40), RNG.standard_normal(12)).astype(np.float32)
    m = _process(x)
    for k in ("rankme", "rankme_pca", "participation_ratio", "stable_rank", "top_pc_share"):
        assert m[k] == pytest.approx(1.0, abs=1e-3), k


def test_fp16_overflow_rows_are_dropped_counted_and_the_rest_measured():
    x = _fp16_overflow()
    bad = ~np.isfinite(x).all(axis=1)
    assert bad.sum() == 5
    m = _process(x)
    assert m["n_nonfinite"] == 5 and m["n_points"] == 35
    # the metrics are those of the finite rows alone (an independent run on the cleaned cloud)
    clean = _process(x[~bad])
    assert same_metrics(
        {k: v for k, v in m.items() if k != "n_nonfinite"},
        {k: v for k, v in clean.items() if k != "n_nonfinite"},
    )


@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf])
def test_an_all_nonfinite_layer_is_nan_with_a_reason_and_fires_the_alert(fill):
    eng = MetricEngine(OPTS)
    snap = Snapshot(
        3,
        "sft",
        {"ok": RNG.standard_normal((40, 12)).astype(np.float32), "dead": np.full((40, 12), fill, np.float32)},
    )
    recs = {r.layer: r for r in eng.process(snap) if r.layer in snap.layers}
    dead = recs["dead"]
    assert dead.metrics["n_nonfinite"] == 40 and dead.metrics["n_points"] == 0
    assert all(math.isnan(v) for k, v in dead.metrics.items() if not k.startswith("n_"))
    assert any(e.startswith("spectral:") for e in dead.errors)  # the reason travels with the record
    assert recs["ok"].errors == [] and recs["ok"].metrics["rankme"] > 1
    line = dead.to_json()
    assert line["metrics"]["rankme"] is None  # NaN is written as null, the line stays valid JSON
    engine = AlertEngine(default_rules(), metric_names(OPTS))
    alerts = engine.update(list(recs.values()))
    assert [(a.layer, a.reason, a.severity) for a in alerts] == [("dead", "nonfinite", "critical")]
    json.dumps(alerts[0].to_json(), allow_nan=False)


finite_or_not = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, -1.0, 3.4e38, -3.4e38, 1e-45, 65504.0]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=st.integers(0, 30).flatmap(
        lambda n: st.integers(1, 6).flatmap(lambda d: arrays(np.float32, (n, d), elements=finite_or_not))
    ),
    repeat=st.booleans(),
)
def test_the_engine_never_raises_and_counts_every_row(x, repeat):
    if repeat and len(x):
        x = np.repeat(x[:1], len(x), axis=0)  # all-identical points, whatever they hold
    recs = [r for r in MetricEngine(OPTS).process(Snapshot(0, "sft", {"l": x})) if r.layer == "l"]
    assert len(recs) == 1
    m = recs[0].metrics
    assert all(isinstance(v, float) for v in m.values())
    n_bad = int((~np.isfinite(x).all(axis=1)).sum()) if x.size else 0
    assert m["n_nonfinite"] == n_bad
    assert m["n_points"] + m["n_outliers"] + m["n_nonfinite"] == len(x)
    json.dumps(recs[0].to_json(), allow_nan=False)


# --------------------------------------------------------------------------- in a real trainer
class Inject(TrainerCallback):
    """Rewrites one decoder block's output at chosen steps: ``plan = {step: (block, kind)}``.

    ``probe=True`` touches only the monitor's no-grad probe forward (training is unaffected);
    ``probe=False`` touches the training forward itself (passive mode sees it; the loss goes NaN).
    """

    def __init__(self, model, plan, probe=True):
        self.plan, self.probe, self.current = plan, probe, None
        d = model.config.hidden_size
        self.direction = torch.randn(d, generator=torch.Generator().manual_seed(0))
        for i, block in enumerate(decoder_layers(model)):
            block.register_forward_hook(lambda m, a, out, _i=i: self._hook(_i, out))

    def on_step_begin(self, args, state, control, **kw):
        if not self.probe:
            self.current = self.plan.get(state.global_step + 1)

    def on_step_end(self, args, state, control, **kw):
        if self.probe:
            self.current = self.plan.get(state.global_step)  # runs before the monitor's capture

    def _hook(self, i, out):
        if self.current is None or self.current[0] != i or torch.is_grad_enabled() == self.probe:
            return None
        h = out[0] if isinstance(out, tuple) else out
        kind = self.current[1]
        if kind == "identical":
            new = torch.full_like(h, 0.5)
        elif kind == "rank1":
            new = h[..., :1] * self.direction.to(h.dtype)
        else:  # an fp16 overflow of one token: row 0, position 3 of every batch
            new = h.clone()
            new[0, 3] = (h[0, 3].detach().half() * 1e7).to(h.dtype)  # |h| > 0.0066 -> inf
        return (new, *out[1:]) if isinstance(out, tuple) else new


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.slow
def test_probe_captures_with_overflow_identical_and_rank_one_layers(tok, tmp_path):
    model = tiny_causal_lm("llama", seed=0)
    plan = {1: (1, "identical"), 2: (3, "overflow"), 3: (1, "rank1")}
    inject = Inject(model, plan, probe=True)
    mon = TopoMonitor(
        schedule="every",
        every_n_steps=1,
        worker="sync",
        max_probes=8,
        max_points=4096,
        topology_points=48,
        pca_dim=None,
        figures_every=0,
    )
    trainer = run_sft(model, tok, sft_data(), tmp_path, mon, [inject])
    assert trainer.state.global_step == 4 and mon.errors == 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)  # training never saw the faults
    recs = {(r["step"], r["layer"]): r["metrics"] for r in metric_lines(tmp_path / "topomon", "train")}
    assert sorted({s for s, _ in recs}) == [0, 1, 2, 3, 4]
    # step 1: layer_1 replaced by one point repeated
    m = recs[(1, "layer_1")]
    assert m["rankme"] == pytest.approx(1.0, abs=1e-4) and m["stable_rank"] == pytest.approx(1.0)
    assert m["rankme_pca"] is None and m["participation_ratio"] is None  # NaN -> null, documented
    # step 2: one token overflowed in fp16 at layer_3: exactly that row is non-finite there and after
    # the final norm; earlier layers are clean; the metrics of the other rows are defined
    assert [
        recs[(2, ly)]["n_nonfinite"] for ly in ("layer_0", "layer_1", "layer_2", "layer_3", "final_norm")
    ] == [0, 0, 0, 1, 1]
    assert recs[(2, "final_norm")]["rankme"] > 1 and recs[(2, "layer_3")]["rankme"] > 1
    # step 3: a collapsed rank-1 layer
    m = recs[(3, "layer_1")]
    for k in ("rankme", "rankme_pca", "participation_ratio", "stable_rank", "top_pc_share"):
        assert m[k] == pytest.approx(1.0, abs=1e-3), k
    # the non-finite alert fires at step 2 for the two layers and recovers at step 4
    alerts = [a for a in jsonl(tmp_path / "topomon" / "alerts.jsonl") if a["rule"] == "nonfinite@*"]
    fired = sorted((a["step"], a["layer"]) for a in alerts if a["reason"] == "nonfinite")
    assert fired == [(2, "final_norm"), (2, "layer_3")]
    assert all(a["severity"] == "critical" for a in alerts if a["reason"] == "nonfinite")
    assert sorted((a["step"], a["layer"]) for a in alerts if a["reason"] == "recovered") == [
        (3, "final_norm"),
        (3, "layer_3"),
    ]


@pytest.mark.slow
def test_an_overflow_in_the_training_forward_is_seen_in_passive_mode(tok, tmp_path):
    model = tiny_causal_lm("llama", seed=0)
    inject = Inject(model, {2: (3, "overflow")}, probe=False)
    mon = TopoMonitor(
        mode="passive",
        schedule="every",
        every_n_steps=1,
        worker="sync",
        max_points=4096,
        topology=False,
        layers=[3],
    )
    trainer = run_sft(model, tok, sft_data(), tmp_path, mon, [inject])
    assert trainer.state.global_step == 4 and mon.errors == 0  # a NaN loss does not stop the monitor
    recs = {(r["step"], r["layer"]): r for r in metric_lines(tmp_path / "topomon", "train")}
    assert sorted({s for s, _ in recs}) == [1, 2, 3, 4]
    for ly in ("layer_3", "final_norm"):
        assert recs[(1, ly)]["metrics"]["n_nonfinite"] == 0
        assert recs[(2, ly)]["metrics"]["n_nonfinite"] == 1  # the overflowed token
        # the NaN loss made the weights NaN: every later point is non-finite, metrics null, with a reason
        for step in (3, 4):
            r = recs[(step, ly)]
            assert r["metrics"]["n_points"] == 0 and r["metrics"]["n_nonfinite"] > 0
            assert r["metrics"]["rankme"] is None and r["errors"]
    alerts = jsonl(tmp_path / "topomon" / "alerts.jsonl")
    fired = [(a["step"], a["layer"], a["severity"]) for a in alerts if a["reason"] == "nonfinite"]
    # once per layer, at the overflow, and not again while it stays non-finite
    assert sorted(fired) == [(2, "final_norm", "critical"), (2, "layer_3", "critical")]
