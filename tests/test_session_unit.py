"""Unit tests of :class:`~topomon.session.MonitorSession` itself: no trainer, no adapter, a sync worker.

A tiny in-memory model and the session's own calls, in the order an adapter makes them: begin (set-up
and baseline), step_end (capture on schedule, act on alerts), log (the trainer's values), capture
(offline), checkpoint state and save_state, a resume from it, end and close. Each runs in well under
a second of compute.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_no_silent_noop import ALWAYS
from tests.test_no_silent_noop import FAST as NOOP_FAST
from topomon.config import ConfigError
from topomon.interventions import Signals
from topomon.session import MonitorSession
from topomon.stage import STATE_FILE, read_state
from topomon.testing import tiny_causal_lm, tiny_tokenizer
from topomon.types import Alert

FAST: dict[str, Any] = {**NOOP_FAST, "stage": "unit"}  # small and deterministic, as the matrix runs


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture
def model() -> Any:
    return tiny_causal_lm("llama", num_layers=2, hidden_size=16, seed=0)


def lines(path: Path, kind: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]


def session(**kw: Any) -> MonitorSession:
    return MonitorSession({**FAST, **kw})


def nudge(model: Any) -> None:
    """A training step's worth of change, without a loop."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)


def test_begin_sets_up_the_run_directory_and_captures_the_baseline(model, tok, tmp_path):
    s = session()
    assert not s.started and s.captures == []
    s.begin(model, tokenizer=tok, output_dir=tmp_path)
    try:
        assert s.started and s.is_main and s.captures == [0]
        run = Path(s.run.path)
        assert run == tmp_path / "topomon"
        assert [st["name"] for st in json.loads((run / "run.json").read_text())["stages"]] == ["unit"]
        recs = lines(run / "metrics.jsonl", "metrics")
        assert {(r["stage"], r["step"]) for r in recs} == {("base", 0), ("unit", 0)}
        assert s.health()["captures"] == 1.0 and s.health()["monitor_errors"] == 0.0
    finally:
        s.close()
    assert not s.started


def test_a_configuration_that_cannot_work_raises_in_begin_and_leaves_nothing_running(model, tok, tmp_path):
    with pytest.raises(ConfigError, match="layers"):
        session(layers=[9]).begin(model, tokenizer=tok, output_dir=tmp_path)
    with pytest.raises(ConfigError, match="every_n_steps"):
        session(every_n_steps=0)
    s = session(layers=[0], alerts=[{"type": "drop", "metric": "rankme", "layer": "layer_1"}])
    with pytest.raises(ConfigError, match="layer_1"):
        s.begin(model, tokenizer=tok, output_dir=tmp_path)
    assert not s.started


def test_step_end_captures_on_schedule_and_end_captures_the_final_model(model, tok, tmp_path):
    s = session()
    s.begin(model, tokenizer=tok, output_dir=tmp_path)
    for step in range(1, 6):
        nudge(model)
        assert s.step_end(step, model, Signals()) == []
    assert s.captures == [0, 2, 4]
    s.end(5, model)
    assert s.captures == [0, 2, 4, 5] and not s.started
    health = lines(tmp_path / "topomon" / "metrics.jsonl", "health")
    assert len(health) == 1 and health[0]["completed"] == 4 and health[0]["flushed"] == 1.0
    steps = {r["step"] for r in lines(tmp_path / "topomon" / "metrics.jsonl", "metrics")}
    assert steps == {0, 2, 4, 5}


def test_an_offline_session_captures_only_when_asked(model, tok, tmp_path):
    s = session()
    s.begin(model, tokenizer=tok, output_dir=tmp_path, baseline=False)
    assert s.captures == []
    s.capture(model, 7)
    s.close(7)
    assert s.captures == [7]
    assert {r["step"] for r in lines(tmp_path / "topomon" / "metrics.jsonl", "metrics")} == {7}


def test_an_alert_reaches_on_alert_and_its_action_sets_the_control(model, tok, tmp_path):
    seen: list[Alert] = []
    s = MonitorSession({**FAST, "alerts": ALWAYS, "actions": [{"kind": "checkpoint"}]}, on_alert=seen.append)
    s.begin(model, tokenizer=tok, output_dir=tmp_path)
    control = Signals()
    taken = s.step_end(1, model, control)
    s.close(1)
    assert [a.rule for a in seen] == ["always"] and seen[0].step == 0
    assert [a.kind for a in taken] == ["checkpoint"] and control.should_save
    assert [a.kind for a in s.actions] == ["checkpoint"] and [a.rule for a in s.alerts] == ["always"]
    log = tmp_path / "topomon" / "alerts.jsonl"
    assert [r["rule"] for r in lines(log, "alert")] == ["always"]
    assert [r["action"] for r in lines(log, "action")] == ["checkpoint"]


