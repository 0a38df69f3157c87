"""The figures, importable here too; they live in :mod:`topomon.figures` (report and worker draw them)."""

from topomon.figures import (
    draw_persistence_diagram,
    eigenspectrum_figure,
    figure_images,
    persistence_diagram_figure,
)

__all__ = ["persistence_diagram_figure", "draw_persistence_diagram", "eigenspectrum_figure", "figure_images"]
