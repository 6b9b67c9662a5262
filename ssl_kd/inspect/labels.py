"""One label directory: summary, the most confident images of a class, one key's labels.

Each function makes one streaming pass over the record batches of the directory
(:meth:`~ssl_kd.label.files.LabelSet.iter_batches`) and keeps only per-class accumulators, the N
best rows or the matches, so memory stays flat however many images there are. Confidence is the
top-1 probability; entropy (nats) is that of the stored top-k probabilities renormalised to 1.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.label.files import LabelMeta, LabelSet, fixed_list

log = logging.getLogger(__name__)

BATCH_ROWS = 65_536
CONFIDENCE_BINS = 20  # 0.05 wide: fine enough to see a calibration bump, short in JSON


def open_labels(directory: str | Path) -> LabelSet:
    """The label set of ``directory``, every file checked against the label schema."""
    if storage.is_file(directory):
        raise UserError(f"{directory} is a file; give the directory that holds the label files")
    return LabelSet(directory)


def resolve_class(meta: LabelMeta, text: str) -> int:
    """A class given by name or index → its index (a name wins when both could match)."""
    if text in meta.classes:
        return meta.classes.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < meta.num_classes:
        return int(text)
    shown = ", ".join(meta.classes[:8]) + (", ..." if meta.num_classes > 8 else "")
    raise UserError(
        f"unknown class {text!r}: give a name ({shown}) or an index 0..{meta.num_classes - 1}"
    )


def topk_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row's stored top-k probabilities, renormalised to sum to 1."""
    p = probs.astype(np.float32)
    p /= np.maximum(p.sum(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=1)


def _check_ids(classes: np.ndarray, meta: LabelMeta, labels: LabelSet) -> None:
    if classes.size and (int(classes.min()) < 0 or int(classes.max()) >= meta.num_classes):
        raise UserError(
            f"{labels.directory} holds class ids outside 0..{meta.num_classes - 1}, the classes "
            "of its metadata: the files are damaged"
        )


def recorded_errors(directory: str | Path) -> dict[str, Any]:
    """Bad samples recorded by labeling in ``*.errors.jsonl``: total, per reason, shards."""
    by_reason: Counter[str] = Counter()
    shards = set()
    for path in storage.list_dir(directory, "*.errors.jsonl"):
        for number, line in enumerate(storage.read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d is not a JSON line; not counted", path, number)
                continue
            # "corrupt image: <decoder message>" → "corrupt image", as labeling counts them
            by_reason[str(record.get("reason", "?")).split(":", 1)[0]] += 1
            shards.add(record.get("shard") or path.name.removesuffix(".errors.jsonl"))
    return {
        "total": sum(by_reason.values()),
        "shards": len(shards),
        "by_reason": dict(by_reason.most_common()),
    }


def summarize_labels(labels: LabelSet, batch_rows: int = BATCH_ROWS) -> dict[str, Any]:
    """Files, rows, shards, teacher, bytes per image, errors, and per-class top-1 statistics."""
    meta = labels.meta
    n_cls = meta.num_classes
    count = np.zeros(n_cls, np.int64)
    conf_sum = np.zeros(n_cls)
    ent_sum = np.zeros(n_cls)
    edges = np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1)
    hist = np.zeros(CONFIDENCE_BINS, np.int64)
    shards: set[str] = set()
    columns = ["shard", "topk_class", "topk_prob"]
    for batch in labels.iter_batches(columns=columns, batch_size=batch_rows):
        n = batch.num_rows
        if n == 0:
            continue
        top1 = fixed_list(batch.column("topk_class"), n)[:, 0].astype(np.int64)
        probs = fixed_list(batch.column("topk_prob"), n)
        _check_ids(top1, meta, labels)
        conf = probs[:, 0].astype(np.float64)
        count += np.bincount(top1, minlength=n_cls)
        conf_sum += np.bincount(top1, weights=conf, minlength=n_cls)
        ent_sum += np.bincount(top1, weights=topk_entropy(probs), minlength=n_cls)
        # clip: a float16 top-1 of exactly 1.0 belongs in the last bin
        hist += np.histogram(np.clip(conf, 0.0, 1.0), bins=edges)[0]
        shards.update(pc.unique(batch.column("shard").cast(pa.string())).to_pylist())
    rows = int(count.sum())
    sizes = [storage.size(p) for p in labels.files]
    empty = sum(pq.ParquetFile(p).metadata.num_rows == 0 for p in labels.files)
    per_class = [
        {
            "class": c,
            "name": meta.classes[c],
            "top1": int(count[c]),
            "share": float(count[c] / rows) if rows else 0.0,
            "confidence": float(conf_sum[c] / count[c]) if count[c] else None,
            "entropy": float(ent_sum[c] / count[c]) if count[c] else None,
        }
        for c in range(n_cls)
    ]
    return {
        "view": "summary",
        "directory": str(labels.directory),
        "files": len(labels.files),
        "empty_files": int(empty),
        "rows": rows,
        "shards": len(shards),
        "num_classes": n_cls,
        "k": meta.k,
        "temperature": meta.temperature,
        "teacher_arch": meta.teacher_arch,
        "teacher_sha256": meta.teacher_sha256,
        "embedding_dim": meta.embedding_dim,
        "bytes": int(sum(sizes)),
        "bytes_per_image": round(sum(sizes) / rows, 2) if rows else None,
        "errors": recorded_errors(labels.directory),
        "confidence": {
            "mean": float(conf_sum.sum() / rows) if rows else None,
            "histogram": {"edges": edges.round(4).tolist(), "counts": hist.tolist()},
        },
        "entropy": {
            "mean": float(ent_sum.sum() / rows) if rows else None,
            "max": math.log(meta.k),
        },
        "per_class": per_class,
    }


def _row(
    meta: LabelMeta, shard: str, key: str, classes: np.ndarray, probs: np.ndarray
) -> dict[str, Any]:
    return {
        "shard": shard,
        "key": key,
        "score": float(probs[0]),
        "topk_class": [int(c) for c in classes],
        "topk_name": [meta.classes[int(c)] for c in classes],
        "topk_prob": [round(float(p), 5) for p in probs],
        "entropy": float(topk_entropy(probs[None])[0]),
    }


def class_top(labels: LabelSet, cls: int, n: int, batch_rows: int = BATCH_ROWS) -> dict[str, Any]:
    """The ``n`` images whose top-1 is ``cls``, most confident first (ties: shard, key)."""
    meta = labels.meta
    best: list[tuple[float, str, str, np.ndarray, np.ndarray]] = []  # (-score, shard, key, ...)
    total = 0
    columns = ["key", "shard", "topk_class", "topk_prob"]
    for batch in labels.iter_batches(columns=columns, batch_size=batch_rows):
        if batch.num_rows == 0:
            continue
        classes = fixed_list(batch.column("topk_class"), batch.num_rows)
        _check_ids(classes, meta, labels)
        rows = np.nonzero(classes[:, 0] == cls)[0]
        total += len(rows)
        if not len(rows):
            continue
        probs = fixed_list(batch.column("topk_prob"), batch.num_rows)
        score = probs[rows, 0].astype(np.float32)
        # Only rows that can still enter the list are turned into Python objects.
        floor = -best[-1][0] if len(best) == n else -np.inf
        if len(rows) > n:
            floor = max(floor, float(np.partition(score, -n)[-n]))
        keep = rows[score >= floor]
        taken = pa.array(keep)
        keys = batch.column("key").take(taken).to_pylist()
        shards = batch.column("shard").take(taken).cast(pa.string()).to_pylist()
        best.extend(
            (-float(probs[r, 0]), s, k, classes[r], probs[r])
            for r, s, k in zip(keep, shards, keys, strict=True)
        )
        best = sorted(best, key=lambda t: (t[0], t[1], t[2]))[:n]
    top = [{"rank": i, **_row(meta, s, k, c, p)} for i, (_, s, k, c, p) in enumerate(best)]
    return {
        "view": "class",
        "directory": str(labels.directory),
        "class": cls,
        "name": meta.classes[cls],
        "images": total,
        "top": top,
    }


def find_key(labels: LabelSet, key: str, batch_rows: int = BATCH_ROWS) -> dict[str, Any]:
    """The labels of ``key`` in every shard that holds it; UserError if none does."""
    meta = labels.meta
    matches = []
    columns = ["key", "shard", "topk_class", "topk_prob"]
    for batch in labels.iter_batches(columns=columns, batch_size=batch_rows):
        hits = np.nonzero(pc.equal(batch.column("key"), key).to_numpy(zero_copy_only=False))[0]
        if not len(hits):
            continue
        found = batch.take(pa.array(hits))
        classes = fixed_list(found.column("topk_class"), found.num_rows)
        _check_ids(classes, meta, labels)
        probs = fixed_list(found.column("topk_prob"), found.num_rows)
        shards = found.column("shard").cast(pa.string()).to_pylist()
        matches += [_row(meta, shards[i], key, classes[i], probs[i]) for i in range(len(hits))]
    if not matches:
        raise UserError(
            f"key {key!r} is in none of the {len(labels.files)} label files of {labels.directory}"
        )
    return {"view": "key", "directory": str(labels.directory), "key": key, "matches": matches}
