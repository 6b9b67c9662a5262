"""``ssl-kd select``: a class-balanced training set from pseudo-labels (Yalniz et al. 2019).

Each image is a candidate for its top-P classes; each class keeps its K best-scored candidates
(ties: shard, then key). One partial top-K per label file — a Ray task each, or in-process —
merged into the exact global answer. Classes with fewer than K candidates are reported and, with
``upsample``, their images repeated up to K. The labeled images can floor, re-rank and weigh
the candidates (:mod:`ssl_kd.select.neighbours`). Output: ``selection.parquet`` (``key``,
``shard``, ``class``, ``score``, ``rank``, ``repeat``, [``weight``], ``topk_class``,
``topk_prob``), ``report.json`` and ``config.yaml``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ssl_kd import atomic, storage
from ssl_kd import config as cfglib
from ssl_kd.config import option
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.executor import map_tasks
from ssl_kd.label.files import LabelMeta, LabelSet, fixed_list, recorded_shard_spec
from ssl_kd.ray_cluster import cluster_resources
from ssl_kd.select import neighbours as nb
from ssl_kd.select.dedup import leaked, near_duplicates
from ssl_kd.select.files import build_selection, write_selection
from ssl_kd.select.report import build_report
from ssl_kd.select.topk import (
    SCORE_BINS,
    SELECTORS,
    TopK,
    candidates_of,
    image_ids,
    otsu_floor,
    repeats,
    split_ids,
    top1_histogram,
)


@dataclass(frozen=True)
class SelectConfig:
    """``ssl-kd select``."""

    labels: str = option(help="directory of label files (from ssl-kd label)")
    out: str = option(help="output directory")
    per_class: int = option(help="K: images kept per class", min=1)
    top_p: int = option(10, help="P: classes per image that are candidates (<= stored k)", min=1)
    upsample: bool = option(False, help="repeat the images of short classes up to K")
    min_score: float | None = option(None, help="drop candidates scoring below this", min=0)
    score_floor: Literal["none", "otsu"] = option(
        "none",
        help="a per-class floor for open-set pools: otsu drops a class's candidates scoring "
        "below Otsu's threshold of the top-1 scores of the images whose top-1 it is",
    )
    dedup: float | None = option(
        None, help="drop near-duplicates at cosine >= this (needs embeddings)", gt=0, max=1
    )
    decontaminate: str | None = option(
        None, help="label dir of the evaluation set: drop its near-duplicates (needs embeddings)"
    )
    leak_threshold: float = option(0.95, help="cosine counted as a leak of --decontaminate", gt=0)
    executor: Literal["ray", "local"] = option(
        "ray", help="Ray tasks over label files, or local", operational=True
    )
    max_retries: int = option(
        2, help="retries of a Ray task whose worker or node died", min=0, operational=True
    )
    kselect: Literal["faiss", "numpy"] = option(
        "faiss", help="per-class top-K by faiss heaps or numpy sorted merges (same result)"
    )
    labeled_labels: str | None = option(
        None, help="label dir of the labeled shards (same teacher, --embeddings; truth: .cls)"
    )
    rank_by: Literal["confidence", "propagation", "vote"] = option(
        "confidence", help="rank by the teacher, label propagation or a kNN vote of labeled images"
    )
    shortlist: int | None = option(
        None,
        help="candidates per class, by teacher score, that rank_by re-ranks (default 2K)",
        min=1,
    )
    neighbours: int = option(50, help="k of the kNN graph (propagation) and of the vote", min=1)
    weights: Literal["none", "certainty", "certainty_balance"] = option(
        "none", help="a per-image weight from the neighbours' certainty (and class balance)"
    )
    far_floor: float | None = option(
        None,
        help="drop candidates less like their class's labeled images than its Q-quantile one",
        min=0,
        max=1,
    )

    def validate(self) -> None:
        """Cross-field checks (called by the config loader)."""
        if nb.asked(self) and self.labeled_labels is None:
            raise ConfigError("labeled_labels", "is needed by rank_by, weights and far_floor")


def partial_topk(
    files: list[tuple[int, str]],
    num_classes: int,
    per_class: int,
    top_p: int,
    min_score: float | None,
    method: str = "faiss",
) -> TopK:
    """The exact per-class top-K of a group of label files ``(file index, path)``.

    Files are offered in ascending index and each file's rows in key order, so candidates come
    in ascending image id (what :class:`HeapSelector` needs); the next file is read while this
    one is selected.
    """
    selector = SELECTORS[method](num_classes, per_class)
    top1 = np.zeros((num_classes, SCORE_BINS), np.int64)
    for file_index, table in _read_ahead(sorted(files), ["key", "topk_class", "topk_prob"]):
        n = table.num_rows
        if n == 0:
            continue
        in_key_order = pc.sort_indices(table.column("key")).to_numpy()
        topk_class = fixed_list(table.column("topk_class"), n)[in_key_order]
        topk_prob = fixed_list(table.column("topk_prob"), n)[in_key_order]
        top1 += top1_histogram(topk_class, topk_prob, num_classes)
        cls_ids, score, rank = candidates_of(topk_class, topk_prob, top_p, min_score)
        selector.add(cls_ids, score, image_ids(file_index, rank))
    best = selector.result()
    best.top1 = top1
    return best


def _read_ahead(files: list[tuple[int, str]], columns: list[str]) -> Iterator[tuple[int, pa.Table]]:
    """``(index, table)`` of each file, the next one read in a thread meanwhile."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for index, path in files:
            nxt = pool.submit(pq.read_table, path, columns=columns)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (index, nxt)
        if pending is not None:
            yield pending[0], pending[1].result()


