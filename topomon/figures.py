"""Figures drawn from metric data (never computed here): persistence diagrams and eigenspectra.

Every function returns a ``matplotlib.figure.Figure`` built with the object API (no pyplot state),
so it is safe in a background thread and never opens a window. Two callers, neither above the
other: the metric worker draws a capture's TensorBoard figures (:func:`figure_images`), the report
draws its pages (:mod:`topomon.report.plots`); the worker never imports ``topomon.report``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "FIGURES",
    "PERSISTENCE",
    "EIGENSPECTRA",
    "persistence_diagram_figure",
    "draw_persistence_diagram",
    "eigenspectrum_figure",
    "figure_images",
    "figure_tags",
    "import_drawing",
]

PERSISTENCE = "figure_persistence"
"""A topology layer's persistence diagram (on that layer's record)."""
EIGENSPECTRA = "figure_eigenspectra"
"""Every captured layer's eigenspectrum in one figure (on one record of the capture)."""

FIGURES: dict[str, str] = {
    PERSISTENCE: "topomon_figures/persistence/{layer}",
    EIGENSPECTRA: "topomon_figures/eigenspectra",
}
"""The one list of figures: record array name -> its tag in TensorBoard and the trackers.

A family declares the figures drawn from its arrays (``MetricFamily.figures``); the worker draws them
(:func:`figure_images`), the sinks find them by :func:`figure_tags`.
"""


def import_drawing() -> None:
    """Import the matplotlib modules the figures use, on the calling thread.

    A thread's first ``import matplotlib.figure`` leaves the module half initialised in ``sys.modules``
    for a moment. A library that looks there without importing fails on it: trackio's ``log`` checks
    ``sys.modules["matplotlib.figure"].Figure`` for every value, and drops a value of the trainer's
    row when that check raises. The thread worker calls this at set-up, on the training thread,
    so that its first figure imports nothing.
    """
    import matplotlib.figure  # noqa: F401
    from matplotlib.backends import backend_agg  # noqa: F401


def figure_tags(records: Iterable[Any]) -> dict[str, np.ndarray]:
    """The figures the worker drew on ``records``, as ``(H, W, C)`` uint8 images under their tags.

    Example:
        >>> from topomon.types import MetricRecord
        >>> r = MetricRecord(0, "s", "layer_1", {}, {PERSISTENCE: np.zeros((2, 2, 3))})
        >>> list(figure_tags([r]))
        ['topomon_figures/persistence/layer_1']
    """
    out: dict[str, np.ndarray] = {}
    for r in records:
        for name, tag in FIGURES.items():
            img = r.arrays.get(name)
            if img is not None:
                out[tag.format(layer=r.layer)] = np.asarray(img, dtype=np.uint8)
    return out


def draw_persistence_diagram(
    ax: Axes, dgms: Mapping[str, np.ndarray], title: str = "", top: float | None = None
) -> None:
    """Draw a birth-death diagram on ``ax``; infinite bars as triangles on a dashed "inf" line.

    Args:
        ax: the axes.
        dgms: ``{"H0": (k, 2), "H1": (m, 2)}`` arrays of (birth, death); ``inf`` deaths allowed.
        title: axes title.
        top: largest finite death to make room for (None: this diagram's own); give the same value
            to several axes to compare diagrams on one scale.
    """
    arrays = {name: np.asarray(d, dtype=float).reshape(-1, 2) for name, d in dgms.items()}
    if top is None:
        finite = [d[np.isfinite(d[:, 1]), 1] for d in arrays.values()]
        top = max([float(f.max()) for f in finite if len(f)] + [1e-9])
    inf_y = top * 1.1
    colors = {"H0": "tab:blue", "H1": "tab:orange", "H2": "tab:green"}
    for name, d in arrays.items():
        fin = np.isfinite(d[:, 1])
        ax.scatter(d[fin, 0], d[fin, 1], s=12, alpha=0.7, label=f"{name} ({len(d)})", color=colors.get(name))
        if (~fin).any():
            ax.scatter(d[~fin, 0], np.full((~fin).sum(), inf_y), marker="^", s=30, color=colors.get(name))
    ax.plot([0, inf_y], [0, inf_y], color="grey", lw=0.8)
    ax.axhline(inf_y, color="grey", ls="--", lw=0.8)
    ax.text(0.0, inf_y, " inf", va="bottom", fontsize=8, color="grey")
    ax.set_xlim(-0.03 * inf_y, inf_y * 1.03)
    ax.set_ylim(-0.03 * inf_y, inf_y * 1.08)
    ax.set_xlabel("birth")
    ax.set_ylabel("death")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)


