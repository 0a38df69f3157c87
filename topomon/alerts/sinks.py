"""Where alerts go: the log, TensorBoard, a webhook, any callable.

A sink is any object with ``__call__(alert) -> None`` and ``close() -> None``
(:class:`AlertSink`). Sinks only render: the rules decide. The webhook never blocks the training
loop (a bounded queue feeds a daemon thread; a full queue drops and counts) and never logs
credentials. The monitor puts them behind :class:`topomon.sinks.base.SinkFan` (as
:class:`~topomon.sinks.base.AlertsOnly`), which counts every failure in its health under the sink's
name; :class:`MultiSink` is a plain fan-out for use on their own.

Example:
    >>> sink = MultiSink([LogSink(), CallableSink(print)])
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from topomon._validate import check_int, check_number, check_str
from topomon.sinks.writer import OrderedWriter
from topomon.types import Alert

__all__ = [
    "AlertSink",
    "LogSink",
    "CallableSink",
    "WebhookSink",
    "TensorBoardAlertSink",
    "MultiSink",
]

_LOG = logging.getLogger("topomon")
_REDACTED = "***"
_SECRET_HEADER_WORDS = ("authorization", "cookie", "token", "secret", "api-key", "apikey", "password")


@runtime_checkable
class AlertSink(Protocol):
    """Anything that takes alerts: ``sink(alert)``, then ``sink.close()`` at the end of the run."""

    def __call__(self, alert: Alert) -> None:
        """Deliver one alert."""
        ...

    def close(self) -> None:
        """Release resources (flush files, stop threads)."""
        ...


def _check_alert(alert: Any) -> Alert:
    if not isinstance(alert, Alert):
        raise TypeError(f"`alert` must be a topomon.types.Alert, got {type(alert).__name__}")
    return alert


class LogSink:
    """Alerts as log lines on the ``"topomon"`` logger.

    Warnings and critical alerts are logged with ``logger.warning``; recoveries (severity
    ``"info"``) with ``logger.info``.

    Args:
        logger: the logger (default ``logging.getLogger("topomon")``).

    Example:
        >>> sink = LogSink()
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        if logger is not None and not isinstance(logger, logging.Logger):
            raise TypeError(f"`logger` must be a logging.Logger or None, got {type(logger).__name__}")
        self.logger = logger if logger is not None else _LOG

    def __call__(self, alert: Alert) -> None:
        """Log one alert."""
        a = _check_alert(alert)
        log = self.logger.info if a.severity == "info" else self.logger.warning
        log("topomon alert [%s] %s", a.severity, a.message)

    def close(self) -> None:
        """Nothing to release."""


