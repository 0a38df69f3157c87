from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from topomon.alerts.sinks import (
    AlertSink,
    CallableSink,
    LogSink,
    MultiSink,
    TensorBoardAlertSink,
    WebhookSink,
)
from topomon.sinks.jsonl import JsonlWriter
from topomon.sinks.jsonl_read import read_jsonl
from topomon.types import Alert

SECRET = "s3cretPW"
TOKEN = "tok-XYZ-123"


def make_alert(step: int = 7, severity: str = "warning", reason: str = "drop") -> Alert:
    return Alert(
        step=step,
        stage="narrow",
        rule="drop:rankme@final_norm",
        metric="rankme",
        layer="final_norm",
        value=31.5,
        reference=float("nan"),
        reason=reason,
        message=f"final_norm rankme dropped 21% at step {step}",
        severity=severity,
        time=1.0,
    )


def wait_until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# ----------------------------------------------------------------------------- a real HTTP server


class Server:
    def __init__(self, delay: float = 0.0, status: int = 200) -> None:
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if delay:
                    outer.release.wait(delay)  # bounded; set at teardown
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the client gave up

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str = "/hook", creds: str = "") -> str:
        return f"http://{creds}127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def slow_server() -> Iterator[Server]:
    s = Server(delay=3.0)
    yield s
    s.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- webhook


def test_webhook_delivers_the_alert_json(server: Server) -> None:
    sink = WebhookSink(server.url("/topomon?key=abc"), headers={"X-Run": "r1"})
    alert = make_alert()
    sink(alert)
    sink.close(timeout=5)
    assert (sink.sent, sink.failed, sink.dropped) == (1, 0, 0)
    (req,) = server.requests
    assert req["path"] == "/topomon?key=abc"
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["X-Run"] == "r1"
    body = json.loads(req["body"])
    assert body == alert.to_json()
    assert body["reference"] is None and body["kind"] == "alert"


def test_webhook_credentials_in_url_become_basic_auth_and_are_never_shown(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    sink = WebhookSink(server.url(creds=f"bob:{SECRET}@"))
    assert SECRET not in repr(sink) and "***@127.0.0.1" in repr(sink)
    sink(make_alert())
    sink.close(timeout=5)
    assert sink.sent == 1
    auth = server.requests[0]["headers"]["Authorization"]
    assert auth == "Basic " + base64.b64encode(f"bob:{SECRET}".encode()).decode()


def test_webhook_down_server_counts_failures_without_leaking_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://bob:{SECRET}@127.0.0.1:{closed_port()}/hook?token={TOKEN}"
    sink = WebhookSink(url, timeout=1.0, headers={"Authorization": f"Bearer {TOKEN}"})
    with caplog.at_level(logging.DEBUG, logger="topomon"):
        t0 = time.monotonic()
        for i in range(3):
            sink(make_alert(step=i))
        elapsed = time.monotonic() - t0
        sink.close(timeout=5)
    assert elapsed < 0.5
    assert (sink.sent, sink.failed, sink.dropped) == (0, 3, 0)
    assert sink.last_error is not None and "refused" in sink.last_error.lower()
    shown = [repr(sink), sink.last_error, caplog.text, *(r.getMessage() for r in caplog.records)]
    assert caplog.records, "a failure is logged"
    for text in shown:
        assert SECRET not in text and TOKEN not in text
    assert "'Authorization': '***'" in repr(sink)


def test_webhook_slow_server_never_blocks_the_caller(slow_server: Server) -> None:
    sink = WebhookSink(slow_server.url(), timeout=0.3)
    t0 = time.monotonic()
    sink(make_alert())
    assert time.monotonic() - t0 < 0.5  # the server sleeps 3 s
    assert wait_until(lambda: sink.failed == 1, timeout=5)
    assert (sink.sent, sink.dropped) == (0, 0)
    assert "timed out" in (sink.last_error or "").lower()
    sink.close(timeout=1)


def test_webhook_full_queue_drops_and_close_is_bounded(slow_server: Server) -> None:
    sink = WebhookSink(slow_server.url(), timeout=10.0, max_queue=2)
    t0 = time.monotonic()
    for i in range(10):
        sink(make_alert(step=i))
    assert time.monotonic() - t0 < 0.5
    # at most one in flight and two queued
    assert sink.dropped >= 7
    t1 = time.monotonic()
    sink.close(timeout=0.2)
    assert time.monotonic() - t1 < 2.0  # bounded although a request is still hanging
    sink(make_alert(step=99))  # after close: dropped, not sent
    slow_server.release.set()
    assert wait_until(lambda: sink.sent + sink.failed + sink.dropped == 11, timeout=5)
    assert sink.sent + sink.failed <= 3


def test_webhook_http_error_status_is_a_failure() -> None:
    s = Server(status=500)
    try:
        sink = WebhookSink(s.url())
        sink(make_alert())
        sink.close(timeout=5)
        assert (sink.sent, sink.failed) == (0, 1)
        assert "500" in (sink.last_error or "")
    finally:
        s.stop()


@pytest.mark.parametrize(
    "url", ["ftp://u:{pw}@example.com/x", "file:///etc/passwd", "not a url", "http://", "javascript:alert(1)"]
)
def test_webhook_rejects_non_http_urls_without_showing_credentials(url: str) -> None:
    with pytest.raises(ValueError, match="`url` must be an http:// or https:// URL") as info:
        WebhookSink(url.format(pw=SECRET))
    assert SECRET not in str(info.value)


def test_webhook_argument_validation() -> None:
    with pytest.raises(ValueError, match="`timeout`"):
        WebhookSink("http://127.0.0.1:1/", timeout=0)
    with pytest.raises(ValueError, match="`max_queue` must be an int >= 1, got 0"):
        WebhookSink("http://127.0.0.1:1/", max_queue=0)
    with pytest.raises(TypeError, match="`headers`"):
        WebhookSink("http://127.0.0.1:1/", headers={"X": 1})  # type: ignore[dict-item]


# ----------------------------------------------------------------------------- JSONL


def test_alert_lines_append_and_read_back(tmp_path) -> None:
    """alerts.jsonl is written by the router's JsonlWriter: appended, read back, never rewritten."""
    path = tmp_path / "run" / "alerts.jsonl"
    sink = JsonlWriter(path)
    alerts = [make_alert(step=i) for i in range(3)]
    sink.write(a.to_json() for a in alerts)
    sink.close()
    records, torn = read_jsonl(path)
    assert torn == 0
    assert records == [a.to_json() for a in alerts]
    # a second writer on the same file appends
    again = JsonlWriter(path)
    again.write([make_alert(step=3).to_json()])
    again.close()
    assert [r["step"] for r in read_jsonl(path)[0]] == [0, 1, 2, 3]


def test_alert_lines_after_a_torn_last_line_never_rewrite(tmp_path) -> None:
    path = tmp_path / "alerts.jsonl"
    good = json.dumps(make_alert(step=1).to_json())
    before = (good + "\n" + good[:25]).encode()  # a crash mid-write
    path.write_bytes(before)
    sink = JsonlWriter(path)
    sink.write([make_alert(step=2).to_json()])
    sink.close()
    after = path.read_bytes()
    assert after.startswith(before)  # appended only
    records, torn = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2]
    assert torn == 1


