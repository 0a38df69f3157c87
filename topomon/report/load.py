"""Read a run directory (see ``docs/RUN_DIR.md``) into plain, indexed data for the report.

Nothing here draws or computes metrics: it reads ``run.json``, ``metrics.jsonl``,
``alerts.jsonl`` and the ``diagrams/`` listing, normalises the records (``null`` -> NaN, missing
stage of an action -> the stage whose steps hold it) and orders stages, captures and layers. Every
optional file may be missing; a torn or garbage line is skipped, counted and noted, never raised.

Conventions used by the report:

* **captures** are the distinct ``(step, stage)`` pairs of the metric records, ordered by global
  step and, on ties, by stage order (the base model's step 0 comes before the first stage's step 0);
* the **base capture** is the first capture of the run;
* **layers** are ordered by depth: embeddings, ``layer_0`` .. ``layer_N``, ``final_norm``, other
  names (alphabetically), and the model-wide ``"model"`` last;
* **retained** = ``100 * end / base`` (defined when ``base > 0``), **change** =
  ``100 * (end - start) / |start|`` (defined when ``start != 0``); NaN otherwise.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from topomon.metrics.families import headline_keys
from topomon.run import BASE_STAGE
from topomon.sinks.jsonl_read import read_jsonl

__all__ = [
    "Stage",
    "Capture",
    "DiagramFile",
    "RunData",
    "load_run",
    "load_alert_log",
    "read_alert_log",
    "layer_sort_key",
    "retained_pct",
    "change_pct",
]


def __getattr__(name: str) -> Any:
    """``KEY_METRICS``, read when asked (no import-time snapshot of the registry).

    The metrics the report shows first (summary table, trajectories, heatmaps): the registered
    families' ``headline`` keys (:func:`topomon.metrics.families.headline_keys`).
    """
    if name == "KEY_METRICS":
        return headline_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_LAYER_RE = re.compile(r"^(?:layer|layers|h|block|blocks)[_.]?(\d+)$")


@dataclass(frozen=True)
class Stage:
    """One post-training stage of the run.

    Attributes:
        name: stage name ("base", "sft", ...).
        step_offset: global step at which the stage starts.
        first_step: first global step with a capture (or from ``run.json``); None if unknown.
        last_step: last global step with a capture (or from ``run.json``); None if unknown.
    """

    name: str
    step_offset: int
    first_step: int | None = None
    last_step: int | None = None


@dataclass(frozen=True)
class Capture:
    """One capture: a global step of one stage."""

    step: int
    stage: str


@dataclass(frozen=True)
class DiagramFile:
    """A ``diagrams/<stage>__<step>__<layer>.npz`` file."""

    stage: str
    step: int
    layer: str
    path: str


def layer_sort_key(name: str) -> tuple[int, int, str]:
    """Depth order of layer names: embeddings, ``layer_<i>`` by ``i``, ``final_norm``, others, ``model``.

    Args:
        name: a layer name as written in the records.

    Returns:
        a sort key.

    Example:
        >>> sorted(["final_norm", "layer_10", "layer_2", "model"], key=layer_sort_key)
        ['layer_2', 'layer_10', 'final_norm', 'model']
    """
    if name.startswith("embed"):
        return (0, 0, name)
    m = _LAYER_RE.match(name)
    if m:
        return (1, int(m.group(1)), name)
    if name in ("final_norm", "norm", "ln_f"):
        return (2, 0, name)
    if name == "model":
        return (4, 0, name)
    return (3, 0, name)


def retained_pct(end: float, base: float) -> float:
    """``100 * end / base``: how much of the base value is left; NaN unless ``base > 0`` and both finite.

    Example:
        >>> retained_pct(75.0, 100.0)
        75.0
    """
    if not (math.isfinite(end) and math.isfinite(base)) or base <= 0:
        return math.nan
    return 100.0 * end / base


def change_pct(end: float, start: float) -> float:
    """``100 * (end - start) / |start|``; NaN when ``start == 0`` or a value is not finite.

    Example:
        >>> change_pct(90.0, 100.0)
        -10.0
    """
    if not (math.isfinite(end) and math.isfinite(start)) or start == 0:
        return math.nan
    return 100.0 * (end - start) / abs(start)


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v == int(v):
        return int(v)
    return None


@dataclass
class RunData:
    """Everything the report needs from a run directory, indexed.

    Attributes:
        run_dir: the folder.
        info: ``run.json`` (empty when absent or unreadable).
        stages: stages in run order.
        metrics: metric records ``{"step", "stage", "layer", "metrics": {name: float}, "errors"}``.
        health: ``kind == "health"`` records as written.
        alerts: alert records (``step``, ``stage``, ``rule``, ``metric``, ``layer``, ``value``,
            ``reference``, ``reason``, ``message``, ``severity``, ``time``), missing fields filled.
        actions: action records (``step``, ``stage``, ``action``, ``params``, ``cause`` (the rule),
            ``message``, ``revert``, ``spec``, ``time``).
        diagrams: the diagram files, sorted by step.
        torn_lines: file name -> lines skipped as torn or garbage.
        notes: human sentences about what was missing or skipped.
        captures: the distinct ``(step, stage)`` captures, in run order (derived).
        layers: layer names in depth order (derived).
        metric_names: metric names in first-seen order (derived).
    """

    run_dir: str
    info: dict[str, Any]
    stages: list[Stage]
    metrics: list[dict[str, Any]]
    health: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    diagrams: list[DiagramFile] = field(default_factory=list)
    torn_lines: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    captures: list[Capture] = field(default_factory=list, init=False)
    layers: list[str] = field(default_factory=list, init=False)
    metric_names: list[str] = field(default_factory=list, init=False)
    _index: dict[tuple[int, str, str], dict[str, float]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for r in self.metrics:  # a re-written capture (resume) wins over the earlier one
            self._index[(r["step"], r["stage"], r["layer"])] = r["metrics"]
        order = {s.name: i for i, s in enumerate(self.stages)}
        caps = {(s, st) for (s, st, _) in self._index}
        self.captures = [
            Capture(s, st) for s, st in sorted(caps, key=lambda c: (c[0], order.get(c[1], len(order))))
        ]
        self.layers = sorted({k[2] for k in self._index}, key=layer_sort_key)
        names: dict[str, None] = {}
        for r in self.metrics:
            names.update(dict.fromkeys(r["metrics"]))
        self.metric_names = list(names)

    @property
    def base(self) -> Capture | None:
        """The first capture of the run (the baseline), or None without captures."""
        return self.captures[0] if self.captures else None

    @property
    def key_layer(self) -> str | None:
        """``final_norm`` if present, else the deepest layer (never ``"model"`` unless it is alone)."""
        hidden = [name for name in self.layers if name != "model"]
        if "final_norm" in hidden:
            return "final_norm"
        return hidden[-1] if hidden else (self.layers[-1] if self.layers else None)

    def value(self, cap: Capture, layer: str, metric: str) -> float:
        """The metric at one capture and layer; NaN when absent."""
        return self._index.get((cap.step, cap.stage, layer), {}).get(metric, math.nan)

    def series(self, metric: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)``, both ``(n_captures,)``, over all captures in order (NaN where absent)."""
        steps = np.array([c.step for c in self.captures], dtype=float)
        vals = np.array([self.value(c, layer, metric) for c in self.captures], dtype=float)
        return steps, vals

    def matrix(self, metric: str, layers: list[str]) -> np.ndarray:
        """``(len(layers), n_captures)`` values (NaN where absent)."""
        return np.array([[self.value(c, ly, metric) for c in self.captures] for ly in layers], dtype=float)

    def stage_captures(self, stage: str) -> list[Capture]:
        """The captures of one stage, in order."""
        return [c for c in self.captures if c.stage == stage]

    def stage_of(self, step: int) -> str:
        """The stage whose step range holds ``step`` (the last such stage); ``""`` when none does."""
        inside = ""
        after = ""
        for s in self.stages:
            lo = s.first_step if s.first_step is not None else s.step_offset
            hi = s.last_step if s.last_step is not None else math.inf
            if lo <= step <= hi:
                inside = s.name
            if s.step_offset <= step:
                after = s.name
        return inside or after

    def has_metric(self, metric: str) -> bool:
        """Whether some record holds a finite value of ``metric``."""
        return any(math.isfinite(r["metrics"].get(metric, math.nan)) for r in self.metrics)