def test_the_trainers_logged_values_feed_rules_on_layer_trainer(model, tok, tmp_path):
    rule = {"type": "threshold", "metric": "loss", "layer": "trainer", "above": 5.0, "name": "loss_high"}
    s = session(alerts=[rule], actions=[{"kind": "stop"}])
    s.begin(model, tokenizer=tok, output_dir=tmp_path)
    quiet, loud = Signals(), Signals()
    assert s.log(1, {"loss": 1.0, "note": "text is skipped"}, quiet) == []
    taken = s.log(2, {"loss": torch.tensor(9.0)}, loud)
    s.close(2)
    assert not quiet.should_training_stop
    assert [a.kind for a in taken] == ["stop"] and loud.should_training_stop
    assert [(a.rule, a.step) for a in s.alerts] == [("loss_high", 2)]


def test_checkpoint_state_is_plain_json_and_save_state_writes_it(model, tok, tmp_path):
    s = session(alerts=ALWAYS, actions=[{"kind": "diversity", "value": 0.1, "revert_on_recovery": False}])
    s.begin(model, tokenizer=tok, output_dir=tmp_path / "out")
    s.step_end(1, model, Signals())
    s.step_end(2, model, Signals())
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    s.save_state(ckpt)
    state = s.checkpoint_state()
    s.close(2)
    assert json.loads(json.dumps(state)) == state  # plain types only
    assert state["stage"] == "unit" and state["captures"] == [0, 2]
    assert set(state) >= {"version", "step_offset", "router", "engine", "interventions"}
    assert read_state(ckpt) == state and (ckpt / STATE_FILE).exists()
    s.save_state(tmp_path / "no-such-folder")  # not a folder: nothing written, nothing raised
    assert s.errors == 0


def test_a_resumed_session_continues_its_stage_with_its_captures_and_actions(model, tok, tmp_path):
    act = [{"kind": "diversity", "value": 0.1, "revert_on_recovery": False}]
    first = session(alerts=ALWAYS, actions=act)
    first.begin(model, tokenizer=tok, output_dir=tmp_path)
    for step in (1, 2):
        first.step_end(step, model, Signals())
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    first.save_state(ckpt)
    assert first.interventions.target("diversity").weight == 0.1
    first.close(2)  # the run stops here; a new process resumes from the checkpoint

    second = session(alerts=ALWAYS, actions=act)
    second.begin(model, tokenizer=tok, output_dir=tmp_path, global_step=2, resume=read_state(ckpt))
    assert second.config.stage == "unit"  # the same stage continues (a fresh run would be "unit-2")
    assert second.captures == [0, 2]  # step 2 is not captured again
    assert (
        second.interventions.target("diversity").weight == 0.1
    )  # the latched action is restored, not re-decided
    second.step_end(3, model, Signals())
    second.step_end(4, model, Signals())
    second.end(4, model)
    assert second.captures == [0, 2, 4]
    recs = lines(tmp_path / "topomon" / "metrics.jsonl", "metrics")
    per_step = {st: sum(r["step"] == st and r["stage"] == "unit" for r in recs) for st in (0, 2, 4)}
    assert per_step[0] == per_step[2] == per_step[4] > 0  # each capture once, none twice
    stages = json.loads((tmp_path / "topomon" / "run.json").read_text())["stages"]
    assert [st["name"] for st in stages] == ["unit"]


def test_a_rerun_from_step_0_becomes_a_new_stage(model, tok, tmp_path, caplog):
    for _ in range(2):
        s = session()
        s.begin(model, tokenizer=tok, output_dir=tmp_path)
        s.end(1, model)
    assert s.config.stage == "unit-2"
    assert [st["name"] for st in json.loads((tmp_path / "topomon" / "run.json").read_text())["stages"]] == [
        "unit",
        "unit-2",
    ]


def test_close_is_idempotent_and_a_second_begin_closes_an_interrupted_training(model, tok, tmp_path, caplog):
    s = session()
    s.begin(model, tokenizer=tok, output_dir=tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="topomon"):
        s.begin(model, tokenizer=tok, output_dir=tmp_path / "b")
    assert "did not end" in caplog.text
    assert len(lines(tmp_path / "a" / "topomon" / "metrics.jsonl", "health")) == 1  # the first was closed
    s.close()
    s.close()
    assert not s.started
    assert len(lines(tmp_path / "b" / "topomon" / "metrics.jsonl", "health")) == 1
    assert s.step_end(3, model, Signals()) == [] and s.captures == [0]  # after close: nothing happens


def test_an_error_inside_an_event_is_counted_never_raised(model, tok, tmp_path):
    s = session()
    s.begin(model, tokenizer=tok, output_dir=tmp_path)
    s.step_end(2, object(), Signals())  # not a model: the capture fails
    s.close(2)
    assert s.errors >= 1 and s.last_error and s.health()["monitor_errors"] >= 1
