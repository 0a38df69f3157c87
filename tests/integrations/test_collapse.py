"""Issue 4's experiment on a tiny model: a collapsing stage trips the alert; the intervened run keeps rank."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def load_example():
    path = Path(__file__).resolve().parents[2] / "examples" / "collapse_intervention.py"
    spec = importlib.util.spec_from_file_location("collapse_intervention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_collapse_alert_and_intervention_keep_effective_rank(tmp_path):
    plain, intervened = load_example().compare(real=False, steps=40, seed=0, out=str(tmp_path))
    # the narrow stage concentrates the final-norm representation, and the default alert sees it early
    assert plain["rankme_pca"][-1] < 0.75 * plain["rankme_pca"][0]
    assert plain["alerts"] and plain["alerts"][0][0] <= 12  # within the first three captures (every 4 steps)
    assert not plain["actions"]
    # same seed: the same alert, now acting; both interventions switched on at the alert's step end
    assert intervened["alerts"][0] == plain["alerts"][0]
    assert {a[1] for a in intervened["actions"]} == {"replay", "diversity"}
    # the intervened run ends with a clearly higher effective rank
    assert intervened["rankme_pca"][-1] > 1.5 * plain["rankme_pca"][-1]
    assert intervened["rankme"][-1] > plain["rankme"][-1]
    # both runs learn the narrow data (loss on the narrow set itself, replay excluded)
    for run in (plain, intervened):
        assert run["narrow_loss_end"] < run["narrow_loss_start"]
    # every monitored layer is reported, its last value the last capture's
    assert "final_norm" in plain["layers_rankme_pca"] and len(plain["layers_rankme_pca"]) >= 2
    assert plain["layers_rankme_pca"]["final_norm"][-1] == plain["rankme_pca"][-1]
