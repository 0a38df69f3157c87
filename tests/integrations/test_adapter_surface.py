"""Every adapter shows the same public surface of its session, declared (no ``__getattr__``)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import topomon.integrations
from topomon.integrations.base import SESSION_VIEWS, MonitorAdapter
from topomon.integrations.hf import TopoMonitor
from topomon.integrations.loop import Watch
from topomon.testing import tiny_causal_lm


def adapters() -> list[type[MonitorAdapter]]:
    out: list[type[MonitorAdapter]] = [TopoMonitor, Watch]
    try:
        from topomon.integrations.lightning import TopoMonitorCallback
    except ImportError:  # the extra is not installed
        return out
    return [*out, TopoMonitorCallback]


def build(cls: type[MonitorAdapter]) -> MonitorAdapter:
    if cls is Watch:
        return Watch(tiny_causal_lm("llama"), worker="sync", every_n_steps=4)
    return cls(worker="sync", every_n_steps=4)


def test_no_adapter_module_defines_getattr():
    folder = Path(inspect.getfile(topomon.integrations)).parent
    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted(folder.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__getattribute__")
    ]
    assert found == []


@pytest.mark.parametrize("cls", adapters(), ids=lambda c: c.__name__)
def test_each_adapter_declares_every_view_of_the_base(cls):
    assert issubclass(cls, MonitorAdapter)
    for name in SESSION_VIEWS:
        attr = inspect.getattr_static(cls, name)
        assert isinstance(attr, property) or callable(attr), name
        # the view is the base's (Lightning's state_dict is the one its checkpoints hold: still declared)
        assert type(attr) is type(inspect.getattr_static(MonitorAdapter, name)), name


def test_the_adapters_share_one_public_surface_of_the_session():
    def surface(cls: type) -> set[str]:
        return {n for n in SESSION_VIEWS if hasattr(cls, n)}

    base = {n for n in dir(MonitorAdapter) if not n.startswith("_")}
    assert base == set(SESSION_VIEWS)
    assert all(surface(cls) == set(SESSION_VIEWS) for cls in adapters())


@pytest.mark.parametrize("cls", adapters(), ids=lambda c: c.__name__)
def test_each_view_reads_the_session_now(cls):
    mon = build(cls)
    s = mon.session
    for name in SESSION_VIEWS:
        if isinstance(inspect.getattr_static(MonitorAdapter, name), property):
            assert getattr(mon, name) == getattr(s, name), name
    assert mon.health() == s.health() and mon.summary() == s.summary()
    s.errors, s.config = 3, s.config.replace(stage="dpo")  # the session replaces them: the views follow
    assert mon.errors == 3 and mon.config.stage == "dpo"
    assert mon.captures == [] and not mon.started
    mon.close()  # before a training: nothing to close, no error
    with pytest.raises(AttributeError):
        mon.no_such_view  # noqa: B018 - an unknown name is an AttributeError, not a session lookup
