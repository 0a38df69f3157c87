"""The result router between two threads: submissions on the training thread, results on the collector."""

import json
import threading

from topomon.pipeline import ResultRouter
from topomon.run import RunDir
from topomon.types import MetricRecord, Snapshot


class CountingEngine:
    """Stands in for the alert engine: counts the captures it was asked to judge."""

    def __init__(self):
        self.steps = []

    def update(self, records):
        self.steps.append(records[0].step)
        return []


def test_submissions_and_results_on_two_threads_lose_no_alert_check(tmp_path):
    run = RunDir(tmp_path)
    run.ensure()
    engine = CountingEngine()
    router = ResultRouter(run, "sft", alert_engine=engine, base_alias_step=None)
    n = 400
    errors = []
    started = threading.Barrier(2)

    def training():  # hands captures over, marks figures, drops some, sets health: as fast as it can
        started.wait()
        for step in range(n):
            snap = Snapshot(step=step, stage="sft", layers={}, meta={"figures": True})
            router.submitted(snap, {"captures": float(step)})
            if step % 7 == 0:
                router.dropped(step)
                router.submitted(snap, {"captures": float(step)})
            router.in_flight()
            router.counters()

    def collector():  # the results of every capture, while the other thread keeps submitting
        started.wait()
        try:
            for step in range(n):
                router([MetricRecord(step, "sft", "layer_0", {"rankme": 1.0 + step})])
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            errors.append(e)

    threads = [threading.Thread(target=training), threading.Thread(target=collector)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    router.close()
    assert errors == []
    assert engine.steps == list(range(n))  # every capture was judged, none skipped
    counters = router.counters()
    assert counters["records_written"] == n
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == n


def test_an_alert_fired_before_a_checkpoint_but_not_yet_acted_on_survives_the_resume(tmp_path):
    # the checkpoint waits for the worker's results, so an alert can fire between the last step's
    # actions and the save: the saved state carries it, and the resumed router hands it to the actions
    from topomon.alerts import AlertEngine
    from topomon.alerts.rules import DropRule

    def router(path):
        run = RunDir(path)
        run.ensure()
        engine = AlertEngine([DropRule("rankme", layer="layer_0", threshold=0.2)], ["rankme"])
        return ResultRouter(run, "sft", alert_engine=engine, base_alias_step=None)

    live = router(tmp_path / "a")
    live([MetricRecord(0, "sft", "layer_0", {"rankme": 10.0})])
    live([MetricRecord(5, "sft", "layer_0", {"rankme": 5.0})])  # fires; not drained before the save
    state = live.state_dict()
    live.close()
    resumed = router(tmp_path / "b")
    resumed.load_state_dict(json.loads(json.dumps(state)))
    alerts = resumed.drain_alerts()
    assert [(a.step, a.rule, a.value) for a in alerts] == [(5, "drop:rankme@layer_0", 5.0)]
    assert resumed.drain_alerts() == []
    resumed(
        [MetricRecord(6, "sft", "layer_0", {"rankme": 4.0})]
    )  # the engine state came too: no second firing
    assert resumed.drain_alerts() == []
    resumed.close()
