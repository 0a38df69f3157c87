"""topomon in W&B, MLflow and trackio: a real SFTTrainer run per tracker, its store read back.

Each run is a subprocess (``tests/sinks/tracker_run.py``) with only ``report_to=[tracker]`` and a
``TopoMonitor`` added, whose ``HOME`` and tracker folders are in ``tmp_path`` (nothing touches ``~``);
the test then reads the tracker's own store with the tracker's own reader and compares with
``metrics.jsonl`` read by topomon's reader, and checks that the run left no process behind.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sqlite3
import subprocess
import sys

import pytest

from tests.sinks.stores import wandb_history, wandb_records
from topomon.sinks.jsonl_read import read_jsonl

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIGURES = {"topomon_figures/eigenspectra", "topomon_figures/persistence/final_norm"}


def _leftovers(marker: str) -> list[str]:
    """Processes whose environment mentions ``marker`` (the run's private HOME): none may survive it."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker.encode() in env:
            out.append(f"{pid}: {cmd[:120]}")
    return out


def run_tracker(tmp_path, tracker: str, *extra: str, **env: str) -> dict:
    """Train in a subprocess; returns its result.json plus the metrics.jsonl records."""
    home = tmp_path / "home"
    home.mkdir()
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_", "TENSORBOARD_")) and k != "HOME"
    }
    clean.update(HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, **env)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sinks.tracker_run", tracker, str(out), *extra],
        cwd=tmp_path,  # MLflow keeps a sqlite store's artifacts in ./mlruns: never in the checkout
        env=clean,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # trackio drops a value it cannot read with only a warning (a half-imported matplotlib did that)
    assert "skipped metric" not in proc.stderr, proc.stderr[-5000:]
    assert not _leftovers(str(home)), _leftovers(str(home))
    with open(out / "result.json") as fh:
        result = json.load(fh)
    lines, torn = read_jsonl(out / "topomon" / "metrics.jsonl")
    assert torn == 0
    result["records"] = [r for r in lines if r.get("kind") == "metrics" and r["stage"] == "sft"]
    result["out"] = str(out)
    return result


def expected_values(records: list[dict]) -> dict[tuple[str, int], float]:
    """``(topomon/<metric>/<layer>, step) -> value`` for every finite value of metrics.jsonl."""
    out = {}
    for r in records:
        for name, v in r["metrics"].items():
            if v is not None and math.isfinite(v):
                out[(f"topomon/{name}/{r['layer']}", r["step"])] = v
    return out


def check_alerts(result: dict) -> list[str]:
    fired = [a["message"] for a in result["alerts"]]
    assert len(fired) == 2 and len({a["step"] for a in result["alerts"]}) == 1  # two alerts, one step
    return fired


