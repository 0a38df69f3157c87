"""Long-run memory benchmark of the monitor: RSS of the training process and of the metric worker.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py              # both runs, 300 captures each, plot +
                                                                     # RESULTS.md section (~12 min, 2 CPUs)
    OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py --captures 40 --no-results   # smoke run
    ... --runs normal --captures 1000 --json long.json               # a longer run, samples kept
    ... --runs normal --tracemalloc 50 --no-results                  # top growing Python lines
    ... --from-json long.json                                        # re-draw plot and section

A real ``transformers.Trainer`` trains a tiny Llama built in memory (``topomon.testing``) with
``TopoMonitor(schedule="every", every_n_steps=1, worker="process")`` and every metric family on
(spectral, topology, logits, trajectory; figures every ``figures_every`` captures, TensorBoard and
the default alerts on), so every training step is a capture. A small ``TrainerCallback`` added after
the monitor samples, at every capture, the RSS of the training process and of the worker process
(``monitor.session._executor.pid``; a restarted worker is followed), the executor's counters, and the
lengths of the Python containers that grow by design (one entry per capture: ``monitor.captures``,
``capture_seconds``, ``_done_steps``, the router's ``figure_steps``; fixed-size ones: the router's
reference values, the shadow engine's diagrams).

Two runs, each in a fresh Python process:

- ``normal``: the worker as configured; training sleeps ``--pace`` seconds after each step (a slower
  step, as with a bigger model; the CPU is left to the worker), so the worker mostly keeps up;
- ``slow``: a custom metric (:func:`slow_metric`) sleeps ``--sleep`` seconds in the worker on every
  layer, so the worker is much slower than training (``--slow-pace``): the bounded queue
  (``queue_size``) fills and most snapshots are dropped. Memory must stay bounded all the same.

Reported per run and process: RSS at captures 10, 50, 100, 200, 300 (or the last), the slope of a
least-squares line over the second half of the captures (MiB per 100 captures, with its standard
error), the high-water growth (max RSS over the last quarter minus max over the second quarter),
worker restarts, dropped snapshots; an automatic verdict per process (:func:`classify`).
``--tracemalloc CAPTURE`` also traces the training process's Python allocations from that capture
to the last one (``gc.collect()`` before both snapshots) and prints the top growing lines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["slow_metric", "run_once", "summarize", "report", "main"]

HEADING = "## Memory (bench/memory.py)"
SLEEP_ENV = "TOPOMON_BENCH_SLEEP"
MIB = 2.0**20
CHECKPOINTS = (10, 50, 100, 200, 300)


def slow_metric(points: Any) -> float:
    """A custom metric for the slow-worker run: sleeps ``$TOPOMON_BENCH_SLEEP`` seconds.

    It runs in the worker process (imported there as ``bench.memory:slow_metric``; nothing heavy is
    imported by this module at import time).

    Args:
        points: the ``(n, d)`` points of one layer.

    Returns:
        ``n``, the number of points (as a float).
    """
    time.sleep(float(os.environ.get(SLEEP_ENV, "0") or 0))
    return float(len(points))


# --------------------------------------------------------------------------- one run (child process)
def _dataset(tokenizer: Any, n_texts: int, max_length: int) -> list[dict[str, Any]]:
    from topomon.testing import sample_texts

    enc = tokenizer(
        sample_texts(n_texts, seed=1),
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
        for i in range(len(labels))
    ]


def _sampler(
    monitor: Any, samples: list[dict[str, Any]], trace_from: int | None, last: int, pace: float = 0.0
) -> Any:
    """A ``TrainerCallback`` that records memory and container sizes whenever a capture was added.

    With ``trace_from``, tracemalloc snapshots (after a full ``gc.collect()``) are taken at that
    capture and at capture ``last``, while the monitor is still running.
    """
    import gc
    import tracemalloc

    import psutil
    from transformers import TrainerCallback

    me = psutil.Process()
    procs: dict[int, Any] = {}

    def worker_rss() -> tuple[int | None, float]:
        ex = monitor.session._executor
        pid = getattr(ex, "pid", None)
        if pid is None:
            return None, float("nan")
        try:
            proc = procs.setdefault(pid, psutil.Process(pid))
            return pid, proc.memory_info().rss / MIB
        except psutil.Error:
            return pid, float("nan")

    class MemorySampler(TrainerCallback):
        def __init__(self) -> None:
            self.seen = 0
            self.t0 = time.perf_counter()
            self.trace_start: Any = None
            self.trace_end: Any = None

        def sample(self) -> None:
            n = len(monitor.captures)
            if n == self.seen:
                return
            self.seen = n
            ex, router = monitor.session._executor, monitor.session._router
            pid, w_rss = worker_rss()
            row: dict[str, Any] = {
                "capture": n,
                "step": monitor.captures[-1],
                "t": round(time.perf_counter() - self.t0, 3),
                "rss_train_mib": me.memory_info().rss / MIB,
                "rss_worker_mib": w_rss,
                "worker_pid": pid,
                **ex.stats.as_dict(),
                "pending": ex.pending,
                "len_captures": len(monitor.captures),
                "len_capture_seconds": len(monitor.capture_seconds),
                "len_done_steps": len(monitor.session._done_steps),
                "len_alerts": len(monitor.alerts),
                "len_figure_steps": len(router._figure_steps),
                "len_base_values": len(router.base_values),
                "len_stage_values": len(router.stage_values),
                "len_pending_alerts": len(router._pending_alerts),
                # present in newer versions of the monitor (per-capture bookkeeping)
                "len_capture_stalls": len(getattr(monitor, "capture_stalls", ())),
                "len_router_latencies": len(router._latencies),
                "len_router_submit_times": len(router.in_flight()),
                "len_shadow_prev": len(ex.shadow._prev),
                "len_shadow_first": len(ex.shadow._first),
                "alert_state_chars": (
                    len(json.dumps(router.alert_engine.state_dict(), default=str))
                    if router.alert_engine is not None
                    else 0
                ),
                # not len(gc.get_objects()): from this thread it can expose a tuple that the collector
                # thread is building and make it fail with SystemError (CPython gh-107137)
                "gc_gen2_collections": gc.get_stats()[2]["collections"],
            }
            if trace_from is not None and n == trace_from and self.trace_start is None:
                tracemalloc.start(5)
                gc.collect()
                self.trace_start = tracemalloc.take_snapshot()
            if tracemalloc.is_tracing():
                row["traced_mib"] = tracemalloc.get_traced_memory()[0] / MIB
                if n >= last and self.trace_end is None:
                    gc.collect()
                    self.trace_end = tracemalloc.take_snapshot()
                    tracemalloc.stop()
            samples.append(row)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.sample()  # the baseline capture (step 0), taken by the monitor's on_train_begin

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.sample()
            if pace > 0:
                time.sleep(pace)  # a slower training step (a bigger model): the CPU is the worker's

    return MemorySampler()


def run_once(
    kind: str,
    *,
    captures: int,
    workdir: str,
    sleep: float,
    hidden: int = 128,
    layers: int = 4,
    batch_size: int = 8,
    tracemalloc_from: int | None = None,
    pace: float = 0.0,
) -> dict[str, Any]:
    """Train with the monitor for ``captures`` captures; return the samples and final counters.

    Args:
        kind: ``"normal"`` or ``"slow"`` (adds :func:`slow_metric` sleeping ``sleep`` s per layer).
        captures: captures to take (the step-0 baseline plus one per training step).
        workdir: output folder of the trainer and of the monitor's run directory.
        sleep: seconds :func:`slow_metric` sleeps per layer (slow run only).
        hidden: hidden size of the tiny model.
        layers: decoder blocks of the tiny model.
        batch_size: training batch size.
        tracemalloc_from: capture at which Python allocation tracing of the training process starts.
        pace: seconds the training loop sleeps after each step (a slower step, CPU left to the worker).

    Returns:
        ``{"samples": [...], "health": {...}, "config": {...}, "tracemalloc_top": [...]}``.
    """
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from topomon import TopoMonitor
    from topomon.testing import tiny_causal_lm, tiny_tokenizer

    if kind not in ("normal", "slow"):
        raise ValueError(f"kind must be 'normal' or 'slow', got {kind!r}")
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", hidden_size=hidden, num_layers=layers, vocab_size=len(tok))
    data = _dataset(tok, 256, 64)
    custom = {}
    if kind == "slow":
        os.environ[SLEEP_ENV] = str(sleep)  # inherited by the spawned worker
        custom = {"slow": "bench.memory:slow_metric"}
    import dataclasses

    from topomon.config import MonitorConfig

    extra: dict[str, Any] = {}
    if "overhead_budget" in {f.name for f in dataclasses.fields(MonitorConfig)}:
        extra["overhead_budget"] = None  # capture at every step, however long the captures take
    monitor = TopoMonitor(
        stage="sft",
        run_dir=os.path.join(workdir, "topomon"),
        schedule="every",
        every_n_steps=1,
        worker="process",
        spectral=True,
        topology=True,
        logits=True,
        trajectory=True,
        custom_metrics=custom,
        **extra,
    )
    samples: list[dict[str, Any]] = []
    sampler = _sampler(monitor, samples, tracemalloc_from, captures, pace)
    args = TrainingArguments(
        output_dir=os.path.join(workdir, "trainer"),
        max_steps=captures - 1,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-3,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=default_data_collator,
        processing_class=tok,
        callbacks=[monitor, sampler],
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    top: list[str] = []
    if sampler.trace_start is not None and sampler.trace_end is not None:
        stats = sampler.trace_end.compare_to(sampler.trace_start, "lineno")
        top = [str(s) for s in stats[:25]]
        by_file = sampler.trace_end.compare_to(sampler.trace_start, "filename")
        top += ["[by file] " + str(s) for s in by_file[:10]]
    health = monitor.health()
    cfg = monitor.config
    return {
        "kind": kind,
        "samples": samples,
        "health": health,
        "seconds": seconds,
        "config": {
            "captures": captures,
            "hidden": hidden,
            "layers": layers,
            "batch_size": batch_size,
            "sleep_per_layer": sleep if kind == "slow" else 0.0,
            "pace": pace,
            "queue_size": cfg.queue_size,
            "max_snapshot_mb": cfg.max_snapshot_mb,
            "max_points": cfg.max_points,
            "figures_every": cfg.figures_every,
        },
        "tracemalloc_top": top,
    }


# --------------------------------------------------------------------------- analysis
def _at(samples: list[dict[str, Any]], n: int, key: str) -> tuple[int, float]:
    """The value of ``key`` at capture ``n`` (or the last capture, when fewer were taken)."""
    row = next((s for s in samples if s["capture"] >= n), samples[-1])
    return int(row["capture"]), float(row[key])


def slope_per_100(samples: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """Least-squares slope of ``key`` against the capture index over the second half, per 100 captures.

    Returns:
        ``(slope, standard error)``; the error assumes independent residuals, which a saw-toothing
        RSS is not, so read it as a lower bound of the real uncertainty. NaNs with fewer than 4 points.
    """
    import numpy as np

    half = samples[len(samples) // 2 :]
    x = np.array([s["capture"] for s in half], dtype=float)
    y = np.array([s[key] for s in half], dtype=float)
    ok = np.isfinite(y)
    if ok.sum() < 4:
        return float("nan"), float("nan")
    coef, cov = np.polyfit(x[ok], y[ok], 1, cov=True)
    return float(coef[0] * 100.0), float(np.sqrt(cov[0, 0]) * 100.0)


def high_water_growth(samples: list[dict[str, Any]], key: str) -> float:
    """Max of ``key`` over the last quarter of the captures minus its max over the second quarter.

    Insensitive to the saw-tooth of a process that frees memory now and then (a leak raises it by
    about half the slope per capture times the run length; a bounded process gives <= 0).
    """
    n = len(samples)
    q2 = [s[key] for s in samples[n // 4 : n // 2]]
    q4 = [s[key] for s in samples[3 * n // 4 :]]
    if not q2 or not q4:
        return float("nan")
    return float(max(q4) - max(q2))


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """RSS at the checkpoint captures, second-half slopes, min/max, counters and container sizes."""
    s = result["samples"]
    out: dict[str, Any] = {
        "kind": result.get("label", result["kind"]),
        "captures": s[-1]["capture"],
        "seconds": result["seconds"],
    }
    for proc in ("train", "worker"):
        key = f"rss_{proc}_mib"
        marks = [n for n in CHECKPOINTS if n < s[-1]["capture"]] + [s[-1]["capture"]]
        out[proc] = {
            "at": [_at(s, n, key) for n in dict.fromkeys(marks)],
            "slope_per_100": slope_per_100(s, key)[0],
            "slope_se": slope_per_100(s, key)[1],
            "max": max(r[key] for r in s),
            "high_water_growth": high_water_growth(s, key),
            "second_half_range": (
                min(r[key] for r in s[len(s) // 2 :]),
                max(r[key] for r in s[len(s) // 2 :]),
            ),
        }
    h = result["health"]
    out["stats"] = {k: int(h.get(k, 0)) for k in ("submitted", "dropped", "completed", "lost", "restarts")}
    out["stats"]["failed"] = int(h.get("failed", 0))
    out["stats"]["handler_errors"] = int(h.get("handler_errors", 0))
    out["worker_pids"] = sorted({r["worker_pid"] for r in s if r["worker_pid"] is not None})
    first, last = s[0], s[-1]
    out["containers"] = {
        k: (first[k], last[k])
        for k in first
        if k.startswith(("len_", "alert_state", "gc_gen2", "traced_mib")) and k in last
    }
    out["max_pending"] = max(r["pending"] for r in s)
    return out


# --------------------------------------------------------------------------- report
def plot(results: list[dict[str, Any]], path: Path, warmup: int = 30) -> None:
    """RSS against capture index: one column per process, one line per run.

    The top row shows the whole run; the bottom row zooms on the captures after ``warmup``, where a
    leak would show as a rising trend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    colors = ("tab:blue", "tab:red", "tab:green", "tab:purple")
    for col, (proc, title) in enumerate((("train", "training process"), ("worker", "worker process"))):
        for row in (0, 1):
            ax = axes[row, col]
            for res, color in zip(results, colors, strict=False):
                s = res["samples"] if row == 0 else [r for r in res["samples"] if r["capture"] >= warmup]
                x = [r["capture"] for r in s]
                y = [r[f"rss_{proc}_mib"] for r in s]
                label = res.get("label", res["kind"])
                if res["kind"] == "slow":
                    label += f" ({res['health'].get('dropped', 0):.0f} dropped)"
                ax.plot(x, y, color=color, lw=0.9, alpha=0.85, label=label)
                pairs = zip(s, s[1:], strict=False)
                for c in [r["capture"] for a, r in pairs if r["worker_pid"] != a["worker_pid"]]:
                    ax.axvline(c, color=color, ls=":", lw=0.8)  # a worker restart
            ax.set_title(f"RSS of the {title}" + ("" if row == 0 else f", captures >= {warmup} (zoom)"))
            ax.set_ylabel("RSS (MiB)")
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("capture")
            ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("topomon long run: every training step is a capture (worker='process')", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_at(at: list[tuple[int, float]]) -> str:
    return ", ".join(f"{n}: {v:.1f}" for n, v in at)


def section(results: list[dict[str, Any]], summaries: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The Markdown section for RESULTS.md (heading included)."""
    c = results[0]["config"]
    lines = [
        HEADING,
        "",
        f"- Date: {meta['date']}; command: `{meta['command']}`; wall time {meta['wall']:.0f} s.",
        f"- Machine: {meta['machine']}.",
        f"- Load average (1/5/15 min) at start: {meta['load_start']}; at end: {meta['load_end']}. "
        "Other engineers' jobs shared the CPU.",
        f"- Setup: `transformers.Trainer`, tiny Llama (hidden {c['hidden']}, {c['layers']} blocks) built in "
        f"memory, batch {c['batch_size']} x 64 tokens; `TopoMonitor(schedule='every', every_n_steps=1, "
        "worker='process')`, every metric family on, TensorBoard + default alerts, "
        f"`figures_every={c['figures_every']}`, `queue_size={c['queue_size']}`, "
        f"`max_points={c['max_points']}`. "
        "RSS sampled by a `TrainerCallback` after the monitor's at every capture; the worker is "
        "`monitor.session._executor.pid`. Slope = least-squares line over the second half of the captures; "
        "high-water growth = max over the last quarter minus max over the second quarter.",
        "- Runs (each in a fresh process): "
        + "; ".join(
            f"`{r.get('label', r['kind'])}`: training sleeps {r['config']['pace']} s after each step"
            + (
                f", `custom_metrics` sleeps {r['config']['sleep_per_layer']} s per layer in the worker"
                if r["kind"] == "slow"
                else ""
            )
            for r in results
        )
        + ".",
        "",
        "| run | process | RSS (MiB) at capture | slope, 2nd half +- 2 SE (MiB / 100 captures) "
        "| 2nd-half min-max (MiB) | high-water growth, Q4 max - Q2 max (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        for proc in ("train", "worker"):
            p = s[proc]
            lo, hi = p["second_half_range"]
            slope = p["slope_per_100"]
            hw = p["high_water_growth"]
            lines.append(
                f"| {s['kind']} | {proc} | {_fmt_at(p['at'])} | {slope:+.2f} +- {2 * p['slope_se']:.2f} "
                f"| {lo:.1f}-{hi:.1f} "
                f"| {hw:+.1f} |"
            )
    lines += [
        "",
        "| run | captures | wall (s) | submitted | completed | dropped | lost | failed | handler errors "
        "| restarts | max pending |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        st = s["stats"]
        lines.append(
            f"| {s['kind']} | {s['captures']} | {s['seconds']:.0f} | {st['submitted']} | {st['completed']} | "
            f"{st['dropped']} | {st['lost']} | {st['failed']} | {st['handler_errors']} | {st['restarts']} "
            f"| {s['max_pending']} |"
        )
    lines += ["", "Python containers in the training process (first capture -> last):", ""]
    for s in summaries:
        parts = [f"`{k}` {a} -> {b}" for k, (a, b) in s["containers"].items()]
        lines.append(f"- {s['kind']}: " + "; ".join(parts) + ".")
    lines += ["", "![RSS vs capture](img/memory_long_run.png)", ""]
    if meta.get("verdict"):
        lines += [meta["verdict"], ""]
    if meta.get("notes"):  # written by hand into the --json file's "meta", kept by --from-json
        lines += [meta["notes"].rstrip(), ""]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace (or append at the end) this benchmark's section of RESULTS.md, keeping the others."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(HEADING) + r".*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text.rstrip() + "\n\n", old, count=1).rstrip() + "\n"
    else:
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(new, encoding="utf-8")


def classify(p: dict[str, Any], tolerance: float) -> str:
    """``"growth"``, ``"bounded"`` or ``"unresolved"`` for one process's summary.

    Growth: the second-half slope is above ``tolerance`` (MiB / 100 captures) by more than two
    standard errors and the high-water mark rose by more than ``tolerance`` MiB. Bounded: the slope
    is below ``tolerance`` by more than two standard errors, or the high-water mark did not rise
    (a saw-toothing RSS makes the slope noisy; its maxima are not). Otherwise unresolved at this run
    length.
    """
    slope, se, hw = p["slope_per_100"], p["slope_se"], p["high_water_growth"]
    if slope - 2 * se > tolerance and hw > tolerance:
        return "growth"
    if slope + 2 * se <= tolerance or hw <= 0.0:
        return "bounded"
    return "unresolved"


def verdict(summaries: list[dict[str, Any]], tolerance: float) -> str:
    """One line: each process classified by :func:`classify`."""
    parts = [
        f"{s['kind']}/{proc}: {classify(s[proc], tolerance)}"
        for s in summaries
        for proc in ("train", "worker")
    ]
    bad = any(p.endswith(("growth", "unresolved")) for p in parts)
    tail = (
        "look for a leak (tracemalloc: `--tracemalloc CAPTURE`), or run longer."
        if bad
        else "no growth beyond the bounded queue in either process."
    )
    return f"**Verdict (automatic, tolerance {tolerance} MiB / 100 captures):** {'; '.join(parts)}: {tail}"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def _machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run both runs (each in a fresh process), print the summaries, plot, update RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captures", type=int, default=300, help="captures per run (default 300)")
    p.add_argument("--runs", default="normal,slow", help="comma-separated: normal, slow")
    p.add_argument("--sleep", type=float, default=0.25, help="seconds slow_metric sleeps per layer")
    p.add_argument(
        "--pace", type=float, default=1.0, help="normal run: seconds training sleeps after each step"
    )
    p.add_argument("--slow-pace", type=float, default=0.5, help="slow run: seconds training sleeps per step")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tracemalloc", type=int, default=None, metavar="CAPTURE", help="trace from this capture")
    p.add_argument("--tolerance", type=float, default=1.0, help="verdict threshold, MiB / 100 captures")
    p.add_argument("--json", type=Path, default=None, help="also save every sample here")
    p.add_argument("--plot", type=Path, default=ROOT / "bench" / "img" / "memory_long_run.png")
    p.add_argument("--no-results", action="store_true", help="do not touch bench/RESULTS.md")
    p.add_argument(
        "--from-json", type=Path, default=None, help="re-draw the plot and the section from a --json file"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.captures < 3:
        p.error(f"--captures must be >= 3, got {a.captures}")

    if a.child is not None:  # one run, in this fresh process
        with tempfile.TemporaryDirectory(prefix="topomon-mem-") as tmp:
            res = run_once(
                a.child,
                captures=a.captures,
                workdir=tmp,
                sleep=a.sleep,
                hidden=a.hidden,
                layers=a.layers,
                batch_size=a.batch_size,
                tracemalloc_from=a.tracemalloc,
                pace=a.pace,
            )
        assert a.child_out is not None
        a.child_out.write_text(json.dumps(res), encoding="utf-8")
        return 0

    if a.from_json is not None:
        saved = json.loads(a.from_json.read_text(encoding="utf-8"))
        report(saved["results"], saved["meta"], a.tolerance, a.plot, results_md=not a.no_results)
        return 0

    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    load_start, t0 = _load(), time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="topomon-mem-out-") as tmp:
        for kind in runs:
            out = Path(tmp) / f"{kind}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-out", str(out)]
            cmd += ["--captures", str(a.captures), "--sleep", str(a.sleep), "--hidden", str(a.hidden)]
            cmd += ["--layers", str(a.layers), "--batch-size", str(a.batch_size)]
            cmd += ["--pace", str(a.pace if kind == "normal" else a.slow_pace)]
            if a.tracemalloc is not None:
                cmd += ["--tracemalloc", str(a.tracemalloc)]
            print(f"[{kind}] {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
            results.append(json.loads(out.read_text(encoding="utf-8")))
    argv_shown = " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py {argv_shown}".rstrip(),
        "wall": time.perf_counter() - t0,
        "machine": _machine(),
        "load_start": load_start,
        "load_end": _load(),
    }
    if a.json is not None:
        a.json.write_text(json.dumps({"results": results, "meta": meta}), encoding="utf-8")
    report(results, meta, a.tolerance, a.plot, results_md=not a.no_results)
    return 0


def report(
    results: list[dict[str, Any]],
    meta: dict[str, Any],
    tolerance: float,
    plot_path: Path,
    *,
    results_md: bool,
) -> None:
    """Print the summaries, draw the plot, and (``results_md``) replace this section of RESULTS.md."""
    summaries = [summarize(r) for r in results]
    for r, s in zip(results, summaries, strict=True):
        print(json.dumps(s, indent=1))
        for line in r["tracemalloc_top"]:
            print("  tracemalloc:", line)
    plot(results, plot_path)
    print(f"plot: {plot_path}")
    text = section(results, summaries, {**meta, "verdict": verdict(summaries, tolerance)})
    print(text)
    if results_md:
        write_section(ROOT / "bench" / "RESULTS.md", text)


if __name__ == "__main__":
    sys.exit(main())
