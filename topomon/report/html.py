"""The offline HTML report of a run directory: one self-contained page (figures as base64 PNG).

``build_report(run_dir)`` reads only the run directory (``docs/RUN_DIR.md``), draws the figures of
:mod:`topomon.report.plots` and writes ``report.html`` with the PNGs embedded, so the single file
can be mailed or archived; the PNGs are also saved beside the HTML (``report/``; ``r.html`` ->
``r/``), each embedded figure linking to its file by a relative path. Every
string that comes from the data (stage names, rule names, alert messages from user config, error
texts) is escaped with :func:`html.escape`; the page holds no JavaScript.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from topomon.metrics.families import headline_keys
from topomon.report.load import RunData, change_pct, load_run, retained_pct

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["StageSummary", "stage_summary", "build_report", "png_folder"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1280px;
margin:1.5em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #d0d0d0;padding:.25em .55em}
th{background:#f2f4f7;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.stage-first td{border-top:2px solid #888}.neg{color:#b2182b}.pos{color:#2166ac}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.4em .8em;margin:.4em 0}
.how{background:#f5f8fc;border-left:4px solid #6b8cc7;padding:.4em .8em;font-size:.92em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(600px,1fr));gap:.6em}
.meta td:first-child{font-weight:600;background:#fafafa}code{background:#f3f3f3;padding:0 .2em}
.wide{overflow-x:auto}
tr.group th{background:#e6ebf2;text-transform:uppercase;font-size:.8em;letter-spacing:.04em}
table.health td:nth-child(2){color:#555;font-size:.92em}
"""

_HOW = {
    "trajectories": (
        "Each panel is one metric of the captured hidden states against the global training step; one "
        "line per layer (darker = earlier layer, black = final norm output). Dashed lines separate the "
        "stages. <b>RankMe</b> (Garrido et al. 2023, raw features) and <b>RankMe-PCA</b> (centred "
        "explained variance, Li et al.) are effective ranks: a drop means the representations "
        "concentrate into fewer directions (representation collapse, which predicts lost plasticity and "
        "weaker out-of-domain generalisation). SFT and DPO are usually entropy-seeking (rank holds or "
        "grows); narrow stages compress. <b>alpha-ReQ</b> is the decay exponent of the covariance "
        "eigenspectrum: a rise means faster decay, i.e. compression. <b>Participation ratio</b> is the "
        "number of dimensions that carry the variance. <b>Anisotropy</b> (mean cosine of random pairs) "
        "rises when vectors point the same way; it is a weak, inconsistent signal on its own. "
        "<b>H1 total persistence</b> sums the lifetimes of loops in the Vietoris-Rips diagram; "
        "<b>topological activity</b> is the bottleneck distance between the H1 diagrams of consecutive "
        "captures (it typically peaks in the first steps of a stage and decays). Look at the last layers "
        "first: early layers barely move. Red triangles at the bottom mark alerts; red crosses mark alerts "
        "raised on that metric."
    ),
    "relative": (
        "The same metrics as percent change from the base capture (the first capture of the run), per "
        "layer, so that layers and stages compare on one scale. For scale: on SmolLM2-135M ordinary SFT "
        "moved the final-norm RankMe by 5-10%, a narrow 'refuse everything' stage by 27-39%; a rule "
        "'RankMe drops more than 15% from the stage start' separated the two. Metrics undefined at the "
        "base capture (topological activity) are left out here."
    ),
    "heatmaps": (
        "Rows are layers by depth (first layer at the bottom, final norm at the top), columns are "
        "captures in order (labelled with the global step; black lines separate stages). A cell is the "
        "percent change of that layer's metric from the base capture: red below the base, blue above, "
        "white unchanged (the colour scale is clipped at the 98th percentile of |change|; grey: no value). "
        "It shows where in depth a change starts and how it spreads. Circles mark alerts on that metric."
    ),
    "diagrams": (
        "Persistence diagrams of the probe point cloud at the chosen captures, on one scale. Each point is "
        "a feature (H0: a connected component, H1: a loop) born at scale b and dying at scale d; its "
        "distance from the diagonal is its persistence. Points far from the diagonal are robust "
        "structure; H1 points collapsing towards the diagonal, or disappearing, mean simpler topology. "
        "Triangles on the dashed line are infinite bars."
    ),
    "eigenspectra": (
        "Eigenvalues of the centred covariance against their rank, log-log, for the base capture and the "
        "end of each stage. A steeper line means more compressed representations (a higher alpha-ReQ, "
        "fitted over the shaded window); a tail that drops earlier means directions were lost."
    ),
    "timeline": (
        "When the alert rules fired (one row per rule; orange: warning, red: critical, green: recovered) "
        "and which interventions were taken (blue squares; hollow: a revert), over the stages (bands)."
    ),
    "more": "Every other metric the run recorded, same layout as the first figure.",
}


