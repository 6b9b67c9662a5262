"""Pseudo-label precision of a selection, measured against the unlabeled images' true labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ssl_kd import storage
from ssl_kd.errors import UserError


def _keyed(table: pa.Table, columns: list[str]) -> pa.Table:
    # Joins want plain strings: the shard column is dictionary-encoded in both files.
    cols = {c: table[c] for c in columns}
    cols["shard"] = cols["shard"].cast(pa.string())
    return pa.table(cols)


def selection_precision(selection_dir: str, truth: str) -> dict[str, Any]:
    """Share of selected rows whose class is the image's true label, overall and per class.

    Each selected (image, class) row counts once, however often upsampling repeats it.
    """
    path = storage.join(selection_dir, "selection.parquet")
    selection = pq.read_table(path, columns=["shard", "key", "class"])
    truth_table = pq.read_table(truth, columns=["shard", "key", "label"])
    joined = _keyed(selection, ["shard", "key", "class"]).join(
        _keyed(truth_table, ["shard", "key", "label"]), keys=["shard", "key"]
    )
    if joined.num_rows < selection.num_rows:
        raise UserError(
            f"{truth} has no true label for {selection.num_rows - joined.num_rows} of the "
            f"{selection.num_rows} selected images; is it the truth file of these shards?"
        )
    cls = joined["class"].to_numpy()
    true = joined["label"].to_numpy()
    correct = cls == true
    classes = np.unique(cls)
    return {
        "images": len(cls),
        "precision": float(correct.mean()) if len(cls) else float("nan"),
        "per_class": {int(c): float(correct[cls == c].mean()) for c in classes},
        # An open-set pool: selected images of no task class (true label -1).
        "no_class": int((true < 0).sum()),
    }


def precision_curve(
    labels_dir: str, truth: str, top_p: int, points: int = 40, ks: Sequence[int] | None = None
) -> dict[str, Any]:
    """Pseudo-label precision of the per-class top-K selection as K grows: for each K, the share
    of the rows selected (each class's K best candidates among the images' top-P classes, by
    the teacher's probability) whose class is the image's true label. Ties are broken
    arbitrarily, so a K inside a run of equal scores may differ slightly from ``ssl-kd select``.
    The Ks are ``points`` from 1 to the largest class's candidates, spaced evenly on a log
    scale, or ``ks``.
    """
    from ssl_kd.label.files import label_files

    files = label_files(labels_dir)
    cols = ["shard", "key", "topk_class", "topk_prob"]
    labels = pa.concat_tables([_keyed(pq.read_table(f, columns=cols), cols) for f in files])
    truth_table = _keyed(
        pq.read_table(truth, columns=["shard", "key", "label"]), ["shard", "key", "label"]
    )
    # Joins take no list columns: join row numbers, then take the rows' labels in order.
    rows = pa.table(
        {"shard": labels["shard"], "key": labels["key"], "row": np.arange(labels.num_rows)}
    )
    joined = rows.join(truth_table, keys=["shard", "key"]).sort_by("row")
    if joined.num_rows < labels.num_rows:
        raise UserError(f"{truth} has no true label for some images of {labels_dir}")
    true = joined["label"].to_numpy()
    k = labels.schema.field("topk_class").type.list_size
    p = min(top_p, k)
    cls = _matrix(labels["topk_class"], k)[:, :p].ravel()
    score = _matrix(labels["topk_prob"], k)[:, :p].ravel()
    correct = (cls == np.repeat(true, p)).astype(np.int64)
    order = np.lexsort((-score, cls))  # class-major, best first
    cls, correct = cls[order], correct[order]
    starts = np.searchsorted(cls, np.arange(cls.max() + 1 if len(cls) else 0))
    counts = np.diff(np.append(starts, len(cls)))
    rank = np.arange(len(cls)) - np.repeat(starts, counts)  # 0-based rank within the class
    biggest = int(counts.max()) if len(counts) else 0
    if ks is None:
        grid = np.unique(np.geomspace(1, max(biggest, 1), points).round().astype(int))
    else:
        grid = np.clip(np.asarray(ks, int), 1, max(biggest, 1))
    # Selected at K: the rows of rank < K. Cumulative counts per rank give every K at once.
    by_rank = np.bincount(rank, minlength=biggest)
    right_by_rank = np.bincount(rank, weights=correct, minlength=biggest)
    selected = np.cumsum(by_rank)[grid - 1]
    right = np.cumsum(right_by_rank)[grid - 1]
    return {
        "top_p": p,
        "k": grid.tolist(),
        "selected": selected.astype(int).tolist(),
        "precision": (right / selected).tolist(),
    }


def _matrix(column: pa.ChunkedArray, k: int) -> np.ndarray:
    return column.combine_chunks().flatten().to_numpy().reshape(-1, k)


def plot_curve(curve: dict[str, Any], path: str, chosen_k: int | None = None) -> str:
    """The precision curve as a PNG (K on a log axis), with the chosen K marked."""
    from ssl_kd.figures import new_figure, save_png  # imports matplotlib

    fig = new_figure(6, 3.5)
    ax = fig.add_subplot()
    ax.plot(curve["k"], [100 * p for p in curve["precision"]], marker=".")
    if chosen_k:
        ax.axvline(chosen_k, color="tab:red", linestyle="--", linewidth=1, label=f"K = {chosen_k}")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("K (images selected per class)")
    ax.set_ylabel("precision (%)")
    ax.set_title(f"Pseudo-label precision of the top-K per class (top-{curve['top_p']} classes)")
    return save_png(fig, path)