class CallableSink:
    """Alerts passed to a function; its exceptions are caught, counted and logged once, never raised.

    Args:
        fn: called as ``fn(alert)``.

    Attributes:
        errors: number of calls that raised.
        last_error: ``repr`` of the last exception, or None.

    Example:
        >>> seen = []
        >>> sink = CallableSink(seen.append)
    """

    def __init__(self, fn: Callable[[Alert], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"`fn` must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.calls = 0
        self.errors = 0
        self.last_error: str | None = None

    def __call__(self, alert: Alert) -> None:
        """Call ``fn(alert)``; count (and swallow) any exception."""
        self.calls += 1
        try:
            self.fn(alert)
        except Exception as exc:
            self.errors += 1
            self.last_error = repr(exc)
            if self.errors == 1:
                _LOG.warning(
                    "topomon: the alert callable %r failed (%r); counted, never raised", self.fn, exc
                )

    def close(self) -> None:
        """Nothing to release."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow redirects: a redirected POST would carry credentials to another address."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        raise urllib.error.HTTPError(req.full_url, code, f"redirect not followed ({msg})", headers, fp)


class WebhookSink:
    """Alerts POSTed as JSON to an HTTP(S) endpoint from a background daemon thread.

    ``sink(alert)`` only serialises the alert and puts it on a bounded queue: it never waits for
    the network. When the queue is full the alert is dropped and counted. Delivery failures
    (connection refused, timeout, non-2xx status, redirect) are counted in :attr:`failed`, logged
    once (redacted) at WARNING and then at DEBUG, and never raised. Credentials never appear in
    messages or the repr: ``user:pass@`` in the URL is removed from the URL and sent as a Basic
    ``Authorization`` header (unless one is given), the values of ``Authorization``-like headers,
    the path (a Slack-style webhook's path is its token) and the query string are shown as ``***``.
    Redirects are not followed. Uses ``urllib.request``
    only (the proxy settings of the environment apply).

    Args:
        url: ``http://`` or ``https://`` URL.
        timeout: seconds for each socket operation of one request (> 0).
        max_queue: alerts waiting at most (>= 1).
        headers: extra HTTP headers (str -> str).

    Raises:
        ValueError: on a URL that is not ``http``/``https`` with a host, a bad ``timeout`` or
            ``max_queue``.
        TypeError: if ``headers`` is not a mapping of str to str.

    Example:
        >>> sink = WebhookSink("https://user:secret@hooks.example.com/topomon")
        >>> "secret" in repr(sink), repr(sink).startswith("WebhookSink(url='https://***@hooks.example.com/***'")
        (False, True)
    """

    def __init__(
        self,
        url: str,
        timeout: float = 2.0,
        max_queue: int = 100,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"`url` must be a str, got {type(url).__name__}")
        parts = urllib.parse.urlsplit(url.strip())
        path = parts.path if parts.path not in ("", "/") else ""
        secrets = [s for s in (parts.password, parts.query, path) if s]
        self._secrets = sorted(set(secrets), key=len, reverse=True)
        shown = self._display_url(parts)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"`url` must be an http:// or https:// URL with a host, got {shown!r}")
        check_number(
            "timeout", timeout, 0, low_open=True, plain=True, expected="a finite number of seconds > 0"
        )
        check_int("max_queue", max_queue, 1, plain=True)
        extra = dict(headers or {})
        if headers is not None and not isinstance(headers, Mapping):
            raise TypeError(f"`headers` must be a mapping of str -> str, got {type(headers).__name__}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise TypeError("`headers` must map str to str")
        self._secrets = sorted(
            set(self._secrets) | {v for k, v in extra.items() if self._is_secret_header(k) and v},
            key=len,
            reverse=True,
        )
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        self._url = urllib.parse.urlunsplit(
            (parts.scheme.lower(), netloc, parts.path or "/", parts.query, "")
        )
        self._shown_url = shown
        self._headers = {"Content-Type": "application/json", "User-Agent": "topomon-alerts"}
        if parts.username is not None and not any(k.lower() == "authorization" for k in extra):
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
            self._secrets = sorted({*self._secrets, token, password} - {""}, key=len, reverse=True)
        self._headers.update(extra)
        self.timeout = float(timeout)
        self.max_queue = max_queue
        self._writer = OrderedWriter("webhook", max_queue=max_queue)
        self._opener = urllib.request.build_opener(_NoRedirect())
        self._lock = threading.Lock()
        self._sent = self._failed = self._dropped = 0
        self.last_error: str | None = None

    # -- redaction
    @staticmethod
    def _is_secret_header(name: str) -> bool:
        n = name.lower()
        return any(w in n for w in _SECRET_HEADER_WORDS)

    @staticmethod
    def _display_url(parts: urllib.parse.SplitResult) -> str:
        host = parts.netloc.rsplit("@", 1)[-1]
        netloc = f"{_REDACTED}@{host}" if "@" in parts.netloc else host
        query = f"?{_REDACTED}" if parts.query else ""
        path = parts.path if parts.path in ("", "/") else f"/{_REDACTED}"
        return f"{parts.scheme}://{netloc}{path}{query}"

    def _redact(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, _REDACTED)
        return text

    # -- counters
    @property
    def sent(self) -> int:
        """Alerts delivered (2xx answer)."""
        return self._sent

    @property
    def failed(self) -> int:
        """Alerts whose delivery failed (refused, timed out, non-2xx, unserialisable)."""
        return self._failed

    @property
    def dropped(self) -> int:
        """Alerts dropped: queue full, sent after :meth:`close`, or left when ``close`` timed out."""
        return self._dropped + self._writer.abandoned

    @property
    def pending(self) -> int:
        """Alerts waiting in the queue."""
        return self._writer.pending

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + 1)

    # -- delivery
    def __call__(self, alert: Alert) -> None:
        """Queue one alert for delivery; returns at once, never raises for delivery problems."""
        try:
            payload = json.dumps(_check_alert(alert).to_json(), allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            self.last_error = self._redact(f"{type(exc).__name__}: {exc}")
            self._count("_failed")
            return
        if not self._writer.submit(self._post, payload):  # full, or closed
            self._count("_dropped")

    def _post(self, payload: bytes) -> None:
        request = urllib.request.Request(self._url, data=payload, headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read(65536)
                ok = 200 <= int(response.status) < 300
                error = None if ok else f"HTTP status {response.status}"
        except Exception as exc:  # any network failure is counted, never raised into training
            ok, error = False, f"{type(exc).__name__}: {exc}"
        if ok:
            self._count("_sent")
            return
        self.last_error = self._redact(str(error))
        with self._lock:
            self._failed += 1
            first = self._failed == 1
        level = logging.WARNING if first else logging.DEBUG
        _LOG.log(level, "topomon webhook %s: delivery failed: %s", self._shown_url, self.last_error)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, for at most ``timeout`` seconds; what is left is dropped.

        Args:
            timeout: seconds to wait at most (>= 0).
        """
        self._writer.close(timeout)

    def __repr__(self) -> str:
        headers = {
            k: (_REDACTED if self._is_secret_header(k) else self._redact(v))
            for k, v in self._headers.items()
            if k not in ("Content-Type", "User-Agent")
        }
        return (
            f"WebhookSink(url={self._shown_url!r}, headers={headers}, sent={self._sent}, "
            f"failed={self._failed}, dropped={self.dropped})"
        )


def alert_markdown(alert: Alert) -> str:
    """One alert as a markdown line for a text panel: ``**severity** · message``.

    The engine's messages already name the step, the stage and the rule
    (``step 4 (stage 'sft'): ... [drop:rankme@final_norm]``), so they are not repeated; the rule is
    appended only when the message does not end with it (a hand-made alert).

    Example:
        >>> from topomon.types import Alert
        >>> a = Alert(step=4, stage="sft", rule="r", metric="rankme", layer="final_norm", value=1.0,
        ...           reference=2.0, reason="drop", message="step 4 (stage 'sft'): fell [r]",
        ...           severity="warning")
        >>> alert_markdown(a)
        "**warning** · step 4 (stage 'sft'): fell [r]"
    """
    line = f"**{alert.severity}** · {alert.message}"
    return line if alert.message.endswith(f"[{alert.rule}]") else f"{line} [`{alert.rule}`]"


class StepText:
    """The text entry of an alert's step: every alert of that step, one markdown line each.

    TensorBoard keeps one text entry per tag and step, so a second alert at a step must rewrite the
    entry with both lines. :meth:`add` returns the entry to write for the alert's step.
    """

    def __init__(self) -> None:
        self._step: int | None = None
        self._lines: list[str] = []

    def add(self, alert: Alert) -> str:
        """Add the alert's line; the step's whole entry."""
        step = int(alert.step)
        if step != self._step:
            self._step, self._lines = step, []
        self._lines.append(alert_markdown(alert))
        return "\n\n".join(self._lines)


class TensorBoardAlertSink:
    """Alerts written to TensorBoard: a text entry and an alert-count scalar, at the alert's step.

    Each alert is a markdown line (:func:`alert_markdown`); the text entry of a step holds
    every alert of that step (TensorBoard keeps one entry per tag and step: a second alert at the
    same step rewrites the entry with both lines). The scalar is the number of alerts received so far
    (recoveries included). Both are under ``"topomon/alerts"`` by default (torch's ``add_text`` stores
    the text under ``"topomon/alerts/text_summary"``). The writer belongs to the caller:
    :meth:`close` only flushes.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_text``,
            ``add_scalar`` and ``flush``).
        tag: the tag of both entries.
        initial_count: alerts counted before (when resuming a run).

    Raises:
        TypeError: if ``writer`` lacks ``add_text``, ``add_scalar`` or ``flush``.

    Example:
        >>> from torch.utils.tensorboard import SummaryWriter  # doctest: +SKIP
        >>> sink = TensorBoardAlertSink(SummaryWriter("runs/x"))  # doctest: +SKIP
    """

    def __init__(self, writer: Any, tag: str = "topomon/alerts", initial_count: int = 0) -> None:
        missing = [m for m in ("add_text", "add_scalar", "flush") if not callable(getattr(writer, m, None))]
        if missing:
            raise TypeError(f"`writer` must be a SummaryWriter; {type(writer).__name__} lacks {missing}")
        check_str("tag", tag)
        check_int("initial_count", initial_count, 0, plain=True)
        self.writer = writer
        self.tag = tag
        self.count = initial_count
        self._text = StepText()

    def __call__(self, alert: Alert) -> None:
        """Write the step's text entry (every alert of ``alert.step``) and the updated count."""
        a = _check_alert(alert)
        self.count += 1
        self.writer.add_text(self.tag, self._text.add(a), global_step=int(a.step))
        self.writer.add_scalar(self.tag, float(self.count), global_step=int(a.step))
        self.writer.flush()

    def close(self) -> None:
        """Flush the writer (it is not closed: it belongs to the caller)."""
        self.writer.flush()


class MultiSink:
    """Fan-out: every alert goes to every sink; one sink's failure never stops the others.

    A sink's first failure is logged; all are counted. (The monitor itself puts its alert sinks
    behind :class:`topomon.sinks.base.SinkFan`, which counts them in its health.)

    Args:
        sinks: the sinks.

    Attributes:
        errors: total number of exceptions caught (calls and closes).
        errors_by_sink: exceptions caught per sink, in the order of ``sinks``.
        last_error: ``repr`` of the last exception, or None.

    Example:
        >>> fan = MultiSink([LogSink(), CallableSink(print)])
    """

    def __init__(self, sinks: Iterable[AlertSink]) -> None:
        self.sinks = list(sinks)
        for i, s in enumerate(self.sinks):
            if not callable(s):
                raise TypeError(f"`sinks[{i}]` must be callable (an AlertSink), got {type(s).__name__}")
        self.errors = 0
        self.errors_by_sink = [0] * len(self.sinks)
        self.last_error: str | None = None

    def _failed(self, i: int, exc: Exception) -> None:
        self.errors += 1
        self.errors_by_sink[i] += 1
        self.last_error = f"{type(self.sinks[i]).__name__}: {exc!r}"
        if self.errors_by_sink[i] == 1:
            _LOG.warning("topomon: the alert sink %s failed; counted, never raised", self.last_error)

    def __call__(self, alert: Alert) -> None:
        """Send ``alert`` to every sink, catching and counting their exceptions."""
        for i, sink in enumerate(self.sinks):
            try:
                sink(alert)
            except Exception as exc:
                self._failed(i, exc)

    def close(self) -> None:
        """Close every sink, catching and counting their exceptions."""
        for i, sink in enumerate(self.sinks):
            close = getattr(sink, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception as exc:
                self._failed(i, exc)
