"""PNG charts of a label summary or a selection (figures from :mod:`ssl_kd.figures`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ssl_kd import storage
from ssl_kd.figures import new_figure, save_png

MAX_TICK_LABELS = 40  # beyond this many classes, names would overlap: show indices


def _class_axis(ax: Any, names: list[str]) -> None:
    if len(names) <= MAX_TICK_LABELS:
        ax.set_xticks(
            range(len(names)), [n[:16] for n in names], rotation=60, ha="right", fontsize=8
        )
    else:
        ax.set_xlabel("class index")
    ax.set_xlim(-0.6, len(names) - 0.4)


def _width(n_classes: int) -> float:
    return float(min(16, max(6, 0.3 * n_classes)))


def label_plots(summary: dict[str, Any], out: str) -> list[str]:
    """``class_histogram.png`` (top-1 per class) and ``confidence_histogram.png``."""
    per_class = summary["per_class"]
    names = [p["name"] for p in per_class]
    fig = new_figure(_width(len(names)), 4)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), [p["top1"] for p in per_class], width=0.8, color="tab:blue")
    ax.set_ylabel("images (top-1)")
    ax.set_title(f"Top-1 class histogram — {summary['rows']:,} images")
    _class_axis(ax, names)
    paths = [save_png(fig, storage.join(out, "class_histogram.png"))]

    hist = summary["confidence"]["histogram"]
    edges = np.asarray(hist["edges"])
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    ax.bar(
        edges[:-1],
        hist["counts"],
        width=np.diff(edges),
        align="edge",
        color="tab:orange",
        edgecolor="white",
    )
    ax.set_xlabel("top-1 probability")
    ax.set_ylabel("images")
    mean = summary["confidence"]["mean"]
    ax.set_title("Confidence" + (f" — mean {mean:.3f}" if mean is not None else ""))
    ax.set_xlim(0, 1)
    paths.append(save_png(fig, storage.join(out, "confidence_histogram.png")))
    return paths


def selection_plots(summary: dict[str, Any], out: str) -> list[str]:
    """``selection_counts.png``: selected and upsampled images per class, K as a line."""
    per_class = summary["per_class"]
    names = [p["name"] for p in per_class]
    x = np.arange(len(names))
    selected = np.array([p["selected"] for p in per_class])
    extra = np.array([p["upsampled"] for p in per_class])
    fig = new_figure(_width(len(names)), 4)
    ax = fig.add_subplot()
    ax.bar(x, selected, width=0.8, color="tab:green", label="selected")
    if extra.any():
        ax.bar(x, extra, bottom=selected, width=0.8, color="tab:olive", label="repeats (upsampled)")
    if summary["per_class_k"]:
        ax.axhline(
            summary["per_class_k"],
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"K = {summary['per_class_k']:,}",
        )
    ax.set_ylabel("images")
    ax.set_title(
        f"Selection per class — {summary['selected']:,} images "
        f"({summary['with_repeats']:,} with repeats)"
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # beside, not on, bars
    _class_axis(ax, names)
    return [save_png(fig, storage.join(out, "selection_counts.png"))]
