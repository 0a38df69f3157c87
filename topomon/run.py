"""The run directory: one folder for every stage of one model's post-training.

See ``docs/RUN_DIR.md`` for the layout. :class:`RunDir` owns the paths, the ``run.json`` index
(stages in order with their global step offsets) and the ``probes.json`` record of the probe set,
so that later stages (and ``topomon probe``) capture exactly the same tokens.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from topomon.sinks.jsonl_read import read_jsonl

__all__ = ["RunDir", "BASE_STAGE"]

BASE_STAGE = "base"


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunDir:
    """Paths and indexes of a run directory (created on first use).

    Args:
        path: the folder.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)

    # -- paths
    @property
    def metrics_path(self) -> str:
        """``metrics.jsonl``."""
        return os.path.join(self.path, "metrics.jsonl")

    @property
    def alerts_path(self) -> str:
        """``alerts.jsonl``."""
        return os.path.join(self.path, "alerts.jsonl")

    @property
    def index_path(self) -> str:
        """``run.json``."""
        return os.path.join(self.path, "run.json")

    @property
    def probes_path(self) -> str:
        """``probes.json``."""
        return os.path.join(self.path, "probes.json")

    @property
    def diagrams_dir(self) -> str:
        """``diagrams/``."""
        return os.path.join(self.path, "diagrams")

    def lora_path(self, stage: str) -> str:
        """``lora/<stage>.npz``: a LoRA stage's update subspace, saved at its end."""
        return os.path.join(self.path, "lora", f"{stage}.npz")

    def earlier_lora(self, stage: str, like: str | None = None) -> list[str]:
        """The saved LoRA update subspaces of the stages before ``stage``, in ``run.json`` order.

        "Before" is before ``like`` when an offline analysis replays the live stage ``like`` (it sees
        what that stage saw), else before ``stage``; for a new stage, every saved subspace but its
        own. Stages without a saved subspace are skipped.
        """
        names = [str(s.get("name")) for s in self.stages()]
        anchor = like if like in names else stage
        if anchor in names:
            paths = [self.lora_path(n) for n in names[: names.index(anchor)] if n != stage]
            return [p for p in paths if os.path.exists(p)]
        folder = os.path.dirname(self.lora_path(stage))
        saved = sorted(f for f in os.listdir(folder) if f.endswith(".npz")) if os.path.isdir(folder) else []
        return [os.path.join(folder, f) for f in saved if f != f"{stage}.npz"]

    def tensorboard_dir(self, stage: str) -> str:
        """``tensorboard/<stage>``."""
        return os.path.join(self.path, "tensorboard", stage)

    def ensure(self) -> None:
        """Create the folder."""
        os.makedirs(self.path, exist_ok=True)

    # -- index
    def index(self) -> dict[str, Any]:
        """The ``run.json`` content (an empty index when absent)."""
        try:
            with open(self.index_path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return {"stages": []}
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{self.index_path} is not valid JSON ({e.msg}); move it away to start a new run"
            ) from None
        data.setdefault("stages", [])
        return dict(data)

    def stages(self) -> list[dict[str, Any]]:
        """The stages recorded so far, in order."""
        return list(self.index()["stages"])

    def records(self) -> tuple[list[dict[str, Any]], int]:
        """Metric and health lines written so far, and the number of torn lines skipped."""
        if not os.path.exists(self.metrics_path):
            return [], 0
        return read_jsonl(self.metrics_path)

    def last_step(self) -> int:
        """The largest global step of any record or stage (0 for a new run)."""
        steps = [int(s.get("last_step") or 0) for s in self.stages()]
        recs, _ = self.records()
        steps += [int(r["step"]) for r in recs if r.get("kind") == "metrics" and "step" in r]
        return max(steps, default=0)

    def begin_stage(self, name: str, step_offset: int, info: dict[str, Any]) -> None:
        """Record that a stage starts (or resumes) at ``step_offset``."""
        self.ensure()
        index = self.index()
        stages = [s for s in index["stages"] if s.get("name") != name]
        previous = next((s for s in index["stages"] if s.get("name") == name), None)
        entry = dict(previous or {})
        entry.update({"name": name, "step_offset": int(step_offset), **info})
        entry.setdefault("started", time.time())
        if previous is None:
            stages.append(entry)
        else:
            stages.insert(index["stages"].index(previous), entry)
        index["stages"] = stages
        index.setdefault("created", time.time())
        _atomic_write_json(self.index_path, index)

    def end_stage(self, name: str, last_step: int, summary: dict[str, Any]) -> None:
        """Record the stage's last global step and final counters."""
        index = self.index()
        for s in index["stages"]:
            if s.get("name") == name:
                s["last_step"] = int(last_step)
                s["ended"] = time.time()
                s["summary"] = summary
        _atomic_write_json(self.index_path, index)

    # -- probes
    def probes(self) -> dict[str, Any] | None:
        """The stored probe set (texts and token plan), if any."""
        try:
            with open(self.probes_path, encoding="utf-8") as fh:
                return dict(json.load(fh))
        except FileNotFoundError:
            return None

    def save_probes(self, texts: list[str], plan: dict[str, Any]) -> None:
        """Store the probe texts and token plan of the run (first stage only)."""
        self.ensure()
        _atomic_write_json(self.probes_path, {"texts": texts, "plan": plan})