def test_read_jsonl_skips_and_counts_garbage(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"a": 1}\n\n[1, 2]\n\xff\xfe\n{"b": NaN}\nnot json\n{"c": 3}\n{"d": ')
    records, torn = read_jsonl(path)
    assert records[0] == {"a": 1} and records[2] == {"c": 3} and len(records) == 3
    assert torn == 4  # list, bad utf-8, "not json", torn tail; blank lines are not counted
    (tmp_path / "empty.jsonl").write_text("")
    assert read_jsonl(tmp_path / "empty.jsonl") == ([], 0)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(TypeError, match="`path`"):
        read_jsonl(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- log, callable, fan-out


def test_log_sink_levels(caplog: pytest.LogCaptureFixture) -> None:
    sink = LogSink()
    with caplog.at_level(logging.INFO, logger="topomon"):
        sink(make_alert())
        sink(make_alert(severity="info", reason="recovered"))
    assert [(r.name, r.levelno) for r in caplog.records] == [
        ("topomon", logging.WARNING),
        ("topomon", logging.INFO),
    ]
    assert "dropped 21%" in caplog.records[0].getMessage()
    with pytest.raises(TypeError, match="`alert`"):
        sink({"step": 1})  # type: ignore[arg-type]


def test_callable_sink_swallows_and_counts() -> None:
    seen: list[Alert] = []
    ok = CallableSink(seen.append)
    ok(make_alert())
    assert len(seen) == 1 and ok.errors == 0

    def boom(alert: Alert) -> None:
        raise RuntimeError("sink down")

    bad = CallableSink(boom)
    bad(make_alert())
    bad(make_alert())
    assert (bad.calls, bad.errors) == (2, 2) and "sink down" in (bad.last_error or "")


def test_multisink_one_failure_never_stops_the_others(tmp_path) -> None:
    class Broken:
        def __call__(self, alert: Alert) -> None:
            raise OSError("disk full")

        def close(self) -> None:
            raise OSError("close failed")

    seen: list[Alert] = []
    also: list[Alert] = []
    fan = MultiSink([Broken(), CallableSink(seen.append), CallableSink(also.append)])
    fan(make_alert(step=1))
    fan(make_alert(step=2))
    fan.close()
    assert [a.step for a in seen] == [1, 2]
    assert [a.step for a in also] == [1, 2]
    assert fan.errors == 3 and fan.errors_by_sink == [3, 0, 0]
    assert "close failed" in (fan.last_error or "")


def test_every_sink_satisfies_the_protocol(tmp_path) -> None:
    class Writer:
        def add_text(self, *a: Any, **k: Any) -> None: ...
        def add_scalar(self, *a: Any, **k: Any) -> None: ...
        def flush(self) -> None: ...

    sinks = [
        LogSink(),
        CallableSink(print),
        WebhookSink("http://127.0.0.1:9/"),
        TensorBoardAlertSink(Writer()),
        MultiSink([]),
    ]
    assert all(isinstance(s, AlertSink) for s in sinks)


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_sink_text_and_count_read_back(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardAlertSink(writer)
    sink(make_alert(step=3))
    sink(make_alert(step=7, severity="info", reason="recovered"))
    sink.close()
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    # torch's add_text stores the text under "<tag>/text_summary"
    assert acc.Tags()["tensors"] == ["topomon/alerts/text_summary"]
    assert [(e.step, e.value) for e in acc.Scalars("topomon/alerts")] == [(3, 1.0), (7, 2.0)]
    texts = [
        (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("topomon/alerts/text_summary")
    ]
    assert [s for s, _ in texts] == [3, 7]
    # the severity, the message once, and the rule (this hand-made message does not end with it)
    assert texts[0][1] == "**warning** · final_norm rankme dropped 21% at step 3 [`drop:rankme@final_norm`]"
    with pytest.raises(TypeError, match="lacks"):
        TensorBoardAlertSink(object())
