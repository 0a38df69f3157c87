"""The training process dies: SIGKILL mid-run, then resume from the Trainer's last checkpoint.

A real training run (``tests/reliability/train_script.py``) runs in a subprocess and is SIGKILLed once
``metrics.jsonl`` holds a few captures. Then: every record the monitor reported as written is on disk,
the files are intact, the worker process did not outlive the training process, a torn last line is
tolerated and reported by every reader, and a second subprocess resumes from the last checkpoint with
the monitor's state restored and no capture duplicated or missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability._support import wait_for
from tests.reliability.train_script import MAX_STEPS
from topomon.report.load import load_run
from topomon.run import RunDir
from topomon.sinks.jsonl_read import read_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _start(out: Path, run_dir: Path, log: str, *extra: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log_file = open(out / log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.train_script", str(out), str(run_dir), *extra],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the cleanup below reaches its children
    )


def _cleanup(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the process this test started, if left
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _progress(out: Path) -> list[list[int]]:
    path = out / "progress.txt"
    if not path.exists():
        return []
    return [[int(v) for v in ln.split()] for ln in path.read_text().splitlines() if ln.strip()]


def _checkpoint_steps(out: Path) -> list[int]:
    return [
        int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "topomon_state.json").exists()
    ]


def _steps_on_disk(run_dir: Path) -> set[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return set()
    recs, _ = read_jsonl(path)
    return {r["step"] for r in recs if r.get("kind") == "metrics" and r.get("stage") == "sft"}


def _metric_keys(recs: list[dict]) -> list[tuple[int, str]]:
    return [(r["step"], r["layer"]) for r in recs if r.get("kind") == "metrics" and r.get("stage") == "sft"]


def test_sigkill_of_the_training_process_then_resume(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "run"
    first = _start(out, run_dir, "first.log", "--sleep", "0.5")
    try:
        ready = wait_for(
            lambda: (
                first.poll() is not None
                or (
                    any(p[0] >= 5 and p[1] > 0 for p in _progress(out))  # step, records reported written
                    and (out / "checkpoint-4" / "topomon_state.json").exists()
                    and set(range(5)) <= _steps_on_disk(run_dir)
                    # a capture written after the last checkpoint: the resume has one to judge again
                    and max(_steps_on_disk(run_dir)) > max(_checkpoint_steps(out), default=0)
                )
            ),
            timeout=240,
            every=0.1,
        )
        assert ready and first.poll() is None, (out / "first.log").read_text()[-3000:]
        reported = _progress(out)[-1]  # step, records_written, alerts_fired, worker pid(s)
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
    finally:
        _cleanup(first)
    step_at_kill, written, alerts_fired, workers = reported[0], reported[1], reported[2], reported[3:]
    assert step_at_kill < MAX_STEPS and workers

    # the worker does not outlive the training process (its watchdog sees the parent gone)
    assert wait_for(lambda: not any(_alive(p) for p in workers), timeout=15)

    # intact up to the last record; everything reported as written is on disk, nothing twice
    metrics, torn = read_jsonl(run_dir / "metrics.jsonl")
    alerts, torn_alerts = read_jsonl(run_dir / "alerts.jsonl")
    assert torn == 0 and torn_alerts == 0
    assert len([r for r in metrics if r["kind"] == "metrics"]) >= written > 0
    assert len([a for a in alerts if a["kind"] == "alert"]) >= alerts_fired >= 1
    keys = _metric_keys(metrics)
    assert len(keys) == len(set(keys))
    assert not [r for r in metrics if r["kind"] == "health"]  # it never reached train end

    # a kill in the middle of a write leaves a torn last line: every reader skips and reports it
    with open(run_dir / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"kind": "metrics", "step": 9, "stage": "sft", "lay')
    with open(run_dir / "alerts.jsonl", "ab") as fh:
        fh.write(b'{"kind": "alert", "st')
    assert read_jsonl(run_dir / "metrics.jsonl")[1] == 1
    assert RunDir(run_dir).records()[1] == 1
    run = load_run(run_dir)
    assert run.torn_lines == {"metrics.jsonl": 1, "alerts.jsonl": 1}
    assert any("torn" in n and "metrics.jsonl" in n for n in run.notes)  # shown in the HTML report

    # resume from the last checkpoint that holds the monitor's state, as a user would: the same
    # command with resume_from_checkpoint (the monitor reads <output_dir>/checkpoint-<step>)
    ckpts = sorted(
        (int(p.name.split("-")[1]), p)
        for p in out.glob("checkpoint-*")
        if (p / "topomon_state.json").exists()
    )
    last_step, last = ckpts[-1]
    assert 4 <= last_step <= step_at_kill
    saved = json.loads((last / "topomon_state.json").read_text())
    second = _start(out, run_dir, "second.log", "--resume", str(last))
    try:
        rc = second.wait(timeout=300)
    finally:
        _cleanup(second)
    log = (out / "second.log").read_text()
    assert rc == 0, log[-3000:]
    assert "1 torn line(s)" in log  # the monitor said so when it read the run back

    # the monitor's state (captures so far = schedule position, references, alert rule state,
    # previous diagrams) is exactly what the checkpoint held
    resumed = json.loads((out / "resumed_state.json").read_text())
    assert resumed["captures"] == saved["captures"] == list(range(last_step + 1))
    assert resumed["router"]["stage_values"] == saved["router"]["stage_values"]
    assert resumed["engine"] == saved["engine"]
    assert saved["router"]["alerts"]  # there is alert state to restore
    # the alert rules continue from the checkpoint's state; the captures written after the checkpoint
    # (not taken again) are judged again when training passes their steps, as in the first run
    assert resumed["router"]["alerts"] == saved["router"]["alerts"]
    after = [r for r in metrics if r["kind"] == "metrics" and r["stage"] == "sft" and r["step"] > last_step]
    assert after  # the kill came after the checkpoint's step: there is something to judge again

    # every capture of the schedule once: no duplicate, none missing, the torn line left as it was
    metrics, torn = read_jsonl(run_dir / "metrics.jsonl")
    assert torn == 1
    keys = _metric_keys(metrics)
    assert len(keys) == len(set(keys))
    assert sorted({s for s, _ in keys}) == list(range(MAX_STEPS + 1))
    layers = sorted({ly for _, ly in keys})
    assert sorted(keys) == sorted((s, ly) for s in range(MAX_STEPS + 1) for ly in layers)
    assert [r["stage"] for r in metrics if r.get("stage") == "base"]  # one base baseline...
    base = [(r["step"], r["layer"]) for r in metrics if r.get("stage") == "base"]
    assert len(base) == len(set(base)) and {s for s, _ in base} == {0}  # ...never captured again
    # the "always" alert fired once in the first run; restored as active, it is not raised again
    alerts, torn_alerts = read_jsonl(run_dir / "alerts.jsonl")
    assert torn_alerts == 1
    fired = [(a["rule"], a["layer"], a["step"]) for a in alerts if a["reason"] != "recovered"]
    assert [f for f in fired if f[0] == "always"] == [("always", "final_norm", 0)]
    assert len(fired) == len(set(fired))
    health = [r for r in metrics if r["kind"] == "health"]
    assert len(health) == 1 and health[0]["lost"] == 0 and health[0]["flushed"] == 1
    stage = [s for s in json.loads((run_dir / "run.json").read_text())["stages"] if s["name"] == "sft"]
    assert len(stage) == 1 and stage[0]["last_step"] == MAX_STEPS


def _values(out: Path) -> list[tuple[int, float]]:
    path = out / "values.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(a), float(b)) for a, b in (ln.split() for ln in lines if ln.strip())]


def test_resume_with_an_alert_between_the_checkpoint_and_the_kill(tmp_path):
    """The values in effect after resume equal the uninterrupted run's at every step; nothing twice."""
    flag = ("--flag-step", "5", "--save-steps", "4")
    ref = _start(tmp_path / "ref", tmp_path / "ref_run", "ref.log", *flag)
    try:
        assert ref.wait(timeout=300) == 0, (tmp_path / "ref" / "ref.log").read_text()[-3000:]
    finally:
        _cleanup(ref)
    want = dict(_values(tmp_path / "ref"))
    assert want[4] == 0.0 and want[5] == 0.05 and want[MAX_STEPS] == 0.05  # on at the end of step 5

    out, run_dir = tmp_path / "out", tmp_path / "run"
    first = _start(out, run_dir, "first.log", *flag, "--sleep", "0.5")
    try:
        ready = wait_for(
            lambda: first.poll() is not None or any(p[0] >= 6 for p in _progress(out)), 240, 0.05
        )
        assert ready and first.poll() is None, (out / "first.log").read_text()[-3000:]
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        _cleanup(first)
    killed_at = _progress(out)[-1][0]
    assert 6 <= killed_at < 8 and not (out / "checkpoint-8").exists()
    alerts, _ = read_jsonl(run_dir / "alerts.jsonl")
    assert [(a["step"], a["action"]) for a in alerts if a["kind"] == "action"] == [(5, "diversity")]
    n_first = len(_values(out))

    second = _start(out, run_dir, "second.log", *flag, "--resume", str(out / "checkpoint-4"))
    try:
        rc = second.wait(timeout=300)
    finally:
        _cleanup(second)
    assert rc == 0, (out / "second.log").read_text()[-3000:]
    resumed = _values(out)[n_first:]
    assert resumed == [(s, want[s]) for s in range(5, MAX_STEPS + 1)]
    alerts, _ = read_jsonl(run_dir / "alerts.jsonl")
    flag_alerts = [(a["step"], a["reason"]) for a in alerts if a["kind"] == "alert" and a["rule"] == "flag"]
    assert flag_alerts == [(5, "above")]  # once: neither raised again nor "recovered" out of order
    assert [(a["step"], a["action"]) for a in alerts if a["kind"] == "action"] == [(5, "diversity")]
