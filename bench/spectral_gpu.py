"""Spectral metrics on the GPU (torch) against numpy on the CPU.

Usage (only python3 with torch, numpy and scipy needed; the checkout on PYTHONPATH):
    PYTHONPATH=. python3 bench/spectral_gpu.py --out spectral_gpu.json            # cuda, full grid
    PYTHONPATH=. python3 bench/spectral_gpu.py --device cpu --quick --out /tmp/s.json

Times ``topomon.metrics.spectral.spectral_metrics`` (numpy, float64, CPU) against
``topomon.metrics.spectral_torch.spectral_metrics_torch`` on the chosen device (float64; with
``--float32`` also float32) and on the CPU with torch, for N x d in {512, 2048, 8192} x
{576, 2048, 4096}. Each time is the median of ``--repeats`` calls (fewer when one call exceeds
``--budget`` seconds), with ``torch.cuda.synchronize()`` around every GPU call. The device input is
already resident; the host-to-device copy of the float32 points is timed separately. For every
size the largest relative difference between the torch and numpy results over the eight metrics is
printed (NaN in both counts as equal; NaN in one only as ``inf``). A Markdown table is printed at
the end and everything is written as JSON to ``--out``.

Data: float32 Gaussian points whose covariance spectrum decays as k^-1 in a random basis, plus an
offset (hidden-state-like: anisotropic, uncentred), as in ``bench/metrics.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Submodules directly: topomon.metrics imports only numpy/scipy-based modules at import time
# (no ripser, trl or transformers), and these two need numpy (and torch, when called) only.
from topomon.metrics.spectral import spectral_metrics  # noqa: E402
from topomon.metrics.spectral_torch import spectral_metrics_torch  # noqa: E402

SIZES = [512, 2048, 8192]
DIMS = [576, 2048, 4096]


def cloud(n: int, d: int, basis: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.arange(1, d + 1.0) ** -0.5
    return ((rng.standard_normal((n, d)) * scale) @ basis.T + rng.standard_normal(d)).astype(np.float32)


def random_basis(d: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def timed(
    fn: Callable[[], Any], repeats: int, budget: float, sync: Callable[[], None]
) -> tuple[float, Any, int]:
    """Median seconds of up to ``repeats`` calls (stops early once ``budget`` seconds are spent)."""
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
        if sum(times) > budget:
            break
    return statistics.median(times), out, len(times)


def max_rel_diff(a: dict[str, float], b: dict[str, float]) -> tuple[float, str]:
    """Largest ``|a - b| / |a|`` over the metrics, and which metric; NaN in one result only is inf."""
    worst, which = 0.0, ""
    for k, va in a.items():
        vb = b[k]
        if math.isnan(va) and math.isnan(vb):
            continue
        diff = math.inf if (math.isnan(va) or math.isnan(vb)) else abs(va - vb) / max(abs(va), 1e-300)
        if diff > worst:
            worst, which = diff, k
    return worst, which


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "load": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        from threadpoolctl import threadpool_info

        env["blas"] = [f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info()]
    except ImportError:
        env["blas"] = "threadpoolctl not installed"
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


def fmt(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--device", default="cuda", help="torch device for the accelerated run (cuda, cuda:1, cpu)"
    )
    p.add_argument("--quick", action="store_true", help="small grid (N in 256, 512 x d in 64, 576), 1 repeat")
    p.add_argument("--repeats", type=int, default=5, help="calls per timing (median)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per cell after which repeats stop")
    p.add_argument("--float32", action="store_true", help="also time float32 on the device")
    p.add_argument("--no-torch-cpu", action="store_true", help="skip the torch-on-CPU column")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here", file=sys.stderr)
        return 2
    sizes, dims, repeats = ([256, 512], [64, 576], 1) if args.quick else (SIZES, DIMS, args.repeats)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)

    def nosync() -> None:
        return None

    # warm-up: CUDA context, cuSOLVER / LAPACK handles, BLAS threads
    warm = cloud(64, 32, random_basis(32))
    spectral_metrics(warm)
    spectral_metrics_torch(torch.from_numpy(warm).to(device))
    spectral_metrics_torch(torch.from_numpy(warm))
    if args.float32:
        spectral_metrics_torch(torch.from_numpy(warm).to(device), dtype=torch.float32)
    sync()

    env = environment(str(device))
    print(json.dumps(env), flush=True)
    rows: list[dict[str, Any]] = []
    for d in dims:
        basis = random_basis(d)
        for n in sizes:
            x = cloud(n, d, basis)
            row: dict[str, Any] = {"n": n, "d": d}
            row["numpy_s"], ref, row["numpy_repeats"] = timed(
                partial(spectral_metrics, x), repeats, args.budget, nosync
            )
            row["numpy"] = ref
            xt = torch.from_numpy(x)
            xd = xt
            if device.type != "cpu":
                row["h2d_s"], xd, _ = timed(partial(xt.to, device), repeats, args.budget, sync)
            runs: list[tuple[str, Callable[[], Any], Callable[[], None]]] = [
                ("torch_device", partial(spectral_metrics_torch, xd), sync)
            ]
            if args.float32:
                runs.append(
                    ("torch_device_f32", partial(spectral_metrics_torch, xd, dtype=torch.float32), sync)
                )
            if device.type != "cpu" and not args.no_torch_cpu:
                runs.append(("torch_cpu", partial(spectral_metrics_torch, xt), nosync))
            for key, fn, sy in runs:
                t, res, _ = timed(fn, repeats, args.budget, sy)
                row[f"{key}_s"], row[key] = t, res
                row[f"{key}_max_rel_diff"], row[f"{key}_worst_metric"] = max_rel_diff(ref, res)
            rows.append(row)
            line = (
                f"N={n} d={d}: numpy {fmt(row['numpy_s'])}, torch {device} {fmt(row['torch_device_s'])} "
                f"(max rel diff {row['torch_device_max_rel_diff']:.2e}, {row['torch_device_worst_metric']})"
            )
            if "torch_device_f32_s" in row:
                line += (
                    f", float32 {fmt(row['torch_device_f32_s'])} "
                    f"({row['torch_device_f32_max_rel_diff']:.2e}, {row['torch_device_f32_worst_metric']})"
                )
            if "torch_cpu_s" in row:
                line += f", torch cpu {fmt(row['torch_cpu_s'])} ({row['torch_cpu_max_rel_diff']:.2e})"
            print(line, flush=True)
            del xd, xt

    dev = str(device)
    head = ["N", "d", "numpy (CPU, f64)", f"torch {dev} f64", "speed-up", "max rel diff"]
    if args.float32:
        head += [f"torch {dev} f32", "speed-up", "max rel diff"]
    has_cpu = any("torch_cpu_s" in r for r in rows)
    if has_cpu:
        head += ["torch cpu f64", "max rel diff"]
    if device.type != "cpu":
        head += ["host->device copy"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r["n"]),
            str(r["d"]),
            fmt(r["numpy_s"]),
            fmt(r["torch_device_s"]),
            f"{r['numpy_s'] / r['torch_device_s']:.1f}x",
            f"{r['torch_device_max_rel_diff']:.1e}",
        ]
        if args.float32:
            cells += [
                fmt(r["torch_device_f32_s"]),
                f"{r['numpy_s'] / r['torch_device_f32_s']:.1f}x",
                f"{r['torch_device_f32_max_rel_diff']:.1e} ({r['torch_device_f32_worst_metric'] or '-'})",
            ]
        if has_cpu:
            cells += [fmt(r.get("torch_cpu_s")), f"{r.get('torch_cpu_max_rel_diff', math.nan):.1e}"]
        if device.type != "cpu":
            cells += [fmt(r["h2d_s"])]
        table.append("| " + " | ".join(cells) + " |")
    cmd = "python3 bench/spectral_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print()
    print(
        f"`{cmd}`; {env.get('gpu', 'no GPU')}; {env['cpus']} CPUs, torch {env['torch']} "
        f"({env['torch_threads']} threads), numpy {env['numpy']}; load at start {env['load']}; "
        f"median of up to {repeats} calls."
    )
    print()
    print("\n".join(table))
    payload = {"command": cmd, "environment": env, "device": dev, "repeats": repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, allow_nan=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
