"""The result router between two threads: submissions on the training thread, results on the collector."""

import threading

from topomon.pipeline import ResultRouter
from topomon.run import RunDir
from topomon.types import MetricRecord


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
    router = ResultRouter(
        run, "sft", alert_engine=engine, alert_sinks=None, base_alias_step=None
    )
    n = 400
    errors = []
    started = threading.Barrier(2)

    def training():  # hands captures over, marks figures, drops some, sets health: as fast as it can
        started.wait()
        for step in range(n):
            router.submitted(step)
            router.mark_figures(step)
            router.set_health({"captures": float(step)})
            if step % 7 == 0:
                router.dropped(step)
                router.submitted(step)
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