def persistence_diagram_figure(dgms: Mapping[str, np.ndarray], title: str = "", tight: bool = True) -> Figure:
    """Birth-death scatter of H0 and H1 bars; infinite bars drawn on a dashed line at the top.

    Args:
        dgms: ``{"H0": (k, 2), "H1": (m, 2)}`` arrays of (birth, death); ``inf`` deaths allowed.
        title: figure title.
        tight: fit the margins to the labels (``tight_layout``); False: fixed margins, less
            drawing time (the worker's TensorBoard figures).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4.0), dpi=100)
    draw_persistence_diagram(fig.add_subplot(1, 1, 1), dgms, title)
    if tight:
        fig.tight_layout()
    else:
        fig.subplots_adjust(left=0.16, right=0.97, bottom=0.12, top=0.93)
    return fig


def eigenspectrum_figure(
    spectra: Mapping[str, np.ndarray],
    title: str = "",
    window: tuple[int, int] | None = None,
    tight: bool = True,
) -> Figure:
    """Centred covariance eigenvalues against rank on log-log axes, one line per label.

    Args:
        spectra: label -> descending eigenvalues.
        title: figure title.
        window: the alpha-ReQ fit window, shaded.
        tight: fit the margins to the labels (``tight_layout``); False: fixed margins that leave
            room for a legend of short labels (the worker's one-layer TensorBoard figures).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    longest = 1
    for label, ev in spectra.items():
        ev = np.asarray(ev, dtype=float)
        ev = ev[ev > 0]
        longest = max(longest, len(ev))
        ax.loglog(np.arange(1, len(ev) + 1), ev, label=label, lw=1.2)
    if window is not None and window[0] < longest:  # shade only the part of the window with data
        ax.axvspan(window[0], min(window[1], longest), color="grey", alpha=0.12, label="alpha-ReQ window")
    ax.set_xlabel("rank k")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.grid(True, which="both", alpha=0.2)
    if tight:
        fig.tight_layout()
    else:
        fig.subplots_adjust(left=0.11, right=0.70, bottom=0.14, top=0.91)
    return fig


def figure_images(
    records: Sequence[Any], alpha_window: tuple[int, int] = (6, 100), carrier: str | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """The TensorBoard figures of one capture, rendered to RGB images.

    Called in the metric worker, so that drawing (matplotlib holds the GIL for a long time) never
    runs in the training process. One persistence diagram per layer that has diagrams, and one
    figure with the eigenspectra of every captured layer (layers compare on one scale, and one
    figure instead of one per layer: about a quarter of the drawing time, bench/RESULTS.md).

    Args:
        records: the :class:`~topomon.types.MetricRecord` of one capture; those with
            ``dgm_h0``/``dgm_h1`` arrays get a diagram, those with ``eigenspectrum`` a line.
        alpha_window: the alpha-ReQ fit window shaded on the eigenspectra.
        carrier: the layer whose record carries the eigenspectra figure (default: the last record's).

    Returns:
        layer -> ``{PERSISTENCE | EIGENSPECTRA: (H, W, 3) uint8 image}`` (names of :data:`FIGURES`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figs: list[tuple[str, str, Figure]] = []
    spectra: dict[str, np.ndarray] = {}
    for r in records:
        if "dgm_h0" in r.arrays or "dgm_h1" in r.arrays:
            dgms = {k.upper().replace("DGM_", ""): v for k, v in r.arrays.items() if k.startswith("dgm_")}
            title = f"{r.stage} step {r.step} - {r.layer}"
            figs.append((r.layer, PERSISTENCE, persistence_diagram_figure(dgms, title, tight=False)))
        if "eigenspectrum" in r.arrays:
            spectra[r.layer] = r.arrays["eigenspectrum"]
    if spectra:
        r = records[0]
        title = f"{r.stage} step {r.step} - eigenspectra"
        fig = eigenspectrum_figure(spectra, title=title, window=alpha_window, tight=False)
        figs.append((carrier or records[-1].layer, EIGENSPECTRA, fig))
    out: dict[str, dict[str, np.ndarray]] = {}
    for layer, name, fig in figs:
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        out.setdefault(layer, {})[name] = np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
    return out
