"""Pseudo-label precision of a selection, measured against the unlabeled images' true labels."""

from __future__ import annotations

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
    correct = cls == joined["label"].to_numpy()
    classes = np.unique(cls)
    return {
        "images": len(cls),
        "precision": float(correct.mean()) if len(cls) else float("nan"),
        "per_class": {int(c): float(correct[cls == c].mean()) for c in classes},
    }
