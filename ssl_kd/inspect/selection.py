"""A selection directory (``ssl-kd select``): per-class counts, scores, repeats and removals.

Counts and scores are computed from ``selection.parquet`` itself (streamed); candidates and the
images removed as duplicates or leaks exist only in ``report.json``, which is optional — without
it those columns are unknown (null).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.inspect.labels import BATCH_ROWS
from ssl_kd.select.files import open_selection

log = logging.getLogger(__name__)


def read_report(directory: str | Path) -> dict[str, Any] | None:
    """``report.json`` of a selection directory, or None when there is none."""
    path = storage.join(directory, "report.json")
    if not storage.is_file(path):
        log.warning("%s not found: candidates and removed images are unknown", path)
        return None
    try:
        report = json.loads(storage.read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("per_class"), list):
        raise UserError(f"{path} is not a selection report (no per_class list)")
    return report


def summarize_selection(directory: str | Path, batch_rows: int = BATCH_ROWS) -> dict[str, Any]:
    """Per class: selected, with repeats, min/mean score (from the rows), candidates and
    removals (from the report)."""
    path, meta = open_selection(directory)
    n_cls = meta.num_classes
    selected = np.zeros(n_cls, np.int64)
    with_repeats = np.zeros(n_cls, np.int64)
    score_sum = np.zeros(n_cls)
    score_min = np.full(n_cls, np.inf)
    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["class", "score", "repeat"]):
            cls = batch.column("class").to_numpy().astype(np.int64)
            if cls.size and (cls.min() < 0 or cls.max() >= n_cls):
                raise UserError(f"{path} holds class ids outside 0..{n_cls - 1}")
            score = batch.column("score").to_numpy().astype(np.float64)
            selected += np.bincount(cls, minlength=n_cls)
            with_repeats += np.bincount(
                cls, weights=batch.column("repeat").to_numpy(), minlength=n_cls
            ).astype(np.int64)
            score_sum += np.bincount(cls, weights=score, minlength=n_cls)
            np.minimum.at(score_min, cls, score)
    report = read_report(directory)
    reported = {p["class"]: p for p in report["per_class"]} if report else {}
    k = report.get("per_class_k") if report else None
    per_class = []
    for c in range(n_cls):
        r = reported.get(c, {})
        n = int(selected[c])
        per_class.append(
            {
                "class": c,
                "name": meta.classes[c],
                "candidates": r.get("candidates"),
                "selected": n,
                "with_repeats": int(with_repeats[c]),
                "upsampled": int(with_repeats[c]) - n,
                "min_score": float(score_min[c]) if n else None,
                "mean_score": float(score_sum[c] / n) if n else None,
                "duplicates_removed": r.get("duplicates_removed"),
                "leaked_removed": r.get("leaked_removed"),
                "short": bool(k is not None and n < k),
            }
        )
    mismatch = [
        p["class"]
        for p in per_class
        if reported and reported.get(p["class"], {}).get("selected") != p["selected"]
    ]
    if mismatch:
        log.warning("report.json disagrees with selection.parquet on %d classes", len(mismatch))

    def total(name: str) -> int | None:
        return None if report is None else int(report.get(name, 0))

    return {
        "view": "selection",
        "directory": str(directory),
        "num_classes": n_cls,
        "per_class_k": k,
        "top_p": report.get("top_p") if report else None,
        "selected": int(selected.sum()),
        "with_repeats": int(with_repeats.sum()),
        "short_classes": sum(p["short"] for p in per_class),
        "upsampled_classes": int((with_repeats > selected).sum()),
        "duplicates_removed": total("duplicates_removed"),
        "leaked_removed": total("leaked_removed"),
        "report_mismatch": mismatch,
        "per_class": per_class,
    }


def selection_top(
    directory: str | Path, cls: int, n: int, batch_rows: int = BATCH_ROWS
) -> dict[str, Any]:
    """The first ``n`` selected images of class ``cls`` in rank order (best first)."""
    path, meta = open_selection(directory)
    found: list[dict[str, Any]] = []
    total = 0
    columns = ["key", "shard", "class", "score", "rank", "repeat"]
    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            mine = batch.column("class").to_numpy() == cls
            total += int(mine.sum())
            mask = mine & (batch.column("rank").to_numpy() < n)
            if mask.any():
                found += batch.filter(pa.array(mask)).to_pylist()  # dictionary → plain str
    found.sort(key=lambda r: r["rank"])
    top = [
        {
            "rank": r["rank"],
            "shard": r["shard"],
            "key": r["key"],
            "score": float(r["score"]),
            "repeat": r["repeat"],
        }
        for r in found[:n]
    ]
    return {
        "view": "class",
        "directory": str(directory),
        "class": cls,
        "name": meta.classes[cls],
        "images": total,
        "top": top,
    }