def _read_info(run_dir: str, notes: list[str]) -> dict[str, Any]:
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        notes.append("run.json is missing: stages and their offsets are inferred from the records.")
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError) as e:
        notes.append(f"run.json could not be read ({type(e).__name__}: {e}); stages are inferred.")
        return {}
    if not isinstance(info, dict):
        notes.append("run.json does not hold a JSON object; stages are inferred.")
        return {}
    return info


def _normalise_metric(o: dict[str, Any]) -> dict[str, Any] | None:
    step, stage, layer, metrics = _int(o.get("step")), o.get("stage"), o.get("layer"), o.get("metrics")
    if step is None or not (isinstance(stage, str) and isinstance(layer, str) and isinstance(metrics, dict)):
        return None
    errors = o.get("errors") or []
    return {
        "step": step,
        "stage": stage,
        "layer": layer,
        "metrics": {str(k): _float(v) for k, v in metrics.items()},
        "errors": [str(e) for e in errors] if isinstance(errors, list) else [str(errors)],
    }


def _stages(info: dict[str, Any], metrics: list[dict[str, Any]], notes: list[str]) -> list[Stage]:
    seen: dict[str, list[int]] = {}
    for r in metrics:
        seen.setdefault(r["stage"], []).append(r["step"])
    declared: list[dict[str, Any]] = []
    raw = info.get("stages")
    if isinstance(raw, list):
        declared = [s for s in raw if isinstance(s, dict) and isinstance(s.get("name"), str)]
    elif isinstance(info.get("stage"), str):
        declared = [{"name": info["stage"]}]
    out: list[Stage] = []
    for s in declared:
        name = s["name"]
        steps = seen.get(name, [])
        offset = _int(s.get("step_offset"))
        first = _int(s.get("first_step"))
        last = _int(s.get("last_step"))
        if steps:  # the records widen a declared range, never narrow it
            first = min(steps) if first is None else min(first, *steps)
            last = max(steps) if last is None else max(last, *steps)
        if offset is None:
            offset = first if first is not None else 0
        out.append(Stage(name, offset, first, last))
    known = {s.name for s in out}
    extra = [n for n in seen if n not in known]  # dict order = first appearance
    # the base model's baseline is recorded only in the records (run.json lists the trained stages)
    unexpected = [n for n in extra if n != BASE_STAGE]
    if unexpected and declared:
        notes.append(f"stages not in run.json, inferred from the records: {', '.join(unexpected)}.")
    extra.sort(key=lambda n: (min(seen[n]), n != BASE_STAGE))
    inferred = [Stage(n, min(seen[n]), min(seen[n]), max(seen[n])) for n in extra]
    base = [s for s in inferred if s.name == BASE_STAGE]
    return base + out + [s for s in inferred if s.name != BASE_STAGE]


