"""No silent no-op (STYLE 13): every ``MonitorConfig`` field shows its effect, or fails before step 1.

``CASES`` maps every field of :class:`~topomon.config.MonitorConfig` to a short monitored run of a
tiny in-memory model in a plain loop (``topomon.watch``, ``worker="sync"`` unless the field is about
the worker) that checks the field's effect in ``metrics.jsonl``, ``alerts.jsonl``, TensorBoard or
the health counters, or that a setting which cannot work raises :class:`ConfigError` before the
first step. A field added without a case fails :func:`test_every_field_has_a_case` (as the
intervention registry's test does for intervention kinds).

The combinations the docs name (mode x logits / LoRA / topology layers / custom metrics / families
x worker kind; a rule on every metric family, on a captured layer and on one that is not) are the
tests after the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import topomon
from topomon.config import ConfigError, MonitorConfig
from topomon.config_checks import PROBE_SET_OPTIONS
from topomon.testing import sample_texts, tiny_causal_lm, tiny_tokenizer

# small and deterministic: a 2-block model, 8 probes of 16 tokens, no figures, no budget, no TensorBoard
FAST: dict[str, Any] = dict(
    schedule="every",
    every_n_steps=2,
    worker="sync",
    max_probes=8,
    max_length=16,
    max_points=64,
    topology_points=32,
    figures_every=0,
    overhead_budget=None,
    tensorboard=False,
)
ALWAYS = [{"type": "threshold", "metric": "rankme", "layer": "final_norm", "above": 0.0, "name": "always"}]
ENV = "tests.noop_metrics:worker_env"


@functools.lru_cache(maxsize=1)
def tok() -> Any:
    return tiny_tokenizer()


def tiny(seed: int = 0) -> Any:
    return tiny_causal_lm("llama", num_layers=2, hidden_size=16, seed=seed)


def lora_model() -> Any:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


@functools.lru_cache(maxsize=1)
def _batch() -> dict[str, torch.Tensor]:
    enc = tok()(sample_texts(4, seed=5), return_tensors="pt", padding=True, truncation=True, max_length=16)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return dict(enc)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclasses.dataclass
class Result:
    """What a monitored run left: the monitor, its run directory, the loop's signals."""

    mon: Any
    run_dir: Path
    signals: list[Any]
    steps_done: int

    @property
    def stage(self) -> str:
        return str(self.mon.session.config.stage)

    @property
    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.run_dir / "metrics.jsonl")

    def metrics(self, layer: str | None = None) -> list[dict[str, Any]]:
        """The metric records of this run's stage (one layer's, when given), in order."""
        return [
            r
            for r in self.records
            if r["kind"] == "metrics" and r["stage"] == self.stage and layer in (None, r["layer"])
        ]

    def layers(self) -> set[str]:
        return {r["layer"] for r in self.metrics()}

    def keys(self, layer: str) -> set[str]:
        return {k for r in self.metrics(layer) for k in r["metrics"]}

    def steps(self) -> list[int]:
        return sorted({r["step"] for r in self.metrics()})

    def first(self, layer: str, key: str) -> float:
        return float(self.metrics(layer)[0]["metrics"][key])

    @property
    def health(self) -> dict[str, Any]:
        return [r for r in self.records if r["kind"] == "health"][-1]

    def alerts(self) -> list[dict[str, Any]]:
        return [r for r in read_jsonl(self.run_dir / "alerts.jsonl") if r["kind"] == "alert"]

    def actions(self) -> list[dict[str, Any]]:
        return [r for r in read_jsonl(self.run_dir / "alerts.jsonl") if r["kind"] == "action"]

    def scalars(self, logdir: Path | None = None) -> Any:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(logdir or self.run_dir / "tensorboard" / self.stage), size_guidance={})
        acc.Reload()
        return acc


def fast(config: dict[str, Any]) -> dict[str, Any]:
    """``FAST``, less the probe-set options in passive mode (there they are a ConfigError)."""
    if config.get("mode") != "passive":
        return FAST
    return {k: v for k, v in FAST.items() if k not in PROBE_SET_OPTIONS}


def run(
    tmp_path: Path,
    *,
    model: Any = None,
    steps: int = 3,
    name: str = "out",
    **config: Any,
) -> Result:
    """A plain loop of ``steps`` SGD steps on one fixed batch, monitored with ``FAST`` and ``config``."""
    model = tiny() if model is None else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    signals = []
    done = 0
    with topomon.watch(model, tok(), output_dir=tmp_path / name, **{**fast(config), **config}) as mon:
        for step in range(1, steps + 1):
            model(**_batch()).loss.backward()
            mon.before_optimizer_step()
            opt.step()
            opt.zero_grad()
            done = step
            signals.append(mon.step(step, logs={"loss": 1.0}))
            if signals[-1].should_training_stop:
                break
    assert mon.session.run is not None
    return Result(mon, Path(mon.session.run.path), signals, done)


