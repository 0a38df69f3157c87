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
