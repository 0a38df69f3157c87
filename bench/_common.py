"""Helpers shared by the benchmark scripts (run as ``python bench/<name>.py``, so this folder is on
``sys.path``)."""

from __future__ import annotations

import json
from typing import Any


def emit_json(obj: Any, path: str | None) -> None:
    """Print ``obj`` as indented JSON and, when ``path`` is given, write the same to that file."""
    print(json.dumps(obj, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