def fails_before_step_1(tmp_path: Path, match: str, **config: Any) -> None:
    """The config raises ConfigError at construction or in begin(), before the loop's first step."""
    model = tiny()
    with pytest.raises(ConfigError, match=match):
        mon = topomon.watch(model, tok(), output_dir=tmp_path / "bad", **{**fast(config), **config})
        try:
            mon.begin()
        finally:
            mon.session.close()
    assert not [
        r for r in read_jsonl(tmp_path / "bad" / "topomon" / "metrics.jsonl") if r["kind"] == "metrics"
    ]


# ------------------------------------------------------------------------------------ the field cases
def case_stage(tmp_path: Path) -> None:
    r = run(tmp_path, stage="sft-x")
    assert {x["stage"] for x in r.records if x["kind"] == "metrics"} == {"base", "sft-x"}
    assert [s["name"] for s in json.loads((r.run_dir / "run.json").read_text())["stages"]] == ["sft-x"]
    fails_before_step_1(tmp_path, "`stage`", stage="a/b")


def case_run_dir(tmp_path: Path) -> None:
    r = run(tmp_path, run_dir=str(tmp_path / "elsewhere"))
    assert r.run_dir == tmp_path / "elsewhere" and r.metrics()
    assert not (tmp_path / "out" / "topomon").exists()


def case_step_offset(tmp_path: Path) -> None:
    r = run(tmp_path, step_offset=100)
    assert r.steps() == [100, 102, 103]


def case_logging_dir(tmp_path: Path) -> None:
    r = run(tmp_path, tensorboard=True, logging_dir=str(tmp_path / "tb"))
    assert "topomon/rankme/final_norm" in r.scalars(tmp_path / "tb").Tags()["scalars"]
    assert not (r.run_dir / "tensorboard").exists()


def case_tensorboard(tmp_path: Path) -> None:
    on = run(tmp_path, name="on", tensorboard=True)
    steps = [e.step for e in on.scalars().Scalars("topomon/rankme/final_norm")]
    assert steps == [0, 2, 3]
    off = run(tmp_path, name="off", tensorboard=False)
    assert off.metrics() and not (off.run_dir / "tensorboard").exists()


def case_mode(tmp_path: Path) -> None:
    probe = run(tmp_path, name="probe", mode="probe", max_points=10_000)
    passive = run(tmp_path, name="passive", mode="passive", max_points=10_000)
    # probe mode: the probe set's tokens, a baseline at step 0 and the final model; passive: the tokens of
    # the training batch at the capture steps (no forward of its own, so no baseline and no final capture)
    assert probe.steps() == [0, 2, 3] and not (passive.run_dir / "probes.json").exists()
    counted = int(_batch()["attention_mask"].sum()) - 4  # every real token but each text's first
    assert passive.steps() == [2] and passive.first("final_norm", "n_points") == counted
    assert probe.first("final_norm", "n_points") != counted


def case_probes(tmp_path: Path) -> None:
    texts = sample_texts(5, seed=9)
    r = run(tmp_path, probes=texts, pooling="last")
    assert r.first("final_norm", "n_points") == 5
    fails_before_step_1(tmp_path, "`probes`", mode="passive", probes=texts)


def case_probe_field(tmp_path: Path) -> None:
    path = tmp_path / "probes.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in sample_texts(6, seed=9)))
    r = run(tmp_path, probes=str(path), probe_field="body", pooling="last")
    assert r.first("final_norm", "n_points") == 6
    with pytest.raises(ValueError, match="text"):  # the default field is not in the file
        topomon.watch(tiny(), tok(), probes=str(path), **FAST)


def case_max_probes(tmp_path: Path) -> None:
    assert run(tmp_path, max_probes=5, pooling="last").first("final_norm", "n_points") == 5


def case_max_length(tmp_path: Path) -> None:
    r = run(tmp_path, max_length=4, pooling="all", exclude_first=False, max_points=10_000)
    assert r.first("layer_0", "n_points") == 8 * 4  # every packaged probe is longer than 4 tokens


def case_probe_batch_size(tmp_path: Path) -> None:
    model = tiny()
    sizes: list[int] = []

    def pre_hook(module: Any, args: Any, kwargs: Any) -> None:
        if not torch.is_grad_enabled():  # the probe forwards run under no_grad; training's do not
            sizes.append(int(kwargs["input_ids"].shape[0]))

    model.model.register_forward_pre_hook(pre_hook, with_kwargs=True)  # the probe pass skips the LM head
    run(tmp_path, model=model, probe_batch_size=3, steps=1)
    # the baseline and the final capture, 8 probes each (after a one-text forward of the set-up)
    assert sizes[-6:] == [3, 3, 2] * 2 and max(sizes) == 3