def _diagram_files(run_dir: str, notes: list[str]) -> list[DiagramFile]:
    folder = os.path.join(run_dir, "diagrams")
    if not os.path.isdir(folder):
        return []
    out: list[DiagramFile] = []
    bad: list[str] = []
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".npz"):
            continue
        parts = fname[: -len(".npz")].rsplit("__", 2)
        step = int(parts[1]) if len(parts) == 3 and parts[1].lstrip("-").isdigit() else None
        if len(parts) != 3 or step is None or not parts[0] or not parts[2]:
            bad.append(fname)
            continue
        out.append(DiagramFile(parts[0], step, parts[2], os.path.join(folder, fname)))
    if bad:
        notes.append(f"{len(bad)} file(s) in diagrams/ not named <stage>__<step>__<layer>.npz were ignored.")
    return sorted(out, key=lambda d: (d.step, d.stage, layer_sort_key(d.layer)))


def _fill_alert(o: dict[str, Any], step: int) -> dict[str, Any]:
    a = dict(o)
    a["step"] = step
    for k in ("rule", "metric", "layer", "reason", "message", "severity", "stage"):
        a[k] = "" if a.get(k) is None else str(a[k])
    a["severity"] = a["severity"] or "warning"
    for k in ("value", "reference", "time"):
        a[k] = _float(a.get(k))
    return a


def _fill_action(o: dict[str, Any], step: int) -> dict[str, Any]:
    cause = o.get("cause")
    cdict = cause if isinstance(cause, dict) else {}
    params = o.get("params") if isinstance(o.get("params"), dict) else {}
    return {
        "step": step,
        "stage": str(o.get("stage") or cdict.get("stage") or ""),
        "action": str(o.get("action") or "?"),
        "params": {str(k): v for k, v in params.items()},  # type: ignore[union-attr]
        "cause": str(cdict.get("rule", "") if isinstance(cause, dict) else (cause or "")),
        "message": str(o.get("message") or cdict.get("message") or ""),
        "revert": bool(o.get("revert", False)),
        "spec": str(o.get("spec") or ""),
        "time": _float(o.get("time")),
    }


def read_alert_log(run: RunData) -> int:
    """Read ``<run_dir>/alerts.jsonl`` into ``run.alerts`` and ``run.actions`` (filled, in file order).

    A record without a stage gets the stage whose steps hold it (:meth:`RunData.stage_of`); a line
    without a step is skipped with a note in ``run.notes``.

    Args:
        run: the run to fill (its ``stages`` place records without a stage).

    Returns:
        the number of torn or garbage lines skipped.

    Raises:
        FileNotFoundError: if the run directory has no ``alerts.jsonl``.
    """
    araw, torn = read_jsonl(os.path.join(run.run_dir, "alerts.jsonl"))
    skipped = 0
    for o in araw:
        step = _int(o.get("step"))
        if step is None:
            skipped += 1
            continue
        if o.get("kind", "alert") == "action":
            run.actions.append(_fill_action(o, step))
        elif o.get("kind", "alert") == "alert":
            run.alerts.append(_fill_alert(o, step))
    for rec in run.alerts + run.actions:
        rec["stage"] = rec["stage"] or run.stage_of(rec["step"])
    if skipped:
        run.notes.append(f"{skipped} alerts.jsonl line(s) without a step were ignored.")
    return torn


