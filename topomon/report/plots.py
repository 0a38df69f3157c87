"""The report's figures, drawn from a :class:`~topomon.report.load.RunData` (nothing computed here).

Every function returns a ``matplotlib.figure.Figure`` built with the object API (no pyplot state,
never a window), or None when the run holds nothing to draw. Relative values are
``100 * (v - base) / |base|`` against the run's first capture (the base model), per layer; a metric
undefined at the base (topological activity needs a previous capture) is drawn in absolute values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from topomon.figures import draw_persistence_diagram, eigenspectrum_figure
from topomon.report.load import DiagramFile, RunData, layer_sort_key

__all__ = [
    "relative_to_base",
    "trajectories_figure",
    "heatmap_figure",
    "choose_diagrams",
    "diagrams_figure",
    "eigenspectra_figure",
    "timeline_figure",
]

_MAX_LEGEND_LAYERS = 10
_SEVERITY_STYLE = {
    "critical": ("v", "#b2182b", "critical alert"),
    "warning": ("v", "#f4a261", "warning alert"),
    "info": ("o", "#1a9850", "recovered"),
}


def relative_to_base(values: np.ndarray) -> np.ndarray:
    """Percent change of each row against its first column.

    Args:
        values: ``(n_layers, n_captures)`` (or ``(n_captures,)``) values; column 0 is the base.

    Returns:
        the same shape: ``100 * (v - v[..., :1]) / |v[..., :1]|``; rows whose base is 0 or not
        finite are all NaN.

    Example:
        >>> relative_to_base(np.array([[2.0, 1.0, 3.0]])).tolist()
        [[0.0, -50.0, 50.0]]
    """
    v = np.asarray(values, dtype=float)
    base = v[..., :1]
    ok = np.isfinite(base) & (base != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = 100.0 * (v - base) / np.abs(base)
    return np.where(ok, rel, np.nan)


def _t(text: object) -> str:
    """A data string as literal matplotlib text (a ``$`` would otherwise start mathtext and may raise)."""
    return str(text).replace("$", r"\$")


def _hidden_layers(run: RunData) -> list[str]:
    return [ly for ly in run.layers if ly != "model"] or list(run.layers)


def _layer_styles(layers: Sequence[str]) -> dict[str, dict[str, Any]]:
    hidden = [ly for ly in layers if ly not in ("final_norm", "model")]
    cols = colormaps["viridis"](np.linspace(0.0, 0.88, max(len(hidden), 1)))
    out: dict[str, dict[str, Any]] = {ly: {"color": cols[i], "lw": 1.1} for i, ly in enumerate(hidden)}
    out["final_norm"] = {"color": "black", "lw": 2.0}
    out["model"] = {"color": "tab:red", "lw": 1.4, "ls": "--"}
    return out


def _spans(run: RunData) -> list[tuple[str, float, float]]:
    out = []
    for s in run.stages:
        lo = s.first_step if s.first_step is not None else s.step_offset
        hi = s.last_step if s.last_step is not None else lo
        out.append((s.name, float(lo), float(hi)))
    return out


def _stage_labels(ax: Axes, labels: Sequence[tuple[str, float]], xlim: tuple[float, float]) -> int:
    """Stage names above the axes at data x; labels closer than ~7% of the width go up a row.

    Returns:
        The number of label rows used (a title above them needs that much room).
    """
    tr = blended_transform_factory(ax.transData, ax.transAxes)
    width = (xlim[1] - xlim[0]) or 1.0
    last_x: dict[int, float] = {}
    for name, x in sorted(labels, key=lambda t: t[1]):
        row = 0
        while row in last_x and (x - last_x[row]) / width < 0.04 + 0.012 * len(name):
            row += 1
        last_x[row] = x
        ax.text(
            x,
            1.01 + 0.085 * row,
            _t(name),
            transform=tr,
            ha="center",
            va="bottom",
            fontsize=8,
            color="#333366",
            clip_on=False,
        )
    return len(last_x)


def _mark_stages(ax: Axes, run: RunData, xlim: tuple[float, float]) -> None:
    spans = _spans(run)
    for i, (_, lo, _) in enumerate(spans):
        if i and lo > xlim[0]:
            ax.axvline(lo, color="#555555", ls="--", lw=0.8, zorder=0)
    _stage_labels(ax, [(n, (lo + hi) / 2) for n, lo, hi in spans], xlim)


def _xlim(run: RunData) -> tuple[float, float]:
    xs = [float(c.step) for c in run.captures] + [float(a["step"]) for a in run.alerts + run.actions]
    lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    pad = 0.02 * ((hi - lo) or 1.0)
    return lo - pad, hi + pad


def _base_value(run: RunData, metric: str, layer: str) -> float:
    return run.value(run.captures[0], layer, metric) if run.captures else math.nan


def trajectories_figure(
    run: RunData,
    metrics: Sequence[str],
    *,
    relative: bool = False,
    ncols: int = 2,
    title: str = "",
    panel_size: tuple[float, float] = (5.2, 3.1),
) -> Figure | None:
    """Metric vs global step, one panel per metric and one line per layer; stages and alerts marked.

    Args:
        run: the run.
        metrics: metric names (those without a finite value, or with ``relative`` without a base
            value at any layer, are left out).
        relative: plot percent change vs the base capture instead of values.
        ncols: panels per row.
        title: figure title.
        panel_size: width and height of one panel, inches.

    Returns:
        the figure, or None when no metric has data.
    """
    layers = run.layers
    keep = [m for m in metrics if run.has_metric(m)]
    if relative:
        keep = [m for m in keep if any(math.isfinite(_base_value(run, m, ly)) for ly in layers)]
    if not keep:
        return None
    ncols = max(1, min(ncols, len(keep)))
    nrows = math.ceil(len(keep) / ncols)
    w, h = panel_size
    fig = Figure(figsize=(w * ncols + 1.6, h * nrows + 0.6), dpi=100, layout="constrained")
    if title:
        fig.suptitle(_t(title), fontsize=12)
    styles = _layer_styles(layers)
    xlim = _xlim(run)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(len(keep))]
    handles: dict[str, Any] = {}
    for ax, metric in zip(axes, keep, strict=True):
        bases: dict[str, float] = {}
        for ly in layers:
            steps, vals = run.series(metric, ly)
            bases[ly] = vals[0] if len(vals) else math.nan
            if relative:
                vals = relative_to_base(vals)
            ok = np.isfinite(vals)
            if ok.any():
                st = styles.get(ly, {"color": "grey", "lw": 1.0})
                (line,) = ax.plot(steps[ok], vals[ok], marker=".", ms=3.5, label=_t(ly), **st)
                handles.setdefault(ly, line)
        if relative:
            ax.axhline(0.0, color="grey", lw=0.8)
        tr = ax.get_xaxis_transform()
        if run.alerts:
            steps_a = [a["step"] for a in run.alerts]
            ax.plot(steps_a, [0.02] * len(steps_a), "^", color="red", ms=5, transform=tr, clip_on=False)
        hits = [
            a
            for a in run.alerts
            if a["metric"] == metric and a["layer"] in bases and a["reason"] != "recovered"
        ]
        ys = [
            relative_to_base(np.array([bases[a["layer"]], a["value"]]))[1] if relative else a["value"]
            for a in hits
        ]
        if hits:
            handles["alert on this metric"] = ax.plot(
                [a["step"] for a in hits], ys, "x", color="red", ms=8, mew=2, label="alert on this metric"
            )[0]
        ax.set_xlim(*xlim)
        ax.set_xlabel("global step")
        ax.set_ylabel(f"{_t(metric)}: % vs base" if relative else _t(metric))
        ax.set_title(_t(metric), fontsize=10, loc="left", pad=16)
        ax.grid(True, alpha=0.25)
        _mark_stages(ax, run, xlim)
    if run.alerts:
        handles["alert (any)"] = Line2D([], [], marker="^", color="red", ls="none", ms=5, label="alert (any)")
    named = [ly for ly in layers if ly in handles]
    extra: list[str] = [k for k in ("alert (any)", "alert on this metric") if k in handles]
    if len(named) > _MAX_LEGEND_LAYERS:
        depth = [ly for ly in named if ly not in ("final_norm", "model")]
        sm = ScalarMappable(norm=Normalize(0, max(len(depth) - 1, 1)), cmap=colormaps["viridis"])
        cb = fig.colorbar(sm, ax=axes, shrink=0.6, aspect=30, pad=0.01)
        cb.set_label(f"layer depth ({_t(depth[0])} .. {_t(depth[-1])})" if depth else "layer depth")
        named = [ly for ly in named if ly in ("final_norm", "model")]
    if named or extra:
        keys: list[str] = named + extra
        fig.legend(
            handles=[handles[k] for k in keys],
            labels=[_t(k) for k in keys],
            loc="outside right upper",
            fontsize=8,
        )
    return fig


def heatmap_figure(run: RunData, metric: str) -> Figure | None:
    """Layer x capture heatmap of the percent change of ``metric`` vs the base capture.

    Layers with a value run by depth from bottom (``layer_0``) to top (``final_norm``); captures are
    columns in run order (labelled with their global step), so dense early captures stay visible. The colour
    map is diverging and centred at 0 (red: below the base, blue: above), clipped at the 98th
    percentile of |change|. A metric with no base value is drawn in absolute values instead.

    Args:
        run: the run.
        metric: the metric name.

    Returns:
        the figure, or None when ``metric`` has no finite value.
    """
    layers = _hidden_layers(run)
    m = run.matrix(metric, layers)
    rows = np.isfinite(m).any(axis=1)
    if not rows.any():
        return None
    layers, m = [ly for ly, keep in zip(layers, rows, strict=True) if keep], m[rows]  # layers with data
    rel = relative_to_base(m)
    relative = bool(np.isfinite(rel).any())
    data = rel if relative else m
    ncap, nlay = m.shape[1], len(layers)
    fig = Figure(figsize=(6.6, min(max(0.2 * nlay + 2.0, 3.0), 9.0)), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    if relative:
        lim = float(np.nanpercentile(np.abs(data), 98)) or 1.0
        cmap = colormaps["RdBu"].with_extremes(bad="#d9d9d9")
        norm = Normalize(-lim, lim)
    else:
        cmap = colormaps["magma"].with_extremes(bad="#d9d9d9")
        norm = Normalize(float(np.nanmin(data)), float(np.nanmax(data)))
    im = ax.imshow(data, aspect="auto", origin="lower", cmap=cmap, norm=norm, interpolation="nearest")
    base = run.captures[0]
    clipped = relative and bool(np.nanmax(np.abs(data)) > norm.vmax)
    cb = fig.colorbar(im, ax=ax, pad=0.01, extend="both" if clipped else "neither")
    cb.set_label(
        f"% change vs base (step {base.step}, {_t(base.stage)})" if relative else f"{_t(metric)} (absolute)",
        fontsize=9,
    )
    xt = list(range(0, ncap, max(1, math.ceil(ncap / 12))))
    ax.set_xticks(xt, [str(run.captures[i].step) for i in xt], fontsize=8)
    yt = list(range(0, nlay, max(1, math.ceil(nlay / 24))))
    if nlay - 1 not in yt:
        yt = [t for t in yt if nlay - 1 - t >= max(1, math.ceil(nlay / 24)) / 2] + [nlay - 1]
    ax.set_yticks(yt, [_t(layers[i]) for i in yt], fontsize=8)
    ax.set_xlabel("capture (global step)")
    ax.set_ylabel("layer")
    stages = [c.stage for c in run.captures]
    labels: list[tuple[str, float]] = []
    start = 0
    for i in range(1, ncap + 1):
        if i == ncap or stages[i] != stages[start]:
            labels.append((stages[start], (start + i - 1) / 2))
            if i < ncap:
                ax.axvline(i - 0.5, color="black", lw=1.0)
            start = i
    label_rows = _stage_labels(ax, labels, (-0.5, ncap - 0.5))
    col = {(c.step, c.stage): i for i, c in enumerate(run.captures)}
    hits = [
        (col[(a["step"], a["stage"])], layers.index(a["layer"]))
        for a in run.alerts
        if a["metric"] == metric and a["layer"] in layers and (a["step"], a["stage"]) in col
    ]
    if hits:
        ax.plot(*zip(*hits, strict=True), "o", mfc="none", mec="black", ms=7, mew=1.5)
    what = "change vs base" if relative else "absolute values (undefined at the base capture)"
    ax.set_title(
        f"{_t(metric)}: {what}" + ("; circles: alerts" if hits else ""),
        fontsize=10,
        loc="left",
        pad=6 + 11 * max(1, label_rows),  # above every row of stage names
    )
    return fig


def choose_diagrams(run: RunData, layer: str | None = None, max_panels: int = 9) -> list[DiagramFile]:
    """Diagram files worth showing: the first one, then each stage's first and last, for one layer.

    Args:
        run: the run.
        layer: the layer (None: ``run.key_layer`` if it has files, else the deepest layer with files).
        max_panels: at most this many files (the first ones kept).

    Returns:
        the chosen files in run order (empty when there is none).
    """
    with_files = sorted({d.layer for d in run.diagrams}, key=layer_sort_key)
    if layer is None:
        if not with_files:
            return []
        layer = run.key_layer if run.key_layer in with_files else with_files[-1]
    files = [d for d in run.diagrams if d.layer == layer]
    if not files:
        return []
    picks = [files[0]]
    for s in run.stages:
        own = [d for d in files if d.stage == s.name]
        picks += [own[0], own[-1]] if own else []
    out: list[DiagramFile] = []
    for d in picks:
        if d not in out:
            out.append(d)
    return out[:max_panels]


def _read_npz(path: str, problems: list[str] | None) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k], dtype=float) for k in z.files}
    except (OSError, ValueError) as e:
        if problems is not None:
            problems.append(f"could not read {path}: {type(e).__name__}: {e}")
        return None


def diagrams_figure(
    run: RunData, picks: Sequence[DiagramFile], problems: list[str] | None = None
) -> Figure | None:
    """Persistence diagrams (H0, H1) of the chosen files, side by side on one scale.

    Args:
        run: the run (for the title).
        picks: files, e.g. from :func:`choose_diagrams`.
        problems: unreadable files are skipped and described here.

    Returns:
        the figure, or None when no file holds ``h0``/``h1``.
    """
    loaded = []
    for d in picks:
        z = _read_npz(d.path, problems)
        if z is None:
            continue
        dg = {name.upper(): z[name].reshape(-1, 2) for name in ("h0", "h1") if name in z}
        if dg:
            loaded.append((d, dg))
        elif problems is not None:
            problems.append(f"{d.path} holds no h0/h1 arrays")
    if not loaded:
        return None
    fin = [a[np.isfinite(a[:, 1]), 1] for _, dg in loaded for a in dg.values()]
    top = max([float(f.max()) for f in fin if len(f)] + [1e-9])
    ncols = min(4, len(loaded))
    nrows = math.ceil(len(loaded) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 3.3 * nrows + 0.4), dpi=100, layout="constrained")
    fig.suptitle(f"Persistence diagrams, layer {_t(loaded[0][0].layer)} (same scale)", fontsize=11)
    for i, (d, dg) in enumerate(loaded):
        draw_persistence_diagram(
            fig.add_subplot(nrows, ncols, i + 1), dg, f"{_t(d.stage)}, step {d.step}", top=top
        )
    return fig


def eigenspectra_figure(
    run: RunData, layer: str | None = None, problems: list[str] | None = None
) -> Figure | None:
    """Eigenspectra of the base capture and of each stage's last capture with one, on log-log axes.

    Args:
        run: the run.
        layer: as in :func:`choose_diagrams`.
        problems: unreadable files are described here.

    Returns:
        the figure, or None when no diagram file holds an ``eigenspectrum``.
    """
    picks = choose_diagrams(run, layer, max_panels=10**6)
    spectra: dict[str, np.ndarray] = {}
    ends: dict[str, tuple[str, np.ndarray]] = {}
    for d in picks:
        z = _read_npz(d.path, problems)
        if z is None or "eigenspectrum" not in z:
            continue
        if not spectra:
            label = f"{_t(d.stage)}, step {d.step}" + ("" if d.stage == "base" else " (first)")
            spectra[label] = z["eigenspectrum"].ravel()
        else:
            ends[d.stage] = (f"end of {_t(d.stage)}, step {d.step}", z["eigenspectrum"].ravel())
    spectra.update(dict(ends.values()))
    if not spectra:
        return None
    config = run.info.get("config")
    window = config.get("alpha_window") if isinstance(config, dict) else None
    win = (int(window[0]), int(window[1])) if isinstance(window, list) and len(window) == 2 else None
    return eigenspectrum_figure(spectra, title=f"Eigenspectrum, layer {_t(picks[0].layer)}", window=win)


def timeline_figure(run: RunData, max_rows: int = 14) -> Figure | None:
    """Alerts (one row per rule) and actions (one row per kind) over global steps, on stage bands.

    Args:
        run: the run.
        max_rows: at most this many rows; the rest share an "other" row.

    Returns:
        the figure, or None when there is no alert and no action.
    """
    if not run.alerts and not run.actions:
        return None
    rows = list(dict.fromkeys([f"alert {a['rule'] or a['metric']}" for a in run.alerts]))
    rows += list(dict.fromkeys([f"action {a['action']}" for a in run.actions]))
    if len(rows) > max_rows:
        rows = rows[: max_rows - 1] + ["other"]
    ypos = {r: i for i, r in enumerate(reversed(rows))}

    def y(name: str) -> int:
        return ypos.get(name, ypos.get("other", 0))

    fig = Figure(figsize=(11, 1.3 + 0.32 * len(rows)), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    xlim = _xlim(run)
    for i, (_, lo, hi) in enumerate(_spans(run)):
        if hi > lo:
            ax.axvspan(lo, hi, color=("#e8eef7", "#f6eedf")[i % 2], zorder=0)
        else:
            ax.axvline(lo, color="#999999", lw=0.8, zorder=0)
    _stage_labels(ax, [(n, (lo + hi) / 2) for n, lo, hi in _spans(run)], xlim)
    seen: set[str] = set()
    for a in run.alerts:
        marker, color, label = _SEVERITY_STYLE.get(a["severity"], _SEVERITY_STYLE["warning"])
        ax.plot(
            a["step"],
            y(f"alert {a['rule'] or a['metric']}"),
            marker,
            color=color,
            ms=8,
            mec="black",
            mew=0.5,
            ls="none",
            label=None if label in seen else label,
        )
        seen.add(label)
    for a in run.actions:
        label = "action (revert)" if a["revert"] else "action"
        face = "white" if a["revert"] else "#2166ac"
        ax.plot(
            a["step"],
            y(f"action {a['action']}"),
            "s",
            color="#2166ac",
            mfc=face,
            ms=7,
            ls="none",
            label=None if label in seen else label,
        )
        seen.add(label)
    ax.set_yticks(range(len(rows)), [_t(r) for r in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlim(*xlim)
    ax.set_xlabel("global step")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("Alerts and actions", fontsize=10, loc="left", pad=16)
    fig.legend(loc="outside right upper", fontsize=8)
    return fig