def case_layers(tmp_path: Path) -> None:
    assert run(tmp_path, name="one", layers=[0]).layers() == {"layer_0", "final_norm", "model"}
    assert run(tmp_path, name="last", layers=[-1]).layers() == {"layer_1", "final_norm", "model"}
    fails_before_step_1(tmp_path, "layer", layers=[7])


def case_final_norm(tmp_path: Path) -> None:
    assert "final_norm" in run(tmp_path, name="on", final_norm=True).layers()
    off = run(tmp_path, name="off", final_norm=False, alerts=None)
    assert off.layers() == {"layer_0", "layer_1", "model"}


def case_pooling(tmp_path: Path) -> None:
    n = {p: run(tmp_path, name=p, pooling=p).first("layer_0", "n_points") for p in ("all", "last", "mean")}
    assert n["last"] == n["mean"] == 8 and n["all"] > 8


def case_max_points(tmp_path: Path) -> None:
    assert run(tmp_path, max_points=10, pooling="all").first("layer_0", "n_points") == 10


def case_exclude_first(tmp_path: Path) -> None:
    kw = dict(pooling="all", max_points=10_000)
    on = run(tmp_path, name="on", exclude_first=True, **kw).first("layer_0", "n_points")
    off = run(tmp_path, name="off", exclude_first=False, **kw).first("layer_0", "n_points")
    assert off - on == 8  # one token per probe


def massive_model() -> Any:
    """A model whose residual stream carries one token with a norm ~20x the others (a massive token)."""
    model = tiny()
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        ids = tok()(sample_texts(8), add_special_tokens=False)["input_ids"]
        common = max({i for t in ids for i in t}, key=lambda i: sum(t.count(i) for t in ids))
        emb[common] *= 20.0 * emb.norm(dim=1).median() / emb[common].norm()
    return model


def case_outlier_factor(tmp_path: Path) -> None:
    kw = dict(pooling="all", max_points=10_000, layers=[0], massive_treatment="cut")
    cut = run(tmp_path, name="cut", model=massive_model(), outlier_factor=5.0, **kw)
    keep = run(tmp_path, name="keep", model=massive_model(), outlier_factor=None, **kw)
    assert cut.first("layer_0", "n_outliers") > 0 and keep.first("layer_0", "n_outliers") == 0
    assert cut.first("layer_0", "rankme") != keep.first("layer_0", "rankme")


def case_normalize(tmp_path: Path) -> None:
    raw = run(tmp_path, name="raw", normalize=False)
    unit = run(tmp_path, name="unit", normalize=True)
    assert raw.first("layer_0", "rankme") != unit.first("layer_0", "rankme")
    assert raw.first("layer_0", "n_points") == unit.first("layer_0", "n_points")


def case_massive_treatment(tmp_path: Path) -> None:
    kw = dict(pooling="all", max_points=10_000, layers=[0], outlier_factor=100.0)
    robust = run(tmp_path, name="robust", model=massive_model(), massive_treatment="robust", **kw)
    cut = run(tmp_path, name="cut", model=massive_model(), massive_treatment="cut", **kw)
    # the 20x token is below 100x the median (kept by "cut") and removed by the robust rule
    assert robust.first("layer_0", "n_outliers") > cut.first("layer_0", "n_outliers") == 0
    assert robust.first("layer_0", "n_points") < cut.first("layer_0", "n_points")


def case_schedule(tmp_path: Path) -> None:
    assert run(tmp_path, name="every", schedule="every", every_n_steps=2, steps=5).steps() == [0, 2, 4, 5]
    assert run(tmp_path, name="log", schedule="log", every_n_steps=4, steps=9).steps() == [0, 1, 2, 4, 8, 9]
    # schedule="steps" (its `steps` field is run()'s loop length too): case_steps


def case_every_n_steps(tmp_path: Path) -> None:
    assert run(tmp_path, every_n_steps=3, steps=7).steps() == [0, 3, 6, 7]


def case_steps(tmp_path: Path) -> None:
    # `steps` is both this field and run()'s loop length: the field goes through a config
    cfg = MonitorConfig(**{**FAST, "schedule": "steps", "steps": (2, 3)})
    model = tiny()
    with topomon.watch(model, tok(), output_dir=tmp_path / "out", config=cfg) as mon:
        for step in range(1, 6):
            mon.step(step)
    assert mon.captures == [0, 2, 3, 5]
    fails_before_step_1(tmp_path, "`steps`", schedule="steps")


def _family_off(tmp_path: Path, field: str, keys: set[str], layer: str) -> None:
    on = run(tmp_path, name="on", **{field: True})
    off = run(tmp_path, name="off", alerts=None, **{field: False})
    assert keys <= on.keys(layer) and not keys & off.keys(layer)


