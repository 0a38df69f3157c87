"""What the worker process must import by name: user metric families and custom metrics.

A spawned worker runs neither the training script nor the code that registered something in the
training process; it imports what the config names. A family or custom metric it cannot import is a
ConfigError before step 1, never a worker that computes nothing (or dies at start).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import topomon
from tests.integrations.conftest import read_jsonl
from tests.metrics.user_family import ROWS
from topomon.config import ConfigError
from topomon.metrics.families import family_of, register_family, unregister_family
from topomon.testing import sample_texts, tiny_causal_lm

ROOT = Path(__file__).resolve().parents[2]
SPEC = "tests.metrics.user_family:ROWS"
RULE = {"type": "threshold", "metric": "user_rows", "layer": "final_norm", "above": 0.0, "name": "rows"}


@pytest.fixture
def clean_registry():
    yield
    unregister_family(ROWS.name)


def _train(model, tok, mon, steps=4):
    texts = sample_texts(steps * 4, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        enc = tok(
            texts[(step - 1) * 4 : step * 4],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=32,
        )
        model(**enc, labels=enc["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(step)


@pytest.mark.slow
def test_a_family_named_in_families_is_computed_by_the_worker_process_and_alerts_on_it(
    tok, tmp_path, clean_registry
):
    model = tiny_causal_lm("llama", seed=0)
    with topomon.watch(
        model,
        tok,
        output_dir=tmp_path,
        worker="process",
        families=[SPEC],
        family_options={"user_rows": {"rows_scale": 2.5}},  # its own option, declared with it
        alerts=[RULE],
        schedule="every",
        every_n_steps=2,
        topology=False,
        figures_every=0,
    ) as mon:
        _train(model, tok, mon)
    h = mon.health()
    assert h["lost"] == h["failed"] == h["restarts"] == h["monitor_errors"] == 0
    recs = [r for r in read_jsonl(tmp_path / "topomon" / "metrics.jsonl") if r["kind"] == "metrics"]
    final = [r for r in recs if r["layer"] == "final_norm" and r["stage"] == "train"]
    assert [r["step"] for r in final] == [0, 2, 4]
    for r in final:  # computed in the worker: the points the spectral family saw
        assert r["metrics"]["user_rows"] == r["metrics"]["n_points"] > 0
        assert r["metrics"]["user_mean_norm"] > 0
        assert (
            r["metrics"]["user_scaled_rows"] == 2.5 * r["metrics"]["user_rows"]
        )  # the option reached the worker
    alerts = read_jsonl(tmp_path / "topomon" / "alerts.jsonl")
    assert [a["rule"] for a in alerts if a.get("kind", "alert") == "alert"][:1] == ["rows"], alerts


def test_a_family_registered_in_the_training_process_only_is_a_config_error_under_a_process_worker(
    tok, tmp_path, clean_registry
):
    register_family(ROWS)  # the old recipe: the worker process never sees it
    model = tiny_causal_lm("llama", seed=0)
    mon = topomon.watch(model, tok, output_dir=tmp_path, worker="process", alerts=[RULE])
    with pytest.raises(
        ConfigError, match=r"'user_rows' is registered in the training process only.*`families`"
    ):
        mon.begin()
    assert not (tmp_path / "topomon" / "metrics.jsonl").exists()


def test_family_specs_are_checked_before_step_1(tok, tmp_path, clean_registry):
    model = tiny_causal_lm("llama", seed=0)
    for spec, match in (
        ("tests.metrics.user_family:NOPE", r"`families`.*MetricFamily.*found nothing"),
        ("tests.metrics.user_family:RowsComputer", r"`families`.*must name a MetricFamily"),
        ("no_such_module_xyz:F", r"`families`.*cannot import module 'no_such_module_xyz'"),
    ):
        with pytest.raises(ConfigError, match=match):
            topomon.watch(model, tok, output_dir=tmp_path, families=[spec]).begin()
    with pytest.raises(ConfigError, match="`families` must be a list of 'module:OBJECT'"):
        topomon.watch(model, tok, output_dir=tmp_path, families=["no_colon"])
    assert family_of("user_rows") is None


def _script(out: Path, worker: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = ROOT / "tests" / "integrations" / "main_metric_script.py"
    return subprocess.run(
        [sys.executable, str(script), str(out), worker],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_custom_metric_in_the_training_script_is_refused_before_step_1_under_a_process_worker(tmp_path):
    refused = _script(tmp_path / "p", "process")
    assert refused.returncode != 0
    err = refused.stderr
    assert "ConfigError: `custom_metrics` 'cm': '__main__:mean_norm' is defined in the training script" in err
    assert "'my_metrics:mean_norm'" in err and "worker='thread'" in err
    assert "died" not in err and not (tmp_path / "p" / "topomon" / "metrics.jsonl").exists()
    # what the message offers works: a thread worker computes it
    ok = _script(tmp_path / "t", "thread")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "health 0.0 0.0" in ok.stdout
    recs = [r for r in read_jsonl(tmp_path / "t" / "topomon" / "metrics.jsonl") if r["kind"] == "metrics"]
    cms = [r["metrics"]["cm"] for r in recs if r["layer"] == "final_norm" and r["stage"] == "train"]
    assert len(cms) == 3 and all(v > 0 for v in cms)
