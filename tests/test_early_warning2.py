"""Study 2 of the early-warning study (examples/early_warning/study2.py, analysis2.py): its harm
intervals, detectors and scores on hand-built stages with known answers, and a tiny run end to end."""

import importlib.util
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

FOLDER = Path(__file__).resolve().parents[1] / "examples" / "early_warning"


def _load(name):
    sys.path.insert(0, str(FOLDER))
    spec = importlib.util.spec_from_file_location(f"ew2_{name}", FOLDER / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _items(rng, n, shift=0.0):
    prose = [{"nll": 10.0 + rng.random() + shift * 20, "n": 20, "conf": [], "hit": []} for _ in range(n)]
    chat = []
    for _ in range(n):
        conf = [min(1.0, rng.random() + shift) for _ in range(rng.randint(3, 12))]
        chat.append(
            {"nll": 0.0, "n": len(conf), "conf": conf, "hit": [float(rng.random() < 0.5) for _ in conf]}
        )
    return {"prose": prose, "chat": chat}


def test_the_bootstrap_ece_equals_study_1s_ece_and_the_intervals_hold_known_answers():
    s2, s1 = _load("study2"), _load("study")
    rng = random.Random(3)
    base = _items(rng, 30)
    items = base["chat"]
    flat_c = [c for it in items for c in it["conf"]]
    flat_h = [h for it in items for h in it["hit"]]
    assert s2.ece_sums(s2.bin_sums(items).sum(0)) == pytest.approx(s1.ece(flat_c, flat_h), abs=1e-12)
    same = s2.harm_intervals(base, base)
    assert same["ood_ratio"] == pytest.approx([1.0, 1.0, 1.0]) and same["ece_delta"] == pytest.approx(
        [0, 0, 0]
    )
    # every prose item gains log(2) nats per token: the perplexity ratio is exactly 2 in every resample
    doubled = {"prose": [{**p, "nll": p["nll"] + p["n"] * math.log(2)} for p in base["prose"]], "chat": items}
    assert doubled and s2.harm_intervals(base, doubled)["ood_ratio"] == pytest.approx([2.0, 2.0, 2.0])
    # a noisy shift: the point estimate lies inside its interval, and the interval has width
    noisy = _items(random.Random(4), 30, shift=0.05)
    v, lo, hi = s2.harm_intervals(base, noisy)["ood_ratio"]
    assert lo < v < hi


def test_harm_needs_the_lower_end_of_the_interval_past_the_threshold():
    s2 = _load("study2")
    res = {
        "harm": {
            "4": {
                "ood_ratio": [1.30, 1.20, 1.40],
                "ece_delta": [0.0, -0.01, 0.01],
            },  # point past, interval not
            "8": {"ood_ratio": [1.0, 0.9, 1.1], "ece_delta": [0.07, 0.051, 0.09]},
        }
    }
    assert s2.harm_step(res) == 8
    res["harm"]["8"]["ece_delta"][1] = 0.049
    assert s2.harm_step(res) is None


def _stage(kind, seed, harm_at, nll_at=None, loss=None, entropy=None):
    """A saved study-2 stage: harm at ``harm_at`` (or none), the probe NLL up 5% from ``nll_at``."""
    ck = {str(s): {"ood_ratio": [1.0, 0.95, 1.05], "ece_delta": [0.0, -0.01, 0.01]} for s in range(4, 49, 4)}
    if harm_at is not None:
        ck[str(harm_at)]["ood_ratio"] = [2.0, 1.8, 2.2]
    records = []
    for step in range(0, 49, 4):
        nll = 3.0 * (1.05 if nll_at is not None and step >= nll_at else 1.0)
        records.append({"step": step, "stage": "stage", "layer": "model", "metrics": {"logit_nll": nll}})
        records.append(
            {
                "step": step,
                "stage": "stage",
                "layer": "final_norm",
                "metrics": {"rankme": 100.0, "rankme_pca": 50.0, "n_nonfinite": 0.0},
            }
        )
    loss = loss or [[s, 3.0] for s in range(1, 49)]
    streams = {"loss": loss, "grad_norm": [[s, 1.0] for s in range(1, 49)]}
    if entropy is not None:
        streams["entropy"] = entropy
    return {
        "name": f"{kind}-x-s{seed}",
        "type": kind,
        "seed": seed,
        "harm": ck,
        "loss": loss,
        "streams": streams,
        "records": records,
    }


def test_detectors_are_replayed_as_alarm_states_and_scored_per_step():
    a2 = _load("analysis2")
    falling = [[s, 3.0 if s < 10 else 0.5] for s in range(1, 49)]  # the 4-step mean reaches 0.5 at step 13
    stages = [
        _stage("dpo", 0, 8, nll_at=4),  # NLL alarm at 4: strictly before the harm at 8
        _stage("dpo", 1, 8, loss=falling),  # loss alarm at 13: late
        _stage("code", 0, None, nll_at=20),  # a false alarm (one episode) on a benign stage
        _stage("code", 1, None),
    ]
    assert a2.first_alert(a2.LOSS(stages[1])) == 13
    assert a2.events({0: False, 4: True, 8: True, 12: False, 16: True}) == 2
    s = a2.scores(stages, "nll + loss (any of)")
    assert (s["tp"], s["fp"], s["fn"], s["before"]) == (2, 1, 0, 1)
    # one alarm episode in 2 benign stages of 48 steps; 8 of their 24 checkpoints (20..48) in alarm
    assert s["fa_per_1000"] == pytest.approx(1000 / 96) and s["benign_ck_in_alarm"] == pytest.approx(8 / 24)
    assert a2.scores(stages, "probe NLL")["tp"] == 1
    # a GRPO loss that starts at or below 0 never fires the relative drop
    grpo = _stage("grpo", 0, None, loss=[[s, -0.01 * s] for s in range(1, 49)])
    assert a2.first_alert(a2.LOSS(grpo)) is None
    # TRL's entropy rule: scored on GRPO stages only; fires when the 4-step mean halves
    ent = [[s, 1.0 if s < 20 else 0.3] for s in range(1, 49)]
    grpo_h = _stage("grpo", 1, 24, entropy=ent)
    assert a2.first_alert(a2.DETECTORS["TRL entropy (grpo only)"](grpo_h)) == 22
    assert a2.scores([grpo_h, *stages], "TRL entropy (grpo only)")["harmful"] == 1


def test_the_false_alarm_rate_interval_is_the_exact_poisson_one():
    a2 = _load("analysis2")
    # Garwood's exact 95% limits for 0, 1 and 10 events (standard tables), per 1,000 of 1,000 steps
    assert a2.poisson_rate(0, 1000) == pytest.approx((0.0, 3.689), abs=1e-3)
    assert a2.poisson_rate(1, 1000) == pytest.approx((0.0253, 5.572), abs=1e-3)
    assert a2.poisson_rate(10, 1000) == pytest.approx((4.795, 18.39), abs=1e-2)
    assert a2.poisson_rate(10, 2000) == pytest.approx((2.398, 9.195), abs=1e-2)  # per 1,000 steps
    assert all(math.isnan(x) for x in a2.poisson_rate(0, 0))


def test_no_detector_is_scored_before_every_registered_stage_is_saved(tmp_path, capsys):
    import json

    a2 = _load("analysis2")
    (tmp_path / "stages").mkdir()
    for i, (kind, harm) in enumerate((("dpo", 8), ("code", None))):
        res = _stage(kind, 0, harm, nll_at=4) | {
            "name": f"{kind}-benign-s0",
            "tiny": False,
            "commit": "ab" * 20,
        }
        (tmp_path / "stages" / f"{kind}-benign-s0.json").write_text(json.dumps(res | {"seconds": 10.0 + i}))
    assert a2.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 of 36 pre-registered stages saved")
    assert "| dpo-benign-s0 | 8 | 10.0 | ababab" in out and "| code-benign-s0 | - | 11.0 | ababab" in out
    assert "| grpo-harmful-s2 | not run | | |" in out
    assert not (tmp_path / "tables2.md").exists() and "precision" not in out


def test_v2_minus_the_best_baseline_is_bootstrapped_over_whole_stage_types():
    a2 = _load("analysis2")
    # nll fires in every harmful stage of both types; nothing else fires: v2 == nll + loss on every resample
    stages = [_stage(k, s, 8, nll_at=4) for k in ("dpo", "code") for s in (0, 1)] + [
        _stage(k, 2, None) for k in ("dpo", "code")
    ]
    d, lo, hi = a2.difference(stages, "v2 (any of geometry, nll, loss)", "nll + loss (any of)", n=200)
    assert (d, lo, hi) == (0.0, 0.0, 0.0)
    d, lo, hi = a2.difference(stages, "v2 (any of geometry, nll, loss)", "loss spike", n=200)
    assert d == 1.0 and lo == 1.0
    text = a2.table(stages, n_boot=100)
    assert "v2 minus the best other detector" in text and "| dpo-x-s0 | 8 |" in text
    assert np.isfinite(a2.scores(stages, "flag every stage")["fa_per_1000"])
    # v2 and "nll + loss" tie: the geometry adds nothing, "nll + loss" ships (part 3, "What ships")
    assert "Ships (part 3" in text
    assert '**nll + loss (any of)** (`topomon.alerts.DETECTORS["nll+loss"]`)' in text


def test_what_ships_follows_the_pre_registered_order_and_never_the_reference():
    a2 = _load("analysis2")

    def sc(f1, before, fa=1.0):
        return {"f1": f1, "before": before, "fa_per_1000": fa}

    base = {n: sc(0.5, 1) for n in a2.DETECTORS}
    assert a2.shipped(base | {a2.V2: sc(0.8, 3)}) == a2.V2
    # v2 best, but "nll + loss" has its F1 and strictly-before count: the geometry adds nothing
    assert a2.shipped(base | {a2.V2: sc(0.8, 3, fa=0.5), a2.NLL_LOSS: sc(0.8, 3, fa=2.0)}) == a2.NLL_LOSS
    assert a2.shipped(base | {a2.V2: sc(0.8, 4), a2.NLL_LOSS: sc(0.8, 3)}) == a2.V2
    # ties on F1: more alerts strictly before the harm, then fewer false alarms
    assert a2.shipped(base | {"probe NLL": sc(0.9, 2), "loss spike": sc(0.9, 5)}) == "loss spike"
    assert (
        a2.shipped(base | {"probe NLL": sc(0.9, 5, fa=3.0), "loss spike": sc(0.9, 5, fa=1.0)}) == "loss spike"
    )
    # flagging every stage is the reference, never the default; nor TRL's entropy (GRPO stages only)
    best = base | {
        a2.REFERENCE: sc(0.95, 9),
        "TRL entropy (grpo only)": sc(1.0, 9),
        "grad-norm level": sc(0.6, 1),
    }
    assert a2.shipped(best) == "grad-norm level"


def _replay_live(rules, res):
    """topomon's alert engine fed a saved stage as live training feeds it: each step's trainer log,
    then that step's capture records; the first step any non-recovery alert fires."""
    from topomon.alerts import AlertEngine
    from topomon.alerts.rules import rules_from_config
    from topomon.pipeline import record_from_json

    recs = [record_from_json(r) for r in res["records"]]
    engine = AlertEngine(rules_from_config(rules), {k for r in recs for k in r.metrics})
    logs: dict[int, dict[str, float]] = {}
    for key in ("loss", "grad_norm"):
        for s, v in res.get(key, []):
            logs.setdefault(int(s), {})[key] = v
    for step in sorted({r.step for r in recs} | set(logs)):
        fired = engine.update_trainer(step, "stage", logs[step]) if step in logs else []
        fired += engine.update([r for r in recs if r.step == step])
        if any(a.reason != "recovered" for a in fired):
            return step
    return None


@pytest.mark.parametrize(
    "name",
    [
        "v1",
        "v2",
        "nll+loss",
        "training-loss drop",
        "probe NLL",
        "loss spike",
        "grad-norm spike",
        "grad-norm level",
    ],
)
def test_every_named_detector_fires_live_where_part_3_scores_it(name):
    """Each detector of ``topomon.alerts.DETECTORS`` (what ``alerts="<name>"`` and the shipped default
    run) in topomon's rule engine, fed each step's trainer log and capture as in training, against the
    offline replay part 3 scores (analysis2.py; v1 against study 1's released rules), on every saved
    stage of study 1: the same first alert step in all 24. v2's rules are v2.py's."""
    import json

    from topomon.alerts import DETECTORS

    a2, fair = _load("analysis2"), _load("fair")
    scored_as = {lib: name for name, lib in a2.LIBRARY.items()}
    assert set(a2.LIBRARY) == set(a2.SHIPPABLE) and set(scored_as) == set(DETECTORS)
    assert _load("v2").v2_rules() == [*DETECTORS["v2"], {"type": "nonfinite"}]
    stages = [json.loads(p.read_text()) for p in sorted((FOLDER / "results" / "stages").glob("*.json"))]
    assert len(stages) == 24
    offline = {
        r["name"]: fair.released(r)
        if name == "v1"
        else a2.first_alert(
            a2.DETECTORS[scored_as[name]]({**r, "streams": {k: r[k] for k in ("loss", "grad_norm")}})
        )
        for r in stages
    }
    live = {r["name"]: _replay_live([*DETECTORS[name], {"type": "nonfinite"}], r) for r in stages}
    assert live == offline
    assert sum(v is not None for v in live.values()) >= 8  # the comparison is not over silence


def test_the_loss_part_is_silent_on_a_reference_at_or_below_zero_and_reads_the_first_value():
    from topomon.alerts.rules import DropRule

    part = {"type": "drop", "layer": "trainer", "metric": "loss", "threshold": 0.7, "window": 4}
    first_value = {**part, "reference_window": 1, "reference_floor": 0.0}
    res = {"records": [], "loss": [[1, 4.0], [2, 1.0], [3, 1.0], [4, 1.0], [5, 1.0], [6, 1.0]]}
    # means of the last 4: step 4 1.75, step 5 1.0 (<= 30% of the first value, 4.0)
    assert _replay_live([first_value], res) == 5
    # with a window-4 reference (the default) the same series compares with the first 4's mean, 1.75
    assert _replay_live([part], res) is None
    grpo = {"records": [], "loss": [[s, -0.01 * s] for s in range(1, 30)]}  # a policy loss from below 0
    assert _replay_live([first_value], grpo) is None
    assert _replay_live([{**first_value, "reference_floor": None}], grpo) is not None  # the floor does it
    with pytest.raises(ValueError, match="reference_window"):
        DropRule("loss", layer="trainer", reference_window=0)


@pytest.mark.slow
def test_a_tiny_study_2_stage_trains_with_v2_live_saves_and_is_scored_offline(tmp_path):
    import json

    s2, a2 = _load("study2"), _load("analysis2")
    out = tmp_path / "ew2"
    assert (
        s2.main(["--tiny", "--out", str(out), "--types", "trace", "--variants", "harmful", "--seeds", "0"])
        == 0
    )
    saved = json.loads((out / "stages" / "trace-harmful-s0.json").read_text())
    assert sorted(int(k) for k in saved["harm"]) == [2, 4, 6, 8]  # harm at every capture step
    assert all(len(v) == 3 and v[1] <= v[0] <= v[2] for h in saved["harm"].values() for v in h.values())
    assert [s for s, _ in saved["loss"]] == list(range(1, 9)) and "entropy" in saved["streams"]
    assert {r["layer"] for r in saved["records"]} >= {"final_norm", "model"}
    run = out / "runs" / "trace-harmful-s0"
    assert (run / "run.json").exists()
    # v2 ran live: the stage's config carries its composite rule
    assert "training_loss" in (run / "run.json").read_text()
    assert a2.main(["--out", str(out), "--bootstrap", "50"]) == 0
    tables = (out / "tables2.md").read_text()
    assert "| trace-harmful-s0 |" in tables
    # part 3: v2 run live in the stage and v2 replayed offline from its logs alert first at the same step
    assert "the same first alert in 1 of 1 stages." in tables