def load_alert_log(run_dir: str | os.PathLike[str]) -> RunData:
    """Read only the alerts and actions of a run directory (not ``metrics.jsonl``: quick to poll).

    Args:
        run_dir: a run directory: a folder holding ``run.json``, ``metrics.jsonl`` or ``alerts.jsonl``.

    Returns:
        a :class:`RunData` with ``alerts``, ``actions``, ``torn_lines``, ``notes``, the stages of
        ``run.json`` and no metric records.

    Raises:
        TypeError: if ``run_dir`` is not a str or path-like.
        FileNotFoundError: if the folder does not exist or holds none of those files.
        ValueError: if ``run_dir`` is a file, not a folder.

    Example:
        >>> log = load_alert_log("out/topomon")  # doctest: +SKIP
        >>> [(a["step"], a["rule"]) for a in log.alerts]  # doctest: +SKIP
        [(50, 'drop:rankme@final_norm')]
    """
    root = _check_folder(run_dir)
    names = ("run.json", "metrics.jsonl", "alerts.jsonl")
    if not any(os.path.isfile(os.path.join(root, n)) for n in names):
        inner = os.path.join(root, "topomon")
        hint = f"; did you mean {inner!r} (the default run directory of a training's output_dir)?"
        raise FileNotFoundError(
            f"{root!r} is not a topomon run directory: it has none of {', '.join(names)}"
            + (hint if os.path.isdir(inner) else "")
        )
    notes: list[str] = []
    info = _read_info(root, notes)
    run = RunData(root, info, _stages(info, [], notes), [], notes=notes)
    if os.path.isfile(os.path.join(root, "alerts.jsonl")):
        run.torn_lines["alerts.jsonl"] = n = read_alert_log(run)
        if n:
            notes.append(f"{n} torn or unreadable line(s) in alerts.jsonl were skipped.")
    return run


def _check_folder(run_dir: str | os.PathLike[str]) -> str:
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"`run_dir` must be a str or os.PathLike, got {type(run_dir).__name__}")
    root = os.fspath(run_dir)
    if not os.path.exists(root):
        raise FileNotFoundError(f"run directory {root!r} does not exist")
    if not os.path.isdir(root):
        raise ValueError(f"`run_dir` must be a folder (a topomon run directory), got the file {root!r}")
    return root


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run directory.

    Args:
        run_dir: a folder holding at least ``metrics.jsonl`` (see ``docs/RUN_DIR.md``).

    Returns:
        the :class:`RunData`; ``notes`` says what was missing, inferred or skipped.

    Raises:
        TypeError: if ``run_dir`` is not a str or path-like.
        FileNotFoundError: if the folder does not exist or holds no ``metrics.jsonl``.
        ValueError: if ``run_dir`` is a file, not a folder.

    Example:
        >>> run = load_run("out/topomon")  # doctest: +SKIP
        >>> [s.name for s in run.stages], run.key_layer  # doctest: +SKIP
        (['base', 'sft', 'dpo'], 'final_norm')
    """
    root = _check_folder(run_dir)
    mpath = os.path.join(root, "metrics.jsonl")
    if not os.path.isfile(mpath):
        raise FileNotFoundError(
            f"{root!r} is not a topomon run directory: it has no metrics.jsonl (expected {mpath!r})"
        )
    notes: list[str] = []
    torn: dict[str, int] = {}
    info = _read_info(root, notes)
    raw, torn["metrics.jsonl"] = read_jsonl(mpath)
    metrics: list[dict[str, Any]] = []
    health: list[dict[str, Any]] = []
    malformed = 0
    for o in raw:
        kind = o.get("kind", "metrics")
        if kind == "health":
            health.append(o)
        elif kind == "metrics":
            r = _normalise_metric(o)
            if r is None:
                malformed += 1
            else:
                metrics.append(r)
    if malformed:
        notes.append(f"{malformed} metrics line(s) without step/stage/layer/metrics were ignored.")
    if not metrics:
        notes.append("metrics.jsonl holds no metric records: nothing was captured yet.")
    stages = _stages(info, metrics, notes)
    run = RunData(root, info, stages, metrics, health, torn_lines=torn, notes=notes)
    if os.path.isfile(os.path.join(root, "alerts.jsonl")):
        torn["alerts.jsonl"] = read_alert_log(run)
    run.diagrams = _diagram_files(root, notes)
    for fname, n in torn.items():
        if n:
            notes.append(
                f"{n} torn or unreadable line(s) in {fname} were skipped "
                "(the process was probably killed mid-write)."
            )
    return run