def case_spectral(tmp_path: Path) -> None:
    _family_off(tmp_path, "spectral", {"rankme", "alpha_req", "participation_ratio"}, "layer_0")


def case_topology(tmp_path: Path) -> None:
    _family_off(tmp_path, "topology", {"h1_total_persistence", "topo_drift"}, "final_norm")


def case_logits(tmp_path: Path) -> None:
    _family_off(tmp_path, "logits", {"logit_nll", "logit_entropy"}, "model")


def case_trajectory(tmp_path: Path) -> None:
    _family_off(tmp_path, "trajectory", {"traj_cosine_mean", "cka_adjacent_mean"}, "model")


def case_lora_metrics(tmp_path: Path) -> None:
    on = run(tmp_path, name="on", model=lora_model(), lora_metrics=True)
    off = run(tmp_path, name="off", model=lora_model(), lora_metrics=False)
    assert on.first("model", "lora_modules") == 4  # q and v of two blocks
    assert not any(k.startswith("lora_") for k in off.keys("model"))


def case_topology_layers(tmp_path: Path) -> None:
    first = run(tmp_path, name="first", topology_layers=[0])
    assert "h1_total_persistence" in first.keys("layer_0")
    assert "h1_total_persistence" not in first.keys("final_norm")
    every = run(tmp_path, name="all", topology_layers="all")
    assert all("h1_total_persistence" in every.keys(ly) for ly in ("layer_0", "layer_1", "final_norm"))
    fails_before_step_1(tmp_path, "topology_layers", layers=[0], topology_layers=[1])
    # an index past the model's blocks is an error, not the block it wraps around to
    fails_before_step_1(tmp_path, "out of range for a model with", topology_layers=[99])


def _dgm_h0(r: Result, layer: str = "final_norm") -> np.ndarray:
    with np.load(r.run_dir / "diagrams" / f"{r.stage}__0__{layer}.npz") as z:
        return np.asarray(z["h0"])


def case_topology_points(tmp_path: Path) -> None:
    for n in (12, 40):  # the diagrams are saved at figure captures
        assert len(_dgm_h0(run(tmp_path, name=f"n{n}", topology_points=n, figures_every=1, steps=1))) == n


def case_pca_dim(tmp_path: Path) -> None:
    full = run(tmp_path, name="full", pca_dim=None).first("final_norm", "h0_total_persistence")
    flat = run(tmp_path, name="flat", pca_dim=2).first("final_norm", "h0_total_persistence")
    assert flat < full  # a projection shortens every distance, so every H0 death


def _engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    from topomon.metrics import topology

    calls: list[tuple[str, int]] = []
    real = topology._run_engine

    def spy(dist: np.ndarray, maxdim: int, engine: str, n_threads: int) -> Any:
        calls.append((engine, len(dist)))
        return real(dist, maxdim, engine, n_threads)

    monkeypatch.setattr(topology, "_run_engine", spy)  # the sync worker computes in this process
    return calls


def case_n_landmarks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _engine_calls(monkeypatch)
    run(tmp_path, n_landmarks=9)
    assert calls and {n for _, n in calls} == {9}


def case_topology_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gph")
    calls = _engine_calls(monkeypatch)
    run(tmp_path, name="g", topology_engine="giotto")
    assert calls and {e for e, _ in calls} == {"giotto"}
    calls.clear()
    run(tmp_path, name="r", topology_engine="ripser")
    assert calls and {e for e, _ in calls} == {"ripser"}


def case_alpha_window(tmp_path: Path) -> None:
    a = run(tmp_path, name="a", alpha_window=(1, 4)).first("layer_0", "alpha_req")
    b = run(tmp_path, name="b", alpha_window=(4, 14)).first("layer_0", "alpha_req")
    assert a != b


def case_figures_every(tmp_path: Path) -> None:
    r = run(tmp_path, name="on", tensorboard=True, figures_every=2)
    assert [e.step for e in r.scalars().Images("topomon_figures/eigenspectra")] == [0, 3]
    off = run(tmp_path, name="off", tensorboard=True, figures_every=0)
    assert not off.scalars().Tags()["images"]


def case_worker(tmp_path: Path) -> None:
    for kind, main in (("sync", 1.0), ("thread", 0.0)):
        r = run(tmp_path, name=kind, worker=kind, layers=[0], custom_metrics={"env": ENV})
        assert r.first("layer_0", "env_pid") == os.getpid()
        assert r.first("layer_0", "env_main_thread") == main


