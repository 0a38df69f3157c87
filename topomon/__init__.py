"""topomon: watch the geometry and topology of an LLM's hidden states while it is fine-tuned."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "TopoMonitor", "MonitorSession", "watch", "MonitorConfig", "ConfigError", "Alert"]

# Nothing heavy happens at import time: the callback (and transformers) load on first use.
_LAZY = {
    "TopoMonitor": "topomon.integrations.hf",
    "MonitorSession": "topomon.session",
    "watch": "topomon.integrations.loop",
    "TopoMonitorCallback": "topomon.integrations.lightning",  # not in __all__: lightning is an extra
    "MonitorConfig": "topomon.config",
    "ConfigError": "topomon.config",
    "Alert": "topomon.types",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'topomon' has no attribute {name!r}")
