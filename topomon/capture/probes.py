"""Probe sets: the fixed texts run through the model at every capture.

A probe set is a list of strings. It can come from the packaged default set, a Python list, a
``.txt`` file (one text per line), a ``.jsonl`` file (one JSON object per line, text in a field),
or a ``datasets.Dataset``. Errors name the file and the line.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from importlib import resources
from typing import Any

__all__ = ["ProbeError", "load_probes", "default_probes"]

MAX_TEXT_CHARS = 100_000


class ProbeError(ValueError):
    """The probe set cannot be used; the message says which file, line or item and why."""


def default_probes() -> list[str]:
    """The 64 packaged probe texts (see ``topomon/data/README.md``)."""
    text = resources.files("topomon").joinpath("data/probes.jsonl").read_text(encoding="utf-8")
    return _parse_jsonl(text.splitlines(), "text", "<topomon default probes>")


def load_probes(spec: Any = None, *, field: str = "text", max_probes: int | None = None) -> list[str]:
    """Load a probe set.

    Args:
        spec: None (the default set), a list of strings, a path to ``.txt``/``.jsonl``, or a
            ``datasets.Dataset`` with a string column ``field``.
        field: the text field of JSONL records and dataset rows.
        max_probes: keep at most this many: the first ones of your set; of the default set (grouped
            by genre: chat, facts, instructions, maths, code, stories, formal text, safety, other
            languages), texts spread evenly over it, so that every genre stays.

    Returns:
        The probe texts.

    Raises:
        ProbeError: empty set, a file that is missing, not UTF-8, malformed JSON (with line
            number), a record without ``field``, a non-string or empty text, or an absurdly long one.
    """
    if spec is None:
        texts = default_probes()
    elif isinstance(spec, (str, os.PathLike)):
        texts = _load_file(os.fspath(spec), field)
    elif isinstance(spec, Sequence) and not isinstance(spec, bytes):
        texts = list(spec)
        for i, t in enumerate(texts):
            _check_text(t, f"probes[{i}]")
    elif hasattr(spec, "column_names") and hasattr(spec, "__getitem__"):  # datasets.Dataset
        if field not in spec.column_names:
            raise ProbeError(f"the probe dataset has no column {field!r}; columns: {spec.column_names}")
        texts = list(spec[field])
        for i, t in enumerate(texts):
            _check_text(t, f"probe dataset row {i} field {field!r}")
    else:
        raise ProbeError(
            f"probes must be None, a list of strings, a .txt/.jsonl path or a datasets.Dataset, "
            f"got {type(spec).__name__}"
        )
    if not texts:
        raise ProbeError("the probe set is empty: give at least 3 texts (64-256 is typical)")
    if max_probes is not None and len(texts) > max_probes:
        if spec is not None:
            warnings.warn(
                f"the probe set holds {len(texts)} texts; only the first max_probes={max_probes} are "
                "used (raise `max_probes` to use more: each capture then costs more)",
                UserWarning,
                stacklevel=2,
            )
            texts = texts[:max_probes]
        else:
            n = len(texts)
            texts = [texts[(i * n) // max_probes] for i in range(max_probes)]
    return texts


def _check_text(t: Any, where: str) -> None:
    if not isinstance(t, str):
        raise ProbeError(f"{where} must be a string, got {type(t).__name__}")
    if not t.strip():
        raise ProbeError(f"{where} is empty or only white space")
    if len(t) > MAX_TEXT_CHARS:
        raise ProbeError(f"{where} is {len(t)} characters long; probe texts must be at most {MAX_TEXT_CHARS}")
    try:
        t.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a JSON "\ud800" escape
        raise ProbeError(f"{where} is not valid Unicode (character {e.start} is a lone surrogate)") from None


def _load_file(path: str, field: str) -> list[str]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ProbeError(f"probe file not found: {path}") from None
    except IsADirectoryError:
        raise ProbeError(f"probe path is a folder, not a file: {path}") from None
    except (OSError, ValueError) as e:  # no permission, a NUL byte or too long a name, ...
        raise ProbeError(f"cannot read the probe file {path!r}: {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ProbeError(f"{path} is not UTF-8 text (bad byte on line {line})") from None
    lines = text.splitlines()
    if path.endswith(".jsonl") or path.endswith(".json"):
        texts = _parse_jsonl(lines, field, path)
    else:
        texts = []
        for n, ln in enumerate(lines, start=1):
            if ln.strip():
                _check_text(ln, f"{path} line {n}")
                texts.append(ln)
    if not texts:
        raise ProbeError(f"probe file {path} holds no texts")
    return texts


def _parse_jsonl(lines: list[str], field: str, where: str) -> list[str]:
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProbeError(f"{where} line {n}: malformed JSON ({e.msg})") from None
        except RecursionError:
            raise ProbeError(f"{where} line {n}: malformed JSON (nested too deeply)") from None
        if isinstance(rec, str):
            text = rec
        elif isinstance(rec, dict):
            if field not in rec:
                raise ProbeError(f"{where} line {n}: no field {field!r} (fields: {sorted(rec)})")
            text = rec[field]
        else:
            raise ProbeError(f"{where} line {n}: expected an object or a string, got {type(rec).__name__}")
        _check_text(text, f"{where} line {n}")
        out.append(text)
    return out
