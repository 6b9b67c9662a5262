"""The selection's report (``report.json``) and what ``ssl-kd select`` prints of it."""

from __future__ import annotations

from typing import Any

import numpy as np

from ssl_kd import config as cfglib
from ssl_kd.select.topk import TopK

# ``cfg`` below is the stage's SelectConfig (ssl_kd.select.run imports this module).


def build_report(
    cfg: Any,
    classes: list[str],
    best: TopK,
    cls_ids: np.ndarray,
    score: np.ndarray,
    rep: np.ndarray,
    removed: dict[str, np.ndarray],
    floors: np.ndarray,
) -> dict[str, Any]:
    """The JSON report of a selection: per class candidates, selected, scores and removals."""
    # cls_ids is sorted (class-major), so each class is one contiguous run.
    n_cls = len(classes)
    selected = np.bincount(cls_ids, minlength=n_cls)
    with_repeats = np.bincount(cls_ids, weights=rep, minlength=n_cls).astype(np.int64)
    sums = np.bincount(cls_ids, weights=score, minlength=n_cls)
    starts = np.concatenate([[0], np.cumsum(selected)[:-1]])
    per_class = []
    for c, name in enumerate(classes):
        n = int(selected[c])
        per_class.append(
            {
                "class": c,
                "name": name,
                "candidates": int(best.candidates[c]),
                "selected": n,
                "with_repeats": int(with_repeats[c]),
                # ranks run best first: the class's minimum is its last selected score
                "min_score": float(score[starts[c] + n - 1]) if n else None,
                "mean_score": float(sums[c] / n) if n else None,
                "duplicates_removed": int(removed["duplicates"][c]),
                "leaked_removed": int(removed["leaked"][c]),
                "score_floor": float(floors[c]),
                "below_floor_removed": int(removed["below_floor"][c]),
            }
        )
    short = [p["class"] for p in per_class if p["selected"] < cfg.per_class]
    return {
        "per_class_k": cfg.per_class,
        "top_p": cfg.top_p,
        "selected": len(cls_ids),
        "with_repeats": int(rep.sum()),
        "short_classes": short,
        "duplicates_removed": int(removed["duplicates"].sum()),
        "leaked_removed": int(removed["leaked"].sum()),
        "below_floor_removed": int(removed["below_floor"].sum()),
        "per_class": per_class,
        "config": cfglib.to_dict(cfg),
    }


def format_report(report: dict[str, Any]) -> str:
    """A printable per-class table."""
    lines = [f"{'class':<20} {'candidates':>10} {'selected':>9} {'min':>7} {'mean':>7}"]
    for p in report["per_class"]:
        lo = f"{p['min_score']:.3f}" if p["min_score"] is not None else "-"
        mean = f"{p['mean_score']:.3f}" if p["mean_score"] is not None else "-"
        mark = " short" if p["selected"] < report["per_class_k"] else ""
        lines.append(
            f"{p['name'][:20]:<20} {p['candidates']:>10} {p['selected']:>9} {lo:>7} {mean:>7}{mark}"
        )
    return "\n".join(lines)


def format_summary(cfg: Any, report: dict[str, Any]) -> str:
    """What ``ssl-kd select`` prints: the per-class table, then one line."""
    return (
        f"{format_report(report)}\n"
        f"selected {report['selected']} images ({report['with_repeats']} with repeats), "
        f"{len(report['short_classes'])} classes short of {cfg.per_class} -> {cfg.out}"
    )