@dataclass(frozen=True)
class StageSummary:
    """One stage of the summary table.

    Attributes:
        stage: stage name.
        first_step: first capture step (None without captures).
        last_step: last capture step.
        n_captures: number of captures.
        values: metric -> ``(end, retained_pct, change_pct)``; end is the stage's last finite value,
            retained is vs the base capture, change is vs the stage's first finite value.
        n_alerts: alerts raised in the stage (recoveries not counted).
        n_recovered: recoveries in the stage.
        actions: action kind -> count.
    """

    stage: str
    first_step: int | None
    last_step: int | None
    n_captures: int
    values: dict[str, tuple[float, float, float]]
    n_alerts: int
    n_recovered: int
    actions: dict[str, int]


def stage_summary(run: RunData, metrics: Sequence[str], layer: str) -> list[StageSummary]:
    """Per stage: each metric's end value, retained % vs the base capture and change % over the stage.

    Args:
        run: the run.
        metrics: metric names.
        layer: the layer summarised (usually ``run.key_layer``).

    Returns:
        one :class:`StageSummary` per stage in run order (NaN where undefined: see
        :func:`~topomon.report.load.retained_pct` and :func:`~topomon.report.load.change_pct`).
    """
    out = []
    for s in run.stages:
        caps = run.stage_captures(s.name)
        values: dict[str, tuple[float, float, float]] = {}
        for m in metrics:
            base = run.value(run.base, layer, m) if run.base else math.nan
            vals = [v for v in (run.value(c, layer, m) for c in caps) if math.isfinite(v)]
            start, end = (vals[0], vals[-1]) if vals else (math.nan, math.nan)
            change = change_pct(end, start) if len(vals) > 1 else math.nan
            values[m] = (end, retained_pct(end, base), change)
        alerts = [a for a in run.alerts if a["stage"] == s.name]
        rec = sum(a["reason"] == "recovered" for a in alerts)
        actions = Counter(a["action"] for a in run.actions if a["stage"] == s.name)
        out.append(
            StageSummary(
                s.name,
                caps[0].step if caps else None,
                caps[-1].step if caps else None,
                len(caps),
                values,
                len(alerts) - rec,
                rec,
                dict(actions),
            )
        )
    return out


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _e(v) if v is not None else "—"
    if not math.isfinite(v):
        return "—"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10 or v == int(v):
        return f"{v:.1f}" if v != int(v) else f"{int(v)}"
    return f"{v:.3g}"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pct(v: float, signed: bool = False) -> str:
    if not math.isfinite(v):
        return "—"
    return f"{v:+.1f}%" if signed else f"{v:.1f}%"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _summary_html(run: RunData, layer: str, metrics: list[str]) -> str:
    rows = []
    for s in stage_summary(run, metrics, layer):
        acts = ", ".join(f"{_e(k)} ×{n}" for k, n in s.actions.items()) or "none"
        steps = f"{s.first_step}–{s.last_step}" if s.first_step is not None else "no capture"
        alerts = f"{s.n_alerts}" + (f" (+{s.n_recovered} recovered)" if s.n_recovered else "")
        span = len(metrics)
        for i, m in enumerate(metrics):
            end, ret, chg = s.values[m]
            attrs = f'data-stage="{_e(s.stage)}" data-metric="{_e(m)}"'
            cls = ' class="neg"' if chg < 0 else (' class="pos"' if chg > 0 else "")
            cells = [
                f'<td class="num" {attrs} data-col="end">{_num(end)}</td>',
                f'<td class="num" {attrs} data-col="retained">{_pct(ret)}</td>',
                f'<td class="num" {attrs} data-col="change"><span{cls}>{_pct(chg, True)}</span></td>',
            ]
            lead = []
            if i == 0:
                lead = [
                    f'<td rowspan="{span}"><b>{_e(s.stage)}</b><br><small>steps {steps}, '
                    f"{s.n_captures} capture{'' if s.n_captures == 1 else 's'}</small></td>",
                    f'<td rowspan="{span}" class="num" data-stage="{_e(s.stage)}" data-col="alerts">'
                    f"{alerts}</td>",
                    f'<td rowspan="{span}" data-stage="{_e(s.stage)}" data-col="actions">{acts}</td>',
                ]
            tr = ' class="stage-first"' if i == 0 else ""
            rows.append(f"<tr{tr}>" + "".join(lead) + f"<td>{_e(m)}</td>" + "".join(cells) + "</tr>")
    head = [
        "stage",
        "alerts",
        "actions",
        "metric",
        "value at stage end",
        "retained vs base",
        "change over stage",
    ]
    return (
        '<table class="summary"><thead><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _alerts_html(run: RunData) -> str:
    if not run.alerts and not run.actions:
        return "<p>No alert was raised and no action was taken.</p>"
    parts = []
    if run.alerts:
        rows = [
            [
                f'<td class="num">{a["step"]}</td>',
                f"<td>{_e(a['stage'])}</td>",
                f"<td>{_e(a['severity'])}</td>",
                f"<td><code>{_e(a['rule'])}</code></td>",
                f"<td>{_e(a['layer'])}</td>",
                f"<td>{_e(a['metric'])}</td>",
                f'<td class="num">{_num(a["value"])}</td>',
                f'<td class="num">{_num(a["reference"])}</td>',
                f'<td class="alert-message">{_e(a["message"])}</td>',
            ]
            for a in run.alerts
        ]
        hdr = ["step", "stage", "severity", "rule", "layer", "metric", "value", "reference", "message"]
        parts.append("<h3>Alerts</h3>" + _table(hdr, rows, "alerts"))
    if run.actions:
        rows = [
            [
                f'<td class="num">{a["step"]}</td>',
                f"<td>{_e(a['stage'])}</td>",
                f"<td>{_e(a['action'])}{' (revert)' if a['revert'] else ''}</td>",
                "<td>" + _e(", ".join(f"{k}={v}" for k, v in a["params"].items())) + "</td>",
                f"<td><code>{_e(a['cause'])}</code></td>",
                f"<td>{_e(a['message'])}</td>",
            ]
            for a in run.actions
        ]
        parts.append(
            "<h3>Actions</h3>"
            + _table(["step", "stage", "action", "params", "cause", "message"], rows, "actions")
        )
    return "".join(parts)


def _health_html(run: RunData) -> str:
    from topomon.report.health import COUNTER_HELP, health_columns, health_groups

    parts = []
    if run.health:
        cols = health_columns(run.health)
        head = "".join(f"<th>{_e(c)}</th>" for c in ["counter", "what it counts", *cols])
        body = []
        for group, counters in health_groups(run.health):
            body.append(f'<tr class="group"><th colspan="{len(cols) + 2}">{_e(group)}</th></tr>')
            for key, values in counters:
                cells = "".join(
                    f'<td class="num" data-stage="{_e(c)}" data-counter="{_e(key)}">'
                    f"{_pct(100 * v) if key.endswith('_fraction') and _is_num(v) else _num(v)}</td>"
                    for c, v in zip(cols, values, strict=True)
                )
                body.append(
                    f"<tr><td><code>{_e(key)}</code></td><td>{_e(COUNTER_HELP.get(key, ''))}</td>{cells}</tr>"
                )
        parts.append(
            f'<div class="wide"><table class="health"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )
        bad = {k: sum(float(h.get(k) or 0) for h in run.health) for k in ("dropped", "lost", "failed")}
        if any(bad.values()):
            parts.append(
                '<p class="note">Some captures were not computed ('
                + ", ".join(f"{k}: {int(v)}" for k, v in bad.items() if v)
                + "): the trajectories have gaps there.</p>"
            )
    else:
        parts.append("<p>No monitor counters were written (the run may not have ended cleanly).</p>")
    errs = Counter(e for r in run.metrics for e in r["errors"])
    n_err = sum(1 for r in run.metrics if r["errors"])
    parts.append(
        f"<p>{len(run.captures)} captures, {len(run.metrics)} metric records, {n_err} with errors.</p>"
    )
    if errs:
        items = "".join(f"<li><code>{_e(e)}</code> ×{n}</li>" for e, n in errs.most_common(10))
        parts.append(f"<ul>{items}</ul>")
    return "".join(parts)


def _run_version(info: dict[str, Any]) -> str:
    """The topomon version(s) that wrote the run (escaped HTML): one, or one per stage when they differ.

    Each stage's entry of ``run.json`` holds the version that recorded it; an old top-level
    ``topomon_version`` counts for stages without their own.
    """
    top = info.get("topomon_version")
    raw = info.get("stages")
    stages = [s for s in raw if isinstance(s, dict)] if isinstance(raw, list) else []
    per_stage = {str(s.get("name", "?")): s.get("topomon_version", top) for s in stages}
    known = {k: str(v) for k, v in per_stage.items() if v is not None}
    if not known:
        return _e(top) if top is not None else "unknown (not in run.json)"
    if len(set(known.values())) == 1 and len(known) == len(per_stage):
        return _e(next(iter(known.values())))
    return ", ".join(f"{_e(k)} {_e(known.get(k, 'unknown'))}" for k in per_stage)


def _header_html(run: RunData, title: str, layer: str | None) -> str:
    from topomon import __version__

    info = run.info
    plan = info.get("probe_plan") if isinstance(info.get("probe_plan"), dict) else None
    if plan is None:
        raw = info.get("stages")
        stages_raw: list[Any] = raw if isinstance(raw, list) else []
        plan = next((s["probe_plan"] for s in stages_raw if isinstance(s, dict) and "probe_plan" in s), None)
    probe = (
        ", ".join(f"{k.replace('n_', '')}: {_e(v)}" for k, v in plan.items() if k.startswith("n_"))
        if isinstance(plan, dict)
        else "unknown (no probe plan in run.json)"
    )
    stages = " → ".join(
        f"<b>{_e(s.name)}</b> (offset {s.step_offset}"
        + (f", steps {s.first_step}–{s.last_step}" if s.first_step is not None else "")
        + ")"
        for s in run.stages
    )
    steps = f"{run.captures[0].step}–{run.captures[-1].step}" if run.captures else "none"
    rows = [
        ("run directory", f"<code>{_e(os.path.abspath(run.run_dir))}</code>"),
        ("stages", stages or "none"),
        ("global steps", f"{steps} ({len(run.captures)} captures)"),
        (
            "layers",
            f"{len(run.layers)}: {_e(', '.join(run.layers[:3]))}{' …' if len(run.layers) > 3 else ''}",
        ),
        ("summary layer", _e(layer or "none")),
        ("probe set", probe),
        ("topomon version", f"run: {_run_version(info)}; report: {_e(__version__)}"),
        ("generated", _e(time.strftime("%Y-%m-%d %H:%M:%S"))),
    ]
    meta = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in run.notes)
    return f'<h1>{_e(title)}</h1><table class="meta">{meta}</table>{notes}'


def _other_metrics(run: RunData) -> tuple[list[str], dict[str, float]]:
    """Metrics beyond the key ones: those that vary (at most 24), and those constant throughout."""
    more: list[str] = []
    constant: dict[str, float] = {}
    for m in run.metric_names:
        if m in headline_keys() or not run.has_metric(m):
            continue
        vals = {r["metrics"][m] for r in run.metrics if math.isfinite(r["metrics"].get(m, math.nan))}
        if len(vals) == 1:
            constant[m] = vals.pop()
        else:
            more.append(m)
    return more[:24], constant


def _figures(
    run: RunData, keys: list[str], more: list[str], problems: list[str]
) -> list[tuple[str, str, str, Figure | None]]:
    """``(file id, heading, section, figure or None)`` for every figure of the report."""
    from topomon.report import plots

    figs: list[tuple[str, str, str, Figure | None]] = [
        ("trajectories", "Trajectories", "trajectories", plots.trajectories_figure(run, keys)),
        ("trajectories_relative", "Relative to the base capture", "relative",
         plots.trajectories_figure(run, keys, relative=True)),
    ]  # fmt: skip
    figs += [(f"heatmap_{m}", f"Layer × step: {m}", "heatmaps", plots.heatmap_figure(run, m)) for m in keys]
    figs += [
        ("diagrams", "Persistence diagrams", "diagrams",
         plots.diagrams_figure(run, plots.choose_diagrams(run), problems)),
        ("eigenspectra", "Eigenspectra", "eigenspectra", plots.eigenspectra_figure(run, problems=problems)),
        ("timeline", "Alert and action timeline", "timeline", plots.timeline_figure(run)),
        ("more_metrics", "More metrics", "more",
         plots.trajectories_figure(run, more, ncols=3, panel_size=(4.0, 2.8))),
    ]  # fmt: skip
    return figs


def png_folder(html_path: str) -> str:
    """Where the report's PNG figures go: beside the HTML, in a folder named after it.

    ``report.html`` -> ``report/``; a name without ``.html`` / ``.htm`` gets ``_files`` appended.

    Example:
        >>> png_folder(os.path.join("elsewhere", "r.html")) == os.path.join("elsewhere", "r")
        True
    """
    stem, ext = os.path.splitext(html_path)
    return stem if ext.lower() in (".html", ".htm") else f"{html_path}_files"


def build_report(run_dir: str | os.PathLike[str], out: str | None = None, *, title: str | None = None) -> str:
    """Write the HTML report of a run directory.

    Args:
        run_dir: the run directory (must hold ``metrics.jsonl``).
        out: the HTML file to write (default ``<run_dir>/report.html``). The PNG figures are also
            saved beside it, in the folder :func:`png_folder` names (``r.html`` -> ``r/``), and each
            embedded figure links to its PNG by a path relative to the HTML (skipped, with a note in
            the page, if that folder is not writable).
        title: page title (default ``"topomon report: <run dir name>"``).

    Returns:
        the path of the written HTML file.

    Raises:
        TypeError: if ``run_dir``, ``out`` or ``title`` has the wrong type.
        FileNotFoundError: if ``run_dir`` does not exist or holds no ``metrics.jsonl``.
        ValueError: if ``run_dir`` is a file.

    Example:
        >>> build_report("out/topomon")  # doctest: +SKIP
        'out/topomon/report.html'
    """
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"`out` must be a str path or None, got {type(out).__name__}")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"`title` must be a str or None, got {type(title).__name__}")
    run = load_run(run_dir)
    out_path = os.fspath(out) if out is not None else os.path.join(run.run_dir, "report.html")
    name = os.path.basename(os.path.normpath(os.path.abspath(run.run_dir)))
    title = title if title is not None else f"topomon report: {name}"
    layer = run.key_layer
    keys = [m for m in headline_keys() if run.has_metric(m)]
    more, constant = _other_metrics(run)
    problems: list[str] = []
    figs = _figures(run, keys, more, problems)
    png_dir = png_folder(out_path)
    png_rel = os.path.basename(png_dir)  # the folder is beside the HTML: links stay relative to it
    sections: dict[str, list[str]] = {"more": []} if constant else {}
    for fid, heading, how, fig in figs:
        if fig is None:
            continue
        data = _png(fig)
        b64 = base64.b64encode(data).decode("ascii")
        img = f'<img alt="{_e(heading)}" src="data:image/png;base64,{b64}">'
        try:
            os.makedirs(png_dir, exist_ok=True)
            with open(os.path.join(png_dir, f"{fid}.png"), "wb") as fh:
                fh.write(data)
            href = urllib.parse.quote(f"{png_rel}/{fid}.png")
            img = f'<a href="{_e(href)}" title="open the PNG">{img}</a>'
        except OSError as e:
            problems.append(f"could not save {fid}.png under {png_dir}: {e}")
        img = f"<figure>{img}</figure>"
        sections.setdefault(how, []).append(img if how == "heatmaps" else f"<h3>{_e(heading)}</h3>{img}")
    body = [_header_html(run, title, layer)]
    body += [f'<p class="note">{_e(p)}</p>' for p in dict.fromkeys(problems)]
    body.append(
        f"<h2>Summary by stage</h2><p>Metrics of layer <b>{_e(layer)}</b>. <i>Retained vs base</i> = "
        "100·end/base (base: the first capture of the run; defined for a positive base); <i>change over "
        "stage</i> = 100·(end − start)/|start| between the stage's first and last captures.</p>"
    )
    body.append(_summary_html(run, layer, keys) if layer and keys else "<p>No metric to summarise.</p>")
    body.append("<h2>Figures</h2>")
    if not sections:
        body.append("<p>Nothing to draw: the run has no captures yet.</p>")
    for how in ("trajectories", "relative", "heatmaps", "diagrams", "eigenspectra", "timeline", "more"):
        if how not in sections:
            continue
        content = "".join(sections[how])
        if how == "more" and constant:
            listed = ", ".join(f"{_e(m)} = {_num(v)}" for m, v in constant.items())
            content += f"<p>Constant throughout: {listed}.</p>"
        if how == "heatmaps":
            content = f'<h3>Layer × step heatmaps</h3><div class="grid">{content}</div>'
        body.append(
            f'<section id="{how}">{content}<p class="how"><b>How to read this.</b> {_HOW[how]}</p></section>'
        )
    body.append(f"<h2>Alerts and actions</h2>{_alerts_html(run)}")
    body.append(f"<h2>Monitor health</h2>{_health_html(run)}")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    tmp = f"{out_path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.replace(tmp, out_path)
    return out_path