def case_queue_size(tmp_path: Path) -> None:
    kw = dict(worker="thread", layers=[0], final_norm=False, alerts=None, schedule="every", every_n_steps=1)
    slow = {"slow": "tests.noop_metrics:sleepy"}
    small = run(tmp_path, name="small", queue_size=1, custom_metrics=slow, **kw)
    assert small.health["dropped"] >= 1
    big = run(tmp_path, name="big", queue_size=8, custom_metrics=slow, **kw)
    assert big.health["dropped"] == 0 and big.steps() == [0, 1, 2, 3]


def case_max_snapshot_mb(tmp_path: Path) -> None:
    kw = dict(pooling="all", max_points=64, layers=[0])
    full = run(tmp_path, name="full", **kw)
    cut = run(tmp_path, name="cut", max_snapshot_mb=0.005, **kw)  # 5 KiB: 64 x 16 float32 x 2 layers > it
    assert full.first("layer_0", "n_points") == 64 > cut.first("layer_0", "n_points")


def case_worker_threads(tmp_path: Path) -> None:
    r = run(tmp_path, worker="process", worker_threads=2, layers=[0], custom_metrics={"env": ENV})
    assert r.first("layer_0", "env_pid") != os.getpid()
    assert r.first("layer_0", "env_omp") == 2


def case_worker_priority(tmp_path: Path) -> None:
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    kw = dict(worker="process", layers=[0], custom_metrics={"env": ENV})
    low = run(tmp_path, name="low", worker_priority="low", **kw)
    assert low.first("layer_0", "env_nice") == min(19, mine + 10)
    normal = run(tmp_path, name="normal", worker_priority="normal", **kw)
    assert normal.first("layer_0", "env_nice") == mine


def case_task_timeout(tmp_path: Path) -> None:
    cfg = dict(
        FAST,
        worker="process",
        layers=[0],
        final_norm=False,
        alerts=None,
        custom_metrics={"stuck": "tests.noop_metrics:stuck"},
        task_timeout=0.5,
        flush_timeout=30.0,
    )
    with topomon.watch(tiny(), tok(), output_dir=tmp_path / "out", **cfg) as mon:
        pass  # the baseline only: it takes 8 s, the worker is killed after 0.5 (at the collector's next poll)
    h = mon.session.health()
    assert h["lost"] == 1 and h["completed"] == 0


def case_flush_timeout(tmp_path: Path) -> None:
    kw = dict(worker="thread", layers=[0], final_norm=False, alerts=None, steps=1)
    slow = {"slow": "tests.noop_metrics:sleepy"}
    short = run(tmp_path, name="short", flush_timeout=0.0, custom_metrics=slow, **kw)
    assert short.health["flushed"] == 0.0
    long = run(tmp_path, name="long", flush_timeout=30.0, custom_metrics=slow, **kw)
    assert long.health["flushed"] == 1.0 and long.steps() == [0, 1]


def case_overhead_budget(tmp_path: Path) -> None:
    kw = dict(schedule="every", every_n_steps=1, steps=6)
    tight = run(tmp_path, name="tight", overhead_budget=1e-6, **kw)
    assert tight.health["captures_deferred"] > 0 and len(tight.steps()) < 7
    exact = run(tmp_path, name="exact", overhead_budget=None, **kw)
    assert exact.health["captures_deferred"] == 0 and exact.steps() == list(range(7))


def case_seed(tmp_path: Path) -> None:
    kw = dict(pooling="all", max_points=12)
    a = run(tmp_path, name="a", seed=0, **kw).first("layer_0", "rankme")
    b = run(tmp_path, name="b", seed=1, **kw).first("layer_0", "rankme")
    assert a != b  # another subsample of the same points


def case_custom_metrics(tmp_path: Path) -> None:
    r = run(tmp_path, custom_metrics={"npts": "tests.noop_metrics:count"})
    for layer in ("layer_0", "layer_1", "final_norm"):
        m = r.metrics(layer)[0]["metrics"]
        assert m["npts"] == m["n_points"]
    fails_before_step_1(tmp_path, "custom_metrics", custom_metrics={"x": "no_colon"})


def case_families(tmp_path: Path) -> None:
    r = run(tmp_path, families=["tests.metrics.user_family:ROWS"])
    assert r.first("layer_0", "user_rows") == r.first("layer_0", "n_points")
    with pytest.raises((ConfigError, ImportError)):
        run(tmp_path, name="missing", families=["tests.no_such_module:X"])


def nan_model() -> Any:
    model = tiny()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    return model


def case_alerts(tmp_path: Path) -> None:
    assert [a["rule"] for a in run(tmp_path, name="rule", alerts=ALWAYS).alerts()][:1] == ["always"]
    default = run(tmp_path, name="default", model=nan_model(), alerts="default", steps=1)
    assert any("nonfinite" in a["reason"] or "finite" in a["message"] for a in default.alerts())
    assert run(tmp_path, name="none", model=nan_model(), alerts=None, steps=1).alerts() == []