def _partials(cfg: SelectConfig, labels: LabelSet) -> list[TopK]:
    """Partial top-Ks of groups of label files: one group in-process, a few per CPU on Ray."""
    files = list(enumerate(str(p) for p in labels.files))
    per_class = nb.shortlist_size(cfg.per_class, cfg.rank_by, cfg.shortlist)
    args = (labels.meta.num_classes, per_class, cfg.top_p, cfg.min_score, cfg.kselect)
    if cfg.executor == "local":
        groups, fn = 1, partial_topk
    else:
        # A few groups per CPU: enough to balance the load, few enough that each group's lists
        # fill up and most of its candidates are rejected by a compare.
        cpus = int(cluster_resources().get("CPU", 1))
        groups, fn = max(1, min(len(files), 2 * cpus)), _single_threaded_partial
    parts: list[TopK] = [TopK.empty(0, 0)] * groups

    def done(g: int, part: TopK, attempts: int) -> None:
        parts[g] = part

    map_tasks(
        fn,
        groups,
        lambda g: (files[g::groups], *args),
        executor=cfg.executor,
        on_done=done,
        max_retries=cfg.max_retries,  # a lost node's tasks: reading label files again is safe
        window=groups,
    )
    return parts


def _single_threaded_partial(*args: Any) -> TopK:
    # One Ray task per CPU: faiss's own threads would oversubscribe the cores.
    faiss.omp_set_num_threads(1)
    return partial_topk(*args)


def _rows(
    labels: LabelSet, best: TopK, columns: list[str]
) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """The selected rows (only those read) and their class, score and image id, in (class,
    rank) order."""
    filled = np.isfinite(best.score)
    cls_ids = np.nonzero(filled)[0]  # row-major: class, then rank
    score = best.score[filled]
    image = best.image[filled]
    files, ranks = split_ids(image)
    pieces, positions = [], []
    for f in np.unique(files):
        mine = np.nonzero(files == f)[0]
        table = pq.read_table(labels.files[f], columns=columns)
        rows = pc.sort_indices(table.column("key")).to_numpy()[ranks[mine]]
        pieces.append(table.take(pa.array(rows)).replace_schema_metadata(None))
        positions.append(mine)
    table = pa.concat_tables(pieces, promote_options="permissive")
    table = table.take(pa.array(np.argsort(np.concatenate(positions))))
    return table, cls_ids, score, image


