"""Figures on matplotlib's Agg canvas, written as PNG atomically (local paths or object stores).

Figures are built on :class:`matplotlib.figure.Figure` with an explicit Agg canvas, not through
``pyplot``: no GUI backend is chosen, no global figure state is kept, and it works headless.
"""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ssl_kd import atomic


def new_figure(width: float, height: float) -> Figure:
    """An empty figure on an Agg canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> str:
    """Write ``fig`` as PNG atomically; returns the path."""
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return os.fspath(path)