class _Hook:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.bodies.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()


def case_webhook_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    hook = _Hook()
    try:
        run(tmp_path, alerts=ALWAYS, webhook_url=f"http://127.0.0.1:{hook.httpd.server_address[1]}/x")
    finally:
        hook.httpd.shutdown()
        hook.httpd.server_close()
    assert any("always" in json.dumps(b) for b in hook.bodies)
    fails_before_step_1(tmp_path, "webhook_url", webhook_url="ftp://host/x")


def case_trackers(tmp_path: Path) -> None:
    # a named tracker with no run to write into is an error before step 1, never a quiet nothing
    fails_before_step_1(tmp_path, "no mlflow run is active", trackers=["mlflow"])
    fails_before_step_1(tmp_path, "unknown tracker", trackers=["comet"])
    assert run(tmp_path, trackers=[]).metrics()


def case_actions(tmp_path: Path) -> None:
    save = run(tmp_path, name="save", alerts=ALWAYS, actions=[{"kind": "checkpoint"}])
    assert save.signals[0].should_save and [a["action"] for a in save.actions()] == ["checkpoint"]
    stop = run(tmp_path, name="stop", alerts=ALWAYS, actions=[{"kind": "stop"}], steps=5)
    assert stop.steps_done == 1 and stop.signals[-1].should_training_stop
    fails_before_step_1(tmp_path, "actions", actions=[{"kind": "no_such_kind"}])


def case_diversity(tmp_path: Path) -> None:
    act = [{"kind": "diversity", "value": 0.1, "revert_on_recovery": False}]
    pen = {}
    for kind in ("entropy", "logdet"):
        r = run(tmp_path, name=kind, tensorboard=True, alerts=ALWAYS, actions=act, diversity={"kind": kind})
        pen[kind] = [e.value for e in r.scalars().Scalars("topomon/interventions/diversity_penalty")]
        assert pen[kind] and all(math.isfinite(v) for v in pen[kind])
    assert pen["entropy"] != pen["logdet"]
    fails_before_step_1(tmp_path, "diversity", diversity={"kinds": "entropy"})


def case_family_options(tmp_path: Path) -> None:
    fam = ["tests.metrics.user_family:ROWS"]
    r = run(tmp_path, families=fam, family_options={"user_rows": {"rows_scale": 2.5}})
    assert r.first("layer_0", "user_scaled_rows") == 2.5 * r.first("layer_0", "user_rows")
    fails_before_step_1(
        tmp_path, "rows_scales", families=fam, family_options={"user_rows": {"rows_scales": 2}}
    )


def case_intervention_options(tmp_path: Path) -> None:
    act = [{"kind": "diversity", "value": 0.1, "revert_on_recovery": False}]
    pen = {}
    for kind in ("entropy", "logdet"):
        r = run(
            tmp_path,
            name=kind,
            tensorboard=True,
            alerts=ALWAYS,
            actions=act,
            intervention_options={"diversity": {"kind": kind}},
        )
        pen[kind] = [e.value for e in r.scalars().Scalars("topomon/interventions/diversity_penalty")]
        assert pen[kind] and all(math.isfinite(v) for v in pen[kind])
    assert pen["entropy"] != pen["logdet"]
    fails_before_step_1(tmp_path, "kinds", actions=act, intervention_options={"diversity": {"kinds": "x"}})


CASES: dict[str, Callable[..., None]] = {
    "stage": case_stage,
    "run_dir": case_run_dir,
    "step_offset": case_step_offset,
    "logging_dir": case_logging_dir,
    "tensorboard": case_tensorboard,
    "mode": case_mode,
    "probes": case_probes,
    "probe_field": case_probe_field,
    "max_probes": case_max_probes,
    "max_length": case_max_length,
    "probe_batch_size": case_probe_batch_size,
    "layers": case_layers,
    "final_norm": case_final_norm,
    "pooling": case_pooling,
    "max_points": case_max_points,
    "exclude_first": case_exclude_first,
    "outlier_factor": case_outlier_factor,
    "normalize": case_normalize,
    "massive_treatment": case_massive_treatment,
    "schedule": case_schedule,
    "every_n_steps": case_every_n_steps,
    "steps": case_steps,
    "spectral": case_spectral,
    "topology": case_topology,
    "logits": case_logits,
    "trajectory": case_trajectory,
    "lora_metrics": case_lora_metrics,
    "topology_layers": case_topology_layers,
    "topology_points": case_topology_points,
    "pca_dim": case_pca_dim,
    "n_landmarks": case_n_landmarks,
    "topology_engine": case_topology_engine,
    "alpha_window": case_alpha_window,
    "figures_every": case_figures_every,
    "worker": case_worker,
    "queue_size": case_queue_size,
    "max_snapshot_mb": case_max_snapshot_mb,
    "worker_threads": case_worker_threads,
    "worker_priority": case_worker_priority,
    "task_timeout": case_task_timeout,
    "flush_timeout": case_flush_timeout,
    "overhead_budget": case_overhead_budget,
    "seed": case_seed,
    "custom_metrics": case_custom_metrics,
    "families": case_families,
    "family_options": case_family_options,
    "intervention_options": case_intervention_options,
    "alerts": case_alerts,
    "webhook_url": case_webhook_url,
    "trackers": case_trackers,
    "actions": case_actions,
    "diversity": case_diversity,
}
SLOW = {"worker_threads", "worker_priority", "task_timeout"}  # each starts a worker process