def run_select(cfg: SelectConfig) -> dict[str, Any]:
    """Select, write ``selection.parquet`` and ``report.json``; returns the report."""
    labels = LabelSet(cfg.labels)
    meta = labels.meta
    if cfg.top_p > meta.k:
        raise UserError(
            f"--top-p {cfg.top_p} exceeds the {meta.k} classes stored per image in {cfg.labels}; "
            f"use --top-p <= {meta.k} or relabel with a larger --k"
        )
    filtering = cfg.dedup is not None or cfg.decontaminate is not None
    if filtering and not meta.embedding_dim:
        raise UserError(
            f"--dedup and --decontaminate compare embeddings, and {cfg.labels} has none: "
            "relabel with ssl-kd label --embeddings"
        )
    reference = _eval_embeddings(cfg.decontaminate, meta) if cfg.decontaminate else None
    labeled = nb.read_labeled(cfg.labeled_labels, meta, cfg.labels) if nb.asked(cfg) else None
    t0 = time.perf_counter()
    best, *rest = _partials(cfg, labels)
    for part in rest:
        best.merge(part)
    out = cfg.out
    if best.selected_counts().sum() == 0:
        raise UserError(f"no candidates in {cfg.labels} (empty files, or --min-score too high)")
    t_select = time.perf_counter()
    # Embeddings travel with the selection (to the student's shards) whenever they were stored.
    columns = ["key", "shard", "topk_class", "topk_prob"] + (
        ["embedding"] if meta.embedding_dim else []
    )
    table, cls_ids, score, image = _rows(labels, best, columns)
    removed = {
        "duplicates": np.zeros(meta.num_classes, np.int64),
        "leaked": np.zeros(meta.num_classes, np.int64),
        "below_floor": np.zeros(meta.num_classes, np.int64),
    }
    floors = np.zeros(meta.num_classes)
    if cfg.score_floor == "otsu":
        floors = np.array([otsu_floor(h) for h in best.top1])
        above = score >= floors[cls_ids]
        removed["below_floor"] += np.bincount(cls_ids[~above], minlength=meta.num_classes)
        table = table.filter(pa.array(above))
        cls_ids, score, image = cls_ids[above], score[above], image[above]
    if filtering:
        keep = _filter(cfg, table, cls_ids, score, image, reference, removed)
        table = table.filter(pa.array(keep))
        cls_ids, score, image = cls_ids[keep], score[keep], image[keep]
    checked = None
    if labeled is not None:  # floored, re-ranked and weighed by the labeled images
        checked = nb.check_candidates(cfg, labeled, table, cls_ids, score, image)
        table, cls_ids, score = checked.table, checked.cls_ids, checked.score
    selected = np.bincount(cls_ids, minlength=meta.num_classes)
    starts = np.concatenate([[0], np.cumsum(selected)[:-1]])
    rank = np.arange(len(cls_ids)) - np.repeat(starts, selected)
    rep = _copies(cfg, selected)
    weight = None
    if checked is not None:
        weight = nb.row_weights(cfg.weights, checked, rep, meta.num_classes)
    table = build_selection(table, cls_ids, score, rank, rep, weight)
    report = build_report(cfg, meta.classes, best, cls_ids, score, rep, removed, floors)
    if checked is not None:
        report["neighbours"] = checked.report
    t_rows = time.perf_counter()
    write_selection(table, _with_sources(meta, cfg.labels), out)
    report["seconds"] = {
        "select": round(t_select - t0, 3),
        "rows_and_filters": round(t_rows - t_select, 3),
        "write": round(time.perf_counter() - t_rows, 3),
    }
    atomic.write_text(storage.join(out, "report.json"), json.dumps(report, indent=2) + "\n")
    cfglib.save(cfg, storage.join(out, "config.yaml"))
    return report


def _copies(cfg: SelectConfig, selected: np.ndarray) -> np.ndarray:
    """Copies of each selected row (class-major): 1, or enough to fill short classes to K."""
    rep = np.ones(int(selected.sum()), np.int64)
    if cfg.upsample:
        start = 0
        for n in selected:  # one contiguous run per class
            if 0 < n < cfg.per_class:
                rep[start : start + n] = repeats(int(n), cfg.per_class)
            start += n
    return rep


def _with_sources(meta: LabelMeta, labels: str) -> LabelMeta:
    """The labels' metadata naming every shard spec labeled into ``labels`` (the first file's
    metadata names only the specs known when it was written)."""
    try:
        return meta.with_shard_spec(recorded_shard_spec(labels))
    except UserError:  # no provenance recorded: materialize will ask for --shards
        return meta


def _eval_embeddings(directory: str, meta: LabelMeta) -> np.ndarray:
    """All embeddings of the evaluation labels, which must come from the same teacher."""
    evals = LabelSet(directory)
    if evals.meta.teacher_sha256 != meta.teacher_sha256 or not evals.meta.embedding_dim:
        raise UserError(
            f"--decontaminate {directory} must be labeled by the same teacher with --embeddings"
        )
    parts = [
        fixed_list(b.column("embedding"), b.num_rows)
        for b in evals.iter_batches(columns=["embedding"])
    ]
    return np.concatenate(parts).astype(np.float32)


def _filter(
    cfg: SelectConfig,
    table: pa.Table,
    cls_ids: np.ndarray,
    score: np.ndarray,
    image: np.ndarray,
    reference: np.ndarray | None,
    removed: dict[str, np.ndarray],
) -> np.ndarray:
    """Row mask after dropping leaked images, then near-duplicates (counts into ``removed``).

    An image selected for several classes is one image: it is judged once, with its best score.
    """
    images, first, inverse = np.unique(image, return_index=True, return_inverse=True)
    priority = np.full(len(images), -np.inf, np.float32)
    np.maximum.at(priority, inverse, score)
    emb = fixed_list(table.column("embedding"), len(image))[first].astype(np.float32)
    leak = np.zeros(len(images), bool)
    if reference is not None:
        leak = leaked(emb, reference, cfg.leak_threshold)
    dup = np.zeros(len(images), bool)
    if cfg.dedup is not None:
        rest = np.nonzero(~leak)[0]
        dup[rest] = near_duplicates(emb[rest], priority[rest], cfg.dedup)
    n_cls = len(removed["leaked"])
    removed["leaked"] += np.bincount(cls_ids[leak[inverse]], minlength=n_cls)
    removed["duplicates"] += np.bincount(cls_ids[dup[inverse]], minlength=n_cls)
    return ~(leak | dup)[inverse]
