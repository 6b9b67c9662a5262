"""Agreement between two label sets of the same images (say, two teacher versions).

Rows are joined on (shard, key). A label file holds one shard, so the join runs file by file:
each file of the first set against the files of the second that hold its shards (found from their
``shard`` columns, whatever the files are called). Memory holds one shard's keys at a time. Rows
present on one side only are counted, not compared.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssl_kd.errors import UserError
from ssl_kd.label.files import LabelSet, fixed_list

TOP_CONFUSIONS = 10


def _top1(path: Path) -> pa.Table:
    """``shard`` (plain string), ``key``, ``top1`` of one label file."""
    table = pq.read_table(path, columns=["key", "shard", "topk_class"])
    top1 = fixed_list(table.column("topk_class"), table.num_rows)[:, 0].astype(np.int32)
    return pa.table(
        {
            "shard": table.column("shard").cast(pa.string()),
            "key": table.column("key"),
            "top1": pa.array(top1, pa.int32()),
        }
    )


def _shards_of(table: pa.Table) -> set[str]:
    return set(pc.unique(table.column("shard")).to_pylist())


def _files_by_shard(labels: LabelSet) -> dict[str, list[Path]]:
    """Shard name → the label files holding rows of it (reads only the ``shard`` column)."""
    found: dict[str, list[Path]] = {}
    for path in labels.files:
        shards = pq.read_table(path, columns=["shard"]).column("shard").cast(pa.string())
        for shard in pc.unique(shards).to_pylist():
            found.setdefault(shard, []).append(path)
    return found


def _side(labels: LabelSet) -> dict[str, Any]:
    meta = labels.meta
    return {
        "directory": str(labels.directory),
        "teacher_arch": meta.teacher_arch,
        "teacher_sha256": meta.teacher_sha256,
        "k": meta.k,
        "temperature": meta.temperature,
    }


def compare_labels(a: LabelSet, b: LabelSet) -> dict[str, Any]:
    """Top-1 agreement of ``b`` with ``a``, overall and per class of ``a``'s top-1."""
    if a.meta.classes != b.meta.classes:
        raise UserError(
            f"{a.directory} and {b.directory} label different classes "
            f"({a.meta.num_classes} vs {b.meta.num_classes}, or other names): nothing to compare"
        )
    n_cls = a.meta.num_classes
    count_a = np.zeros(n_cls, np.int64)
    count_b = np.zeros(n_cls, np.int64)
    agree = np.zeros(n_cls, np.int64)
    confusions: Counter[tuple[int, int]] = Counter()
    rows_a = 0
    b_files = _files_by_shard(b)
    for path_a in a.files:
        ta = _top1(path_a)
        rows_a += ta.num_rows
        shards = _shards_of(ta)
        paths_b = sorted({p for s in shards for p in b_files.get(s, [])})
        if not paths_b:
            continue
        tb = pa.concat_tables(_top1(p) for p in paths_b)
        tb = tb.filter(pc.is_in(tb.column("shard"), pa.array(sorted(shards))))
        joined = ta.join(tb, keys=["shard", "key"], join_type="inner", right_suffix="_b")
        ca = joined.column("top1").to_numpy()
        cb = joined.column("top1_b").to_numpy()
        if len(ca) and max(int(ca.max()), int(cb.max())) >= n_cls:
            raise UserError(f"{path_a} or its counterpart holds a class id beyond {n_cls} classes")
        same = ca == cb
        count_a += np.bincount(ca, minlength=n_cls)
        count_b += np.bincount(cb, minlength=n_cls)
        agree += np.bincount(ca[same], minlength=n_cls)
        pairs, times = np.unique(ca[~same].astype(np.int64) * n_cls + cb[~same], return_counts=True)
        confusions.update(
            {(int(p // n_cls), int(p % n_cls)): int(t) for p, t in zip(pairs, times, strict=True)}
        )
    matched = int(count_a.sum())
    names = a.meta.classes
    return {
        "view": "compare",
        "a": _side(a),
        "b": _side(b),
        "matched": matched,
        # (shard, key) is unique on each side, so what did not match is the rest
        "only_a": rows_a - matched,
        "only_b": b.num_rows - matched,
        "agree": int(agree.sum()),
        "agreement": float(agree.sum() / matched) if matched else None,
        "per_class": [
            {
                "class": c,
                "name": names[c],
                "n_a": int(count_a[c]),
                "n_b": int(count_b[c]),
                "agree": int(agree[c]),
                "agreement": float(agree[c] / count_a[c]) if count_a[c] else None,
            }
            for c in range(n_cls)
        ],
        "confusions": [
            {"a": ca_, "b": cb_, "name_a": names[ca_], "name_b": names[cb_], "images": n}
            for (ca_, cb_), n in confusions.most_common(TOP_CONFUSIONS)
        ],
    }
