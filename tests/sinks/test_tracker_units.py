"""Choosing the trackers, the queued sink's failure counting, and the TensorBoard fixes (no trainer)."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from topomon.config import ConfigError, MonitorConfig
from topomon.sinks import trackers as tr
from topomon.sinks.base import SinkFan
from topomon.sinks.queued import QueuedSink
from topomon.stage import shared_logdir, trainer_tensorboard_dir
from topomon.types import Alert, MetricRecord


def alert(step: int, rule: str, msg: str) -> Alert:
    return Alert(step, "sft", rule, "rankme", "final_norm", 1.0, 2.0, "drop", msg)


# ----------------------------------------------------------------------------- choosing
def test_trackers_field_is_validated_with_a_clear_error():
    assert MonitorConfig().trackers is None
    assert MonitorConfig(trackers=["wandb", "mlflow", "wandb"]).trackers == ("wandb", "mlflow")
    assert MonitorConfig(trackers=[]).trackers == ()
    assert MonitorConfig.from_dict(MonitorConfig(trackers=["trackio"]).to_dict()).trackers == ("trackio",)
    with pytest.raises(ConfigError, match=r"unknown tracker 'wanbd' \(did you mean 'wandb'\?\)"):
        MonitorConfig(trackers=["wanbd"])
    with pytest.raises(ConfigError, match="`tensorboard` field"):
        MonitorConfig(trackers=["tensorboard"])
    with pytest.raises(ConfigError, match="must be None"):
        MonitorConfig(trackers="wandb")


@pytest.mark.parametrize(
    "trackers, report_to, want",
    [
        (None, ["wandb", "tensorboard"], (["wandb"], False)),
        (None, "mlflow", (["mlflow"], False)),
        (None, "none", ([], False)),
        (None, None, ([], False)),
        (None, ["all"], (["wandb", "mlflow", "trackio"], False)),  # all three are installed here
        ((), ["wandb"], ([], True)),
        (("trackio",), ["wandb"], (["trackio"], True)),
    ],
)
def test_trackers_follow_report_to_unless_set(trackers, report_to, want):
    assert tr.resolve_trackers(trackers, report_to) == want


def test_a_missing_package_is_an_error_when_named_and_a_warning_from_report_to(monkeypatch, caplog):
    monkeypatch.setattr(tr, "_installed", lambda name: False)
    with pytest.raises(ConfigError, match=r"pip install 'topomon\[trackers\]'"):
        tr.tracker_sinks(["wandb"], explicit=True)
    with caplog.at_level(logging.WARNING, logger="topomon"):
        assert tr.tracker_sinks(["wandb"], explicit=False) == []
    (rec,) = [r for r in caplog.records if "report_to" in r.getMessage()]
    assert "not installed" in rec.getMessage() and "\n" not in rec.getMessage()


def test_no_active_run_is_an_error_when_named_and_a_warning_from_report_to(monkeypatch, caplog):
    import mlflow
    import trackio

    assert mlflow.active_run() is None and trackio.context_vars.current_run.get() is None
    for name in ("mlflow", "trackio"):
        with pytest.raises(ConfigError, match=f"no {name} run is active"):
            tr.tracker_sinks([name], explicit=True)
    with caplog.at_level(logging.WARNING, logger="topomon"):
        assert tr.tracker_sinks(["trackio"], explicit=False) == []
    assert any("no trackio run is active" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="unknown tracker"):
        tr.tracker_sinks(["comet"], explicit=False)


# ----------------------------------------------------------------------------- the queued sink
class Flaky(QueuedSink):
    name = "flaky"

    def __init__(self, fail: bool, **kw):
        super().__init__(**kw)
        self.fail, self.seen, self.threads = fail, [], set()

    def _write_records(self, records, figures):
        self.threads.add(threading.get_ident())
        if self.fail:
            raise ConnectionError("down")
        self.seen.append(("records", records[0].step, figures))

    def _write_scalars(self, values, step):
        self.seen.append(("scalars", step, dict(values)))

    def _write_alert(self, a):
        self.seen.append(("alert", a.step))


def test_a_queued_sink_writes_in_order_off_the_caller_thread_and_counts_its_failures():
    ok, bad = Flaky(False), Flaky(True)
    bad.name = "bad"
    fan = SinkFan([ok, bad])
    rec = MetricRecord(4, "sft", "final_norm", {"rankme": 3.0, "x": float("nan")})
    fan.write_records([rec], figures=True)
    fan.write_scalars({"dropped": 1.0, "bad": float("inf")}, 4, "topomon/health")
    fan.write_alert(alert(4, "r", "m"))
    fan.close()
    assert ok.seen == [("records", 4, True), ("scalars", 4, {"topomon/health/dropped": 1.0}), ("alert", 4)]
    assert threading.get_ident() not in ok.threads | bad.threads
    assert bad.failures == 1 and fan.counters() == {"sink_errors_bad": 1.0}
    fan.write_alert(alert(5, "r", "m"))  # after close: refused, counted, never raised
    assert fan.counters() == {"sink_errors_bad": 2.0, "sink_errors_flaky": 1.0}


def test_close_is_bounded_when_a_tracker_hangs():
    gate = threading.Event()

    class Stuck(Flaky):
        def _write_scalars(self, values, step):
            gate.wait()

    s = Stuck(False, close_timeout=0.2)
    for i in range(3):
        s.write_scalars({"a": 1.0}, i)
    s.close()  # returns after ~0.2 s although the tracker never answers
    assert s.abandoned >= 1 and SinkFan([s]).counters()["sink_errors_flaky"] >= 1
    gate.set()


# ----------------------------------------------------------------------------- TensorBoard
def _text_tab(logdir: str, tag: str) -> list[dict]:
    """What TensorBoard's Text tab serves for ``tag``: the text plugin over TensorBoard's own reader."""
    from tensorboard import context
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.text.text_plugin import TextPlugin

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    plugin = TextPlugin(
        base_plugin.TBContext(data_provider=MultiplexerDataProvider(mux, logdir), logdir=logdir)
    )
    (run,) = mux.Runs()
    return plugin.text_impl(context.RequestContext(), run, tag, experiment="", enable_markdown=True)


def test_two_alerts_at_one_step_are_both_in_the_text_tab(tmp_path):
    from topomon.sinks.tensorboard import TensorBoardSink

    sink = TensorBoardSink(str(tmp_path))
    sink.write_alert(alert(40, "drop:rankme", "rankme dropped 15%"))
    sink.write_alert(alert(50, "drop:rankme", "rankme dropped 16%"))
    sink.write_alert(alert(50, "drop:rankme_pca", "rankme_pca dropped 34%"))
    sink.close()
    entries = _text_tab(str(tmp_path), "topomon/alerts/text_summary")
    # one entry per step is what TensorBoard keeps (the data server keeps the last one of a step):
    # the last entry of step 50 holds both of its alerts
    last = {e["step"]: e["text"] for e in entries}
    assert sorted(last) == [40, 50]
    assert "rankme dropped 16%" in last[50] and "rankme_pca dropped 34%" in last[50]
    assert "rankme dropped 15%" not in last[50] and "rankme dropped 15%" in last[40]


def test_two_alerts_at_one_step_are_both_in_a_lightning_tensorboard_loggers_text_tab(tmp_path):
    pytest.importorskip("lightning")
    from lightning.pytorch.loggers import TensorBoardLogger

    from topomon.integrations.lightning import LightningLoggerSink

    lg = TensorBoardLogger(str(tmp_path), name="", version="")
    sink = LightningLoggerSink([lg])
    sink.write_alert(alert(40, "drop:rankme", "rankme dropped 15%"))
    sink.write_alert(alert(50, "drop:rankme", "rankme dropped 16%"))
    sink.write_alert(alert(50, "drop:rankme_pca", "rankme_pca dropped 34%"))
    sink.close()
    lg.finalize("success")
    last = {e["step"]: e["text"] for e in _text_tab(lg.log_dir, "topomon/alerts/text_summary")}
    assert sorted(last) == [40, 50]
    assert "rankme dropped 16%" in last[50] and "rankme_pca dropped 34%" in last[50]
    assert "rankme dropped 15%" not in last[50] and "rankme dropped 15%" in last[40]


def test_custom_scalars_layout_covers_the_relative_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from topomon.sinks.tensorboard import TensorBoardSink

    sink = TensorBoardSink(str(tmp_path), relative=["rankme", "alpha_req"])
    recs = [MetricRecord(2, "sft", ly, {"rankme": 3.0, "n_points": 9.0}) for ly in ("layer_0", "final_norm")]
    sink.write_records(recs)
    sink.write_scalars({"rankme/layer_0": -1.0, "rankme/final_norm": -2.0}, 2, "topomon_vs_base")
    sink.write_scalars({"rankme/layer_0": -1.5}, 2, "topomon_vs_stage")
    sink.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {c.title: [(ch.title, list(ch.multiline.tag)) for ch in c.chart] for c in layout.category}
    assert charts["topomon"] == [("n_points", ["topomon/n_points/.*"]), ("rankme", ["topomon/rankme/.*"])]
    assert charts["topomon_vs_base"] == [("rankme (%)", ["topomon_vs_base/rankme/.*"])]
    assert charts["topomon_vs_stage"] == [("rankme (%)", ["topomon_vs_stage/rankme/.*"])]
    import re

    tags = acc.Tags()["tensors"] + acc.Tags()["scalars"]
    for cat in ("topomon_vs_base", "topomon_vs_stage"):
        assert any(re.fullmatch(charts[cat][0][1][0], t) for t in tags)


def test_the_printed_logdir_holds_the_trainer_and_topomon(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = str(tmp_path / "out")
    assert trainer_tensorboard_dir(["wandb"], out) is None
    trainer = trainer_tensorboard_dir(["tensorboard"], out)
    assert trainer == f"{out}/runs"
    assert shared_logdir(f"{out}/topomon/tensorboard/sft", trainer) == out
    assert shared_logdir(f"{out}/topomon/tensorboard/sft", None) == f"{out}/topomon/tensorboard/sft"
    assert shared_logdir("/a/tb", "/b/runs") == "/a/tb"  # never the whole file system
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    assert trainer_tensorboard_dir("all", out) == str(tmp_path / "tb")
    assert shared_logdir(str(tmp_path / "tb" / "topomon_sft"), str(tmp_path / "tb")) == str(tmp_path / "tb")


def test_image_helpers_name_figures_as_tensorboard_does():
    from topomon.sinks.queued import record_images, record_scalars

    img = np.zeros((4, 5, 3), dtype=np.uint8)
    r = MetricRecord(2, "sft", "final_norm", {"rankme": 1.5, "h1": float("nan")}, {"figure_persistence": img})
    assert record_scalars([r]) == {"topomon/rankme/final_norm": 1.5}
    assert list(record_images([r])) == ["topomon_figures/persistence/final_norm"]


# ----------------------------------------------------------------------------- the registry
def test_every_tracker_name_comes_from_the_registry():
    import typing

    import topomon.config
    import topomon.config_checks
    from topomon.sinks import registry

    assert registry.TRACKERS == tuple(registry.TRACKER_REGISTRY) == ("wandb", "mlflow", "trackio")
    assert topomon.config.TRACKERS is topomon.config_checks.TRACKERS is tr.TRACKERS is registry.TRACKERS
    for name, entry in registry.TRACKER_REGISTRY.items():
        assert MonitorConfig(trackers=[name]).trackers == (name,)
        sink_class = typing.get_type_hints(entry.make_sink)["return"]
        assert sink_class.name == name and issubclass(sink_class, QueuedSink)
        assert name in entry.start_hint


def test_the_sinks_are_made_by_the_registry_entry(monkeypatch):
    from topomon.sinks.base import AlertsOnly
    from topomon.sinks.registry import TRACKER_REGISTRY, Tracker

    made: list[tuple[object, bool]] = []

    def make_sink(run: object, figures: bool) -> AlertsOnly:
        made.append((run, figures))
        return AlertsOnly("mlflow", print)

    monkeypatch.setattr(tr, "_installed", lambda name: True)
    monkeypatch.setitem(TRACKER_REGISTRY, "mlflow", Tracker(lambda: "the-run", make_sink, "start one"))
    monkeypatch.setitem(TRACKER_REGISTRY, "wandb", Tracker(lambda: None, make_sink, "call wandb.init()"))
    extra = AlertsOnly("lightning", print)
    sinks = tr.record_sinks(None, ["mlflow"], figures=False, extra=lambda names: [extra] * len(names))
    assert [s.name for s in sinks] == ["mlflow", "lightning"] and made == [("the-run", False)]
    assert tr.record_sinks((), ["mlflow"], extra=lambda names: list(names)) == []  # [] is none
    with pytest.raises(ConfigError, match=r"no wandb run is active: call wandb.init\(\)"):
        tr.record_sinks(("wandb",), None)


# ----------------------------------------------------------------------------- the queued writer
def test_the_one_queued_writer_runs_in_order_refuses_when_full_and_abandons_at_its_deadline():
    from topomon.sinks.writer import OrderedWriter

    gate, seen, errors = threading.Event(), [], []

    def slow(i: int) -> None:
        gate.wait(5)
        seen.append(i)

    w = OrderedWriter("test", max_queue=2, on_error=errors.append)
    assert w.submit(slow, 0)
    while w.pending:  # the thread took call 0 and waits in it
        pass
    assert w.submit(slow, 1) and w.submit(slow, 2) and not w.submit(slow, 3)  # full: refused
    assert not w.close(timeout=0.1) and w.abandoned == 2 and not w.submit(slow, 4)  # closed: refused
    gate.set()
    done: list[str] = []
    ok = OrderedWriter("ok", max_queue=4, on_error=errors.append)
    assert ok.submit(done.append, "a") and ok.submit(lambda: 1 / 0) and ok.submit(done.append, "b")
    assert ok.close(timeout=5) and ok.abandoned == 0
    assert done == ["a", "b"] and [type(e) for e in errors] == [ZeroDivisionError]
    assert 1 not in seen and 2 not in seen  # abandoned: never run after the deadline