def test_wandb_offline_run_holds_the_curves_figures_and_alerts(tmp_path):
    wdir = tmp_path / "wandb_dir"
    wdir.mkdir()
    res = run_tracker(
        tmp_path,
        "wandb",
        WANDB_MODE="offline",
        WANDB_DIR=str(wdir),
        WANDB_SILENT="true",
        WANDB_CACHE_DIR=str(tmp_path / "wcache"),
        WANDB_CONFIG_DIR=str(tmp_path / "wconfig"),
        WANDB_DATA_DIR=str(tmp_path / "wdata"),
    )
    (path,) = glob.glob(str(wdir / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(path)
    rows = wandb_history(records)
    # every topomon value sits on topomon's own axis, at its capture step
    got = {(k, row["topomon/step"]): v for row in rows if "topomon/step" in row for k, v in row.items()}
    want = expected_values(res["records"])
    assert {s for _, s in want} == {0, 2, 4}
    assert {k: got.get(k) for k in want} == want
    assert any(k[0].startswith("topomon_vs_base/") for k in got) and any(
        k[0].startswith("topomon/health/") for k in got
    )
    # the axis is declared for every topomon key; the trainer's own rows are still there
    metrics = {
        r.metric.name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"
    }
    assert metrics["topomon/rankme/final_norm"] == "topomon/step"
    assert sum("train/loss" in row for row in rows) == 4
    # figures as W&B images, their files in the run's media folder
    images = [
        (k, v)
        for row in rows
        for k, v in row.items()
        if isinstance(v, dict) and v.get("_type") == "image-file"
    ]
    assert {k for k, _ in images} == FIGURES
    run_dir = os.path.dirname(path)
    assert all(os.path.isfile(os.path.join(run_dir, "files", v["path"])) for _, v in images)
    # the alerts, in W&B's alert records
    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert sorted(a.text for a in alerts) == sorted(check_alerts(res))
    assert {a.level for a in alerts} == {"WARN"} and all(len(a.title) < 64 for a in alerts)


def test_mlflow_run_holds_the_curves_figures_and_alerts(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # the artifacts' ./mlruns, as the training process saw it
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = run_tracker(tmp_path, "mlflow", MLFLOW_TRACKING_URI=uri)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # the trainer's run, no stray one
    run_id = runs[0].info.run_id
    want = expected_values(res["records"])
    got = {}
    for key in {k for k, _ in want}:
        for m in client.get_metric_history(run_id, key):
            got[(key, m.step)] = m.value
    assert got == want
    assert "loss" in runs[0].data.metrics and "topomon/health/captures" in runs[0].data.metrics

    def walk(path=None):
        for f in client.list_artifacts(run_id, path):
            yield from walk(f.path) if f.is_dir else [f.path]

    files = list(walk())
    pngs = [f for f in files if f.startswith("images/topomon_figures") and f.endswith(".png")]
    assert {"~".join(os.path.basename(f).split("+")[0].split("~")) for f in pngs} == {
        k.replace("/", "~") for k in FIGURES
    }
    assert {int(f.split("+step+")[1].split("+")[0]) for f in pngs} == {0, 2, 4}
    # MLflow has no alert API: a tag per alert and the alerts artifact
    fired = check_alerts(res)
    tags = {k: v for k, v in runs[0].data.tags.items() if k.startswith("topomon_alert_")}
    assert sorted(tags.values()) == sorted(fired)
    text = client.download_artifacts(run_id, "topomon/alerts.md", str(tmp_path))
    with open(text) as fh:
        listed = fh.read()
    assert all(f in listed for f in fired)


def test_trackio_run_holds_the_curves_figures_and_alerts(tmp_path):
    tdir = tmp_path / "trackio"
    res = run_tracker(tmp_path, "trackio", TRACKIO_DIR=str(tdir))
    (db_path,) = glob.glob(str(tdir / "*.db"))
    db = sqlite3.connect(db_path)
    rows = [(step, json.loads(m)) for step, m in db.execute("select step, metrics from metrics order by id")]
    got = {(k, step): v for step, m in rows for k, v in m.items() if k.startswith("topomon/")}
    want = expected_values(res["records"])
    assert {k: got.get(k) for k in want} == want
    # the trainer's own rows keep their numbering (0, 1, 2, ... one per log) beside topomon's steps
    assert [step for step, m in rows if "train/loss" in m] == [0, 1, 2, 3]
    images = [(k, v, step) for step, m in rows for k, v in m.items() if k.startswith("topomon_figures/")]
    assert {k for k, _, _ in images} == FIGURES and {s for _, _, s in images} == {0, 2, 4}
    media = glob.glob(str(tdir / "media" / "*" / "*" / "*" / "*.png"))
    assert len(media) == len(images)
    alerts = db.execute("select title, text, level, step from alerts").fetchall()
    assert sorted(a[1] for a in alerts) == sorted(check_alerts(res))
    assert {a[2] for a in alerts} == {"warn"} and {a[3] for a in alerts} == {res["alerts"][0]["step"]}


def test_a_failing_tracker_is_counted_and_training_finishes(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = run_tracker(tmp_path, "mlflow", "--fail-mlflow", MLFLOW_TRACKING_URI=uri)
    health = res["health"]
    assert health["sink_errors_mlflow"] >= 3  # every capture's write failed, and was counted
    assert health["captures"] == 3 and health["lost"] == 0 and health["monitor_errors"] == 0
    assert {r["step"] for r in res["records"]} == {0, 2, 4}  # every metric is still in metrics.jsonl
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert "loss" in run.data.metrics and not any(k.startswith("topomon") for k in run.data.metrics)


def test_one_logdir_shows_the_trainer_loss_beside_topomon(tmp_path):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    res = run_tracker(tmp_path, "tensorboard")
    logdir = res["tensorboard_logdir"]
    assert f"tensorboard --logdir {logdir}" in res["summary"]
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    # torch's SummaryWriter scalars are served as tensors by TensorBoard's own multiplexer
    tags = {
        t for run, kinds in mux.Runs().items() for t in [*kinds.get("scalars", []), *kinds.get("tensors", [])]
    }
    assert "train/loss" in tags and "topomon/rankme/final_norm" in tags


def trackio_script_rows(tmp_path, script: str, *args: str) -> list[tuple[int, dict]]:
    """Run ``script`` in a new process with trackio's store in ``tmp_path``; its metrics table rows."""
    tdir = tmp_path / "trackio"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKIO_") and k != "HOME"}
    env.update(HOME=str(tmp_path), TRACKIO_DIR=str(tdir), PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (db_path,) = glob.glob(str(tdir / "*.db"))
    return [
        (s, json.loads(m)) for s, m in sqlite3.connect(db_path).execute("select step, metrics from metrics")
    ]


_CONCURRENT = """
import sys, trackio
from topomon.sinks.trackio_sink import TrackioSink
trackio.init(project="p", name="r", embed=False)
sink = TrackioSink(trackio.context_vars.current_run.get(), figures=False)
for i in range(int(sys.argv[1])):
    sink.write_scalars({"x": float(i)}, 1000 + i, "topomon")  # queued: written on the sink's thread
    trackio.log({"train/loss": float(i)})  # the trainer's step-less row, on this thread, meanwhile
sink.close()
trackio.finish()
"""


def test_trackio_trainer_rows_keep_their_numbering_while_topomon_writes_from_its_thread(tmp_path):
    # the sink's write and its put-back of the run's automatic step must not let a trainer row in
    # between (it did, under load, in a fresh-clone CI run: the trainer's rows began at step 1)
    n = 300
    rows = trackio_script_rows(tmp_path, _CONCURRENT, str(n))
    assert sorted(s for s, m in rows if "train/loss" in m) == list(range(n))
    assert sorted(s for s, m in rows if "topomon/x" in m) == [1000 + i for i in range(n)]


_AFTER_FINISH = """
import threading, trackio
from topomon.sinks.trackio_sink import TrackioSink
run = trackio.init(project="p", name="r", embed=False)
sink = TrackioSink(trackio.context_vars.current_run.get(), figures=False, close_timeout=30)
trackio.log({"train/loss": 1.0})
trackio.finish()  # the trainer's callback finishes the run before topomon's last capture lands
# trackio's sender thread still busy (finish waits for it 30 s at most): later rows queue behind it
busy = threading.Event()
run._local_sender_thread = threading.Thread(target=busy.wait, daemon=True)
run._local_sender_thread.start()
sink.write_scalars({"x": 1.0}, 7, "topomon")
threading.Timer(1.0, busy.set).start()
sink.close()  # the process exits right after: its daemon threads die with it
"""


def test_trackio_rows_written_after_the_run_finished_are_not_lost_at_exit(tmp_path):
    rows = trackio_script_rows(tmp_path, _AFTER_FINISH)
    assert [s for s, m in rows if "topomon/x" in m] == [7]
    assert [s for s, m in rows if "train/loss" in m] == [0]
