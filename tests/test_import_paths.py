"""Every dotted ``topomon.x.y`` name in README.md, docs/*.md and the package's docstrings resolves.

A name resolves when its longest importable module prefix imports and the rest are attributes of
it (dataclass fields and annotated class attributes count: ``Action.params``). File names such as
``topomon.yaml`` are not import paths and are ignored; nothing else is skipped.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\btopomon(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
FILE_SUFFIXES = {"yaml", "yml", "json", "jsonl", "toml", "md", "py", "html", "png", "txt", "log"}


def _texts() -> list[tuple[str, str]]:
    out = [
        (p.relative_to(ROOT).as_posix(), p.read_text())
        for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    ]
    for path in sorted((ROOT / "topomon").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    out.append((path.relative_to(ROOT).as_posix(), doc))
    return out


def _names() -> dict[str, list[str]]:
    found: dict[str, set[str]] = {}
    for where, text in _texts():
        for m in NAME.finditer(text):
            name = m.group(0)
            if name.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
                found.setdefault(name, set()).add(where)
    return {k: sorted(v) for k, v in sorted(found.items())}


NAMES = _names()


def _has(obj: Any, attr: str) -> bool:
    if hasattr(obj, attr):
        return True
    if isinstance(obj, type):
        fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
        return attr in fields or any(attr in getattr(c, "__annotations__", {}) for c in obj.__mro__)
    return False


def _resolve(name: str) -> None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise
        for j, attr in enumerate(parts[i:], start=i):
            assert _has(obj, attr), f"{'.'.join(parts[:j])} has no attribute {attr!r}"
            obj = getattr(obj, attr, None)
        return
    raise AssertionError(f"no importable prefix in {name!r}")


def test_the_scan_finds_names() -> None:
    assert "topomon.alerts.rules" in NAMES or "topomon.alerts.rules_from_config" in NAMES
    assert len(NAMES) > 20


# modules of frameworks that pin their own transformers / TRL: resolved in that framework's venv (make test
# builds it), where the framework is installed
FRAMEWORK_VENVS = {"topomon.integrations.axolotl": ROOT / ".venv-axolotl"}


@pytest.mark.parametrize("name", list(NAMES))
def test_documented_import_path_exists(name: str) -> None:
    venv = next((v for m, v in FRAMEWORK_VENVS.items() if name == m or name.startswith(m + ".")), None)
    if venv is not None:
        if not (venv / ".installed").exists():
            pytest.skip(f"{venv.name} is not built (make setup-frameworks)")
        module, _, attr = name.rpartition(".") if name not in FRAMEWORK_VENVS else (name, "", "")
        code = f"import importlib; m = importlib.import_module({module!r}); {attr!r} and getattr(m, {attr!r})"
        out = subprocess.run(
            [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=ROOT
        )
        assert out.returncode == 0, f"{name} (in {venv.name}): {out.stderr[-2000:]}"
        return
    try:
        _resolve(name)
    except AssertionError as e:
        raise AssertionError(f"{name} (named in {', '.join(NAMES[name])}): {e}") from None


def test_import_topomon_is_light() -> None:
    code = (
        "import sys, topomon\n"
        "topomon.ConfigError, topomon.Alert, topomon.MonitorConfig\n"
        "import topomon.alerts\n"
        "print(sorted(m for m in ('torch', 'transformers', 'scipy', 'sklearn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
