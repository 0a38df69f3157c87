"""The early-warning study (examples/early_warning): its detectors against references, and a tiny run."""

import importlib.util
import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

FOLDER = Path(__file__).resolve().parents[1] / "examples" / "early_warning"


def _study():
    sys.path.insert(0, str(FOLDER))
    spec = importlib.util.spec_from_file_location("ew_study", FOLDER / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _lightning_first_spike(series, tmp_path):
    """The first spiking step by Lightning's own SpikeDetection (defaults), driven batch by batch."""
    import torch
    from lightning.fabric.utilities.spike import SpikeDetection, TrainingSpikeException

    sd = SpikeDetection(exclude_batches_path=str(tmp_path / "skip.json"))
    strategy = SimpleNamespace(
        root_device=torch.device("cpu"), barrier=lambda: None, reduce_boolean_decision=lambda d, all: d
    )
    fabric = SimpleNamespace(strategy=strategy, global_rank=0)
    for i, (step, x) in enumerate(series):
        try:
            sd.on_train_batch_end(fabric, torch.tensor(x), None, i)
        except TrainingSpikeException:
            return step
    return None


@pytest.mark.parametrize("seed", range(6))
def test_the_loss_spike_detector_agrees_with_lightnings_spike_detection(seed, tmp_path):
    pytest.importorskip("lightning")
    st = _study()
    rng = random.Random(seed)
    series = [[i + 1, 2.0 * 0.97**i + rng.random() * 0.05] for i in range(40)]
    if seed % 2 == 0:  # a spike of 4x at a random step; the odd seeds have none
        k = rng.randrange(5, 40)
        series[k][1] *= 4.0
    assert st.spike_first(series) == _lightning_first_spike(series, tmp_path)
    if seed % 2 == 0:
        assert st.spike_first(series) is not None


def test_auc_matches_scipys_mann_whitney():
    from scipy.stats import mannwhitneyu

    st = _study()
    rng = random.Random(1)
    scores = [rng.random() for _ in range(30)] + [0.5] * 4
    labels = [rng.random() < 0.4 for _ in range(34)]
    u = mannwhitneyu(
        [s for s, y in zip(scores, labels, strict=True) if y],
        [s for s, y in zip(scores, labels, strict=True) if not y],
    ).statistic
    assert st.auc(scores, labels) == pytest.approx(u / (sum(labels) * (len(labels) - sum(labels))))


def test_harm_step_is_the_first_checkpoint_past_any_threshold():
    st = _study()
    base = {"ood_ppl": 10.0, "plasticity": 2.0, "ece": 0.02}
    ok = {"ood_ppl": 11.0, "plasticity": 2.1, "ece": 0.05}
    res = {"base": base, "checkpoints": {"8": ok, "16": dict(ok, ece=0.071), "24": dict(ok, ood_ppl=13.0)}}
    assert st.harm_step(res) == 16
    res["checkpoints"]["16"] = ok
    assert st.harm_step(res) == 24
    res["checkpoints"]["24"] = dict(ok, plasticity=2.2)  # exactly 1.10x counts
    assert st.harm_step(res) == 24
    res["checkpoints"]["24"] = ok
    assert st.harm_step(res) is None


@pytest.mark.slow
def test_the_tiny_study_trains_saves_and_remakes_its_tables(tmp_path):
    st = _study()
    out = tmp_path / "ew"
    assert st.main(["--tiny", "--out", str(out), "--seeds", "0", "--configs", "narrow-full-high"]) == 0
    saved = json.loads((out / "stages" / "narrow-full-high-s0.json").read_text())
    assert set(saved["checkpoints"]) == {"4", "8"}
    assert all(math.isfinite(v) for m in saved["checkpoints"].values() for v in m.values())
    assert [s for s, _ in saved["loss"]] == list(range(1, 9))
    assert sorted({r["step"] for r in saved["records"]}) == [0, 2, 4, 6, 8]
    tables = (out / "tables.md").read_text()
    # --no-train remakes the same tables from the saved JSON alone
    (out / "tables.md").unlink()
    assert st.main(["--tiny", "--no-train", "--out", str(out)]) == 0
    assert (out / "tables.md").read_text() == tables
    assert "narrow-full-high-s0" in tables and (out / "stages.png").stat().st_size > 10_000
    # a stage run again (its JSON gone, its folders left from before) starts afresh: its records are
    # this run's, once per capture, not the old run's (topomon would continue the folder as "stage-2")
    (out / "stages" / "narrow-full-high-s0.json").unlink()
    assert st.main(["--tiny", "--out", str(out), "--seeds", "0", "--configs", "narrow-full-high"]) == 0
    again = json.loads((out / "stages" / "narrow-full-high-s0.json").read_text())
    final = [r["step"] for r in again["records"] if r["layer"] == "final_norm"]
    assert final == [0, 2, 4, 6, 8]
    assert all(a["stage"] == "stage" and a["step"] <= 8 for a in again["live_alerts"])
    lines = (out / "runs" / "narrow-full-high-s0" / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(x)["stage"] for x in lines} <= {"base", "stage"}  # one run in the folder


def _fake_stage(cfg, seed, harm_at, pr_change, fire_at=None):
    """A saved stage built by hand: harm at checkpoint ``harm_at`` (or none), the final norm's RankMe
    falling 20% at ``fire_at`` (topomon's default rule fires there), a block's participation ratio
    changing by ``pr_change`` from step 0 to step 8."""
    base = {"ood_ppl": 10.0, "plasticity": 2.0, "ece": 0.02, "indomain_loss": 3.0}
    ck = {str(s): dict(base) for s in (8, 16, 24, 32, 40, 48)}
    if harm_at is not None:
        ck[str(harm_at)]["ood_ppl"] = 20.0
    records = []
    for step in range(0, 49, 4):
        rank = 100.0 * (0.8 if fire_at is not None and step >= fire_at else 1.0)
        records.append(
            {
                "step": step,
                "stage": "stage",
                "layer": "final_norm",
                "metrics": {"rankme": rank, "rankme_pca": rank, "n_nonfinite": 0.0},
            }
        )
        pr = 50.0 * (1 + pr_change if step >= 8 else 1.0)
        records.append(
            {"step": step, "stage": "stage", "layer": "layer_7", "metrics": {"participation_ratio": pr}}
        )
    flat = [[s, 3.0] for s in range(1, 49)]
    live = [] if fire_at is None else [{"step": fire_at, "reason": "drop"}]
    return {
        "name": f"{cfg}-s{seed}",
        "data": cfg.split("-")[0],
        "seed": seed,
        "base": base,
        "checkpoints": ck,
        "records": records,
        "loss": flat,
        "grad_norm": flat,
        "live_alerts": live,
    }


def test_the_held_out_auc_keeps_the_sign_chosen_on_seed_0():
    st = _study()
    # seed 0: a falling participation ratio comes with harm; seeds 1-2: the opposite
    results = [
        _fake_stage("narrow-full-high", 0, 8, -0.5),
        _fake_stage("broad-full-low", 0, None, +0.1),
        _fake_stage("narrow-full-high", 1, 8, +0.3),
        _fake_stage("broad-full-low", 1, None, -0.3),
        _fake_stage("narrow-full-high", 2, 16, +0.2),
        _fake_stage("broad-full-low", 2, None, -0.2),
    ]
    rows = [r for r in st.auc_table(results, st.Sizes(False)) if r.startswith("| participation_ratio")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[4:] == ["drop", "1.00", "0.00"]  # the held-out half is not flipped to look good


def test_the_per_configuration_table_counts_leads_misses_and_false_alarms():
    st = _study()
    results = [
        _fake_stage("narrow-full-high", 0, 8, 0.0, fire_at=4),  # lead +4
        _fake_stage("narrow-full-high", 1, 16, 0.0, fire_at=4),  # lead +12
        _fake_stage("narrow-full-high", 2, 8, 0.0),  # missed
        _fake_stage("broad-full-low", 0, None, 0.0, fire_at=20),  # false alarm
        _fake_stage("broad-full-low", 1, None, 0.0),
    ]
    names = ["topomon (live)", "topomon (replayed)"]
    rows = {
        r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")]
        for r in st.lead_table(results, names)[2:]
    }
    assert rows["narrow-full-high"][1:] == ["3/3", "+8 (+4..+12), 2/3", "+8 (+4..+12), 2/3"]
    assert rows["broad-full-low"][1:] == ["0/2", "-, 1 FA", "-, 1 FA"]
    s = st.score(results, "topomon (replayed)")
    assert (s["precision"], s["recall"], s["false_alarms"], s["lead_median"]) == (2 / 3, 2 / 3, 1, 8)


def _fair():
    _study()  # puts the study's folder on the path (fair.py imports study.py)
    spec = importlib.util.spec_from_file_location("ew_fair", FOLDER / "fair.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 11), (7, 7), (5, 16), (1, 2)])
def test_the_wilson_interval_inverts_the_score_test(k, n):
    from scipy.optimize import brentq

    fair = _fair()
    lo, hi = fair.wilson(k, n)
    z, phat = 1.96, k / n

    def score(p):  # the score statistic minus z: zero at the interval's ends
        return abs(phat - p) - z * math.sqrt(p * (1 - p) / n)

    ref_lo = 0.0 if k == 0 else brentq(score, 1e-12, phat - 1e-12)
    ref_hi = 1.0 if k == n else brentq(score, phat + 1e-12, 1 - 1e-12)
    assert lo == pytest.approx(ref_lo, abs=1e-9) and hi == pytest.approx(ref_hi, abs=1e-9)
    assert math.isnan(fair.wilson(0, 0)[0])


def test_the_loss_drop_rule_fires_on_the_first_window_mean_under_the_fraction():
    fair = _fair()
    loss = [[1, 4.0], [2, 4.0], [3, 3.0], [4, 2.0], [5, 1.0], [6, 1.0], [7, 0.5]]
    res = {"loss": loss}
    # 4-step means: step 4 3.25, step 5 2.5, step 6 1.75, step 7 1.125 (step-1 loss 4.0)
    assert fair.loss_drop_first(res, 0.7) == 5
    assert fair.loss_drop_first(res, 0.5) == 6
    assert fair.loss_drop_first(res, 0.2) is None


def test_fair_tuning_uses_the_tuning_half_only_and_counts_alerts_strictly_before_the_harm():
    fair = _fair()
    # seed 0: the RankMe drop comes with harm; seeds 1-2: alerts at the harm step are hits but not "before"
    stages = [
        _fake_stage("narrow-full-high", 0, 8, 0.0, fire_at=4),
        _fake_stage("broad-full-low", 0, None, 0.0),
        _fake_stage("narrow-full-high", 1, 8, 0.0, fire_at=8),
        _fake_stage("narrow-full-high", 2, 16, 0.0, fire_at=4),
        _fake_stage("broad-full-low", 1, None, 0.0, fire_at=20),
    ]
    c = fair.counts(stages[2:], fair.released)
    assert (c["tp"], c["fp"], c["fn"], c["before"], c["harmful"]) == (2, 1, 0, 1, 2)
    # the knob is chosen on seed 0 alone: the seed-1 false alarm at a 20% drop cannot push it past 20%
    grid, make, _ = fair.TUNABLE["topomon rules (both drop thresholds tuned)"]
    a, b = fair.tune(stages[:2], grid, make)
    # a pair fires when either threshold is under the 20% drop; of the tied pairs the last in the grid
    # (the most conservative) wins: rankme 40% (never fires here), rankme_pca 15%
    assert (a, b) == (0.4, 0.15)
    table = fair.report(stages, _study().Sizes(False), n_shuffle=20)
    assert "| topomon defaults (as released) |" in table and "1 / 2 |" in table


def test_the_grad_norm_level_rule_compares_with_the_median_of_the_first_steps():
    fair = _fair()
    series = [[1, 1.0], [2, 3.0], [3, 2.0], [4, 100.0], [5, 5.0], [6, 9.0]]  # median of steps 1-4: 2.5
    assert fair.level_first(series, 2.0) == 5
    assert fair.level_first(series, 3.0) == 6
    assert fair.level_first(series, 4.0) is None
    assert fair.level_first(series[:4], 1.0) is None


def test_v2_candidates_latch_each_part_and_fire_when_k_parts_have():
    _fair()
    spec = importlib.util.spec_from_file_location("ew_v2", FOLDER / "v2.py")
    v2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v2)
    parts = [lambda r: 12, lambda r: None, lambda r: 4]
    assert v2.k_of(1, *parts)({}) == 4
    assert v2.k_of(2, *parts)({}) == 12
    assert v2.k_of(3, *parts)({}) is None