def test_every_field_has_a_case() -> None:
    fields = {f.name for f in dataclasses.fields(MonitorConfig)}
    missing, stale = sorted(fields - set(CASES)), sorted(set(CASES) - fields)
    assert not missing, f"MonitorConfig fields without a no-silent-no-op case: {missing}"
    assert not stale, f"cases for fields MonitorConfig no longer has: {stale}"


@pytest.mark.parametrize(
    "field", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in CASES]
)
def test_the_field_acts_or_fails_before_step_1(
    field: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[field]
    if "monkeypatch" in case.__code__.co_varnames[: case.__code__.co_argcount]:
        case(tmp_path, monkeypatch)
    else:
        case(tmp_path)


# ------------------------------------------------------------------------------------ the combinations
FEATURES: dict[str, tuple[dict[str, Any], tuple[str, str]]] = {
    # feature -> (config, the (layer, metric) it must produce)
    "logits": ({"logits": True}, ("model", "logit_nll")),
    "lora": ({"lora_metrics": True}, ("model", "lora_norm_total")),
    "topology_layers": ({"topology_layers": [0]}, ("layer_0", "h1_total_persistence")),
    "custom_metrics": ({"custom_metrics": {"npts": "tests.noop_metrics:count"}}, ("layer_0", "npts")),
    "families": ({"families": ["tests.metrics.user_family:ROWS"]}, ("layer_0", "user_rows")),
}


def _produced(r: Result, layer: str, metric: str) -> bool:
    return any(metric in x["metrics"] and x["metrics"][metric] is not None for x in r.metrics(layer))


@pytest.mark.parametrize("worker", ["sync", "thread"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("mode", ["probe", "passive"])
def test_each_feature_acts_in_each_mode_and_worker(
    mode: str, feature: str, worker: str, tmp_path: Path
) -> None:
    config, (layer, metric) = FEATURES[feature]
    model = lora_model() if feature == "lora" else tiny()
    r = run(tmp_path, model=model, mode=mode, worker=worker, **config)
    assert r.metrics(), f"{mode} / {worker}: no records"
    assert _produced(r, layer, metric), f"{feature} in {mode} mode, {worker} worker: no {metric} on {layer}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["probe", "passive"])
def test_every_feature_at_once_in_a_worker_process(mode: str, tmp_path: Path) -> None:
    config: dict[str, Any] = {}
    for cfg, _ in FEATURES.values():
        config.update(cfg)
    r = run(tmp_path, model=lora_model(), mode=mode, worker="process", **config)
    missing = [f for f, (_, (ly, m)) in FEATURES.items() if not _produced(r, ly, m)]
    assert not missing, f"{mode} mode, process worker: no records of {missing}"


def _always(metric: str, layer: str, name: str) -> dict[str, Any]:
    """A rule that holds for any finite value."""
    return {"type": "threshold", "metric": metric, "layer": layer, "above": -1e12, "name": name}


def _builtin_families() -> list[Any]:
    from topomon.metrics.builtin_families import BUILTIN

    return list(BUILTIN)


# how each built-in family is switched off (a family added without an entry fails the test below)
OFF: dict[str, dict[str, Any]] = {
    "spectral": {"spectral": False},
    "topology": {"topology": False},
    "logits": {"logits": False},
    "trajectory": {"trajectory": False},
    "lora": {"lora_metrics": False},
    "massive": {"spectral": False, "topology": False},
}


def _family_rule(fam: Any) -> tuple[dict[str, Any], Any]:
    """A rule on the family's first metric where the family writes it, and the model it needs."""
    layer = "model" if fam.scope == "model" else "final_norm"
    model = lora_model() if "lora_factors" in fam.needs else tiny()
    return _always(fam.keys[0], layer, f"on_{fam.name}"), model


@pytest.mark.parametrize("fam", _builtin_families(), ids=lambda f: f.name)
def test_a_rule_on_every_metric_family_fires(fam: Any, tmp_path: Path) -> None:
    rule, model = _family_rule(fam)
    r = run(tmp_path, model=model, alerts=[rule])
    assert f"on_{fam.name}" in {a["rule"] for a in r.alerts()}, f"a rule on {fam.name} never fired"


@pytest.mark.parametrize("fam", _builtin_families(), ids=lambda f: f.name)
def test_a_rule_on_a_family_switched_off_fails_before_step_1(fam: Any, tmp_path: Path) -> None:
    assert fam.name in OFF, f"family {fam.name!r}: say in OFF how it is switched off"
    rule, _ = _family_rule(fam)
    fails_before_step_1(tmp_path, fam.keys[0], alerts=[rule], **OFF[fam.name])


def test_a_rule_on_a_custom_metric_and_on_a_user_family_fires(tmp_path: Path) -> None:
    rules = [_always("npts", "layer_0", "custom"), _always("user_rows", "layer_0", "user")]
    r = run(tmp_path, alerts=rules, **FEATURES["custom_metrics"][0], **FEATURES["families"][0])
    assert {"custom", "user"} <= {a["rule"] for a in r.alerts()}


def test_a_rule_on_a_captured_layer_fires_and_on_one_not_captured_fails_before_step_1(tmp_path: Path) -> None:
    r = run(tmp_path, layers=[0], alerts=[_always("rankme", "layer_0", "captured")])
    assert "captured" in {a["rule"] for a in r.alerts()}
    fails_before_step_1(tmp_path, "layer_1", layers=[0], alerts=[_always("rankme", "layer_1", "not")])


def test_a_named_detector_with_no_part_left_or_an_unknown_name_fails_before_step_1(tmp_path: Path) -> None:
    # "probe NLL" is one rule on logit_nll: with the logits family off nothing of it could fire
    fails_before_step_1(tmp_path, "set logits=True", alerts="probe NLL", logits=False)
    fails_before_step_1(tmp_path, "a detector of topomon.alerts.DETECTORS", alerts="v3")


def test_an_action_on_a_rule_that_does_not_exist_or_without_alerts_fails_before_step_1(
    tmp_path: Path,
) -> None:
    always = _always("rankme", "final_norm", "always")
    # a typo in an action's rule name: it would never act
    fails_before_step_1(
        tmp_path,
        "did you mean \\['always'\\]",
        alerts=[always],
        actions=[{"kind": "stop", "rules": ["alwyas"]}],
    )
    # a part of a composite never fires alone: only the composite's name triggers actions
    fails_before_step_1(tmp_path, "no rule has", alerts="v2", actions=[{"kind": "stop", "rules": ["rankme"]}])
    fails_before_step_1(tmp_path, "`alerts` is None", alerts=None, actions=[{"kind": "checkpoint"}])


def test_the_default_rules_and_one_more_in_one_list_both_fire(tmp_path: Path) -> None:
    # "default" in a list of rules: the default rules beside the user's, without copying them
    alerts = ["default", _always("rankme", "final_norm", "mine")]
    assert "mine" in {a["rule"] for a in run(tmp_path, name="ok", alerts=alerts, steps=1).alerts()}
    bad = run(tmp_path, name="nan", model=nan_model(), alerts=alerts, steps=1)
    assert "nonfinite@*" in {a["rule"] for a in bad.alerts()}  # a default rule, acting
    fails_before_step_1(tmp_path, "must be one of", alerts=["default", "v3"])


def test_a_topology_rule_on_a_layer_without_topology_fails_before_step_1(tmp_path: Path) -> None:
    # layer_0 is captured, but persistent homology runs on the last captured layer only (the default)
    fails_before_step_1(tmp_path, "layer_0", alerts=[_always("h1_total_persistence", "layer_0", "t")])


PROBE_OPTIONS = {
    "pooling": "last",
    "max_probes": 5,
    "max_length": 8,
    "probe_batch_size": 3,
    "probe_field": "body",
}


@pytest.mark.parametrize("field", list(PROBE_OPTIONS))
def test_a_probe_set_option_in_passive_mode_fails_before_step_1(field: str, tmp_path: Path) -> None:
    fails_before_step_1(tmp_path, field, mode="passive", **{field: PROBE_OPTIONS[field]})


@pytest.mark.slow
def test_a_named_tracker_gets_the_curves_of_a_plain_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the `trackers` case's other half: with a run to write into, the named tracker gets every curve
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # mlflow's ./mlruns artifacts
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # no global set_tracking_uri left for later tests
    with mlflow.start_run() as active:
        r = run(tmp_path, trackers=["mlflow"], alerts=ALWAYS)
    history = mlflow.MlflowClient(tracking_uri=uri).get_metric_history(
        active.info.run_id, "topomon/rankme/final_norm"
    )
    want = {x["step"]: x["metrics"]["rankme"] for x in r.metrics("final_norm")}
    assert {m.step: m.value for m in history} == pytest.approx(want)
