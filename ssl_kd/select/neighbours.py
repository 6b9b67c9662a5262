"""The selection's candidates checked against the labeled images (``ssl-kd select --rank-by``,
``--weights``, ``--far-floor``), on the teacher embeddings that ``ssl-kd label --embeddings``
stored; the arithmetic is :mod:`ssl_kd.select.propagate`'s.

The labeled images come as another label directory (``--labeled-labels``: the labeled shards
labeled by the same teacher with ``--embeddings``); their true classes are the ``.cls`` members
of those shards, read by (shard, key), because label files keep no true label.

On the rows that top-K selection, the score floor and the duplicate and leak filters left (a
shortlist of candidates per class, see :func:`shortlist_size`):

1. ``far_floor`` drops a row whose image sits further from the labeled images of its class
   than that quantile of the class's own labeled images do (an open-set pool's strangers);
2. the neighbours' distribution of every remaining image is computed once: label propagation
   over a kNN graph of the labeled and candidate images (``propagation``), or the vote of its
   nearest labeled images (``vote``);
3. ``rank_by`` other than ``confidence`` re-ranks each class's rows by the neighbours'
   probability of the class (ties: shard, then key) and keeps the best K;
4. a row's certainty is the image's ``ω = 1 − H / log C`` (over the largest ω of the images
   checked, as the paper's code does) scaled by the neighbours' probability of the row's class
   over their top one, so a row whose neighbours confidently name another class weighs little;
   ``certainty_balance`` multiplies it by the class's ``ζ_c``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ssl_kd.errors import UserError
from ssl_kd.label.files import LabelMeta, LabelSet, fixed_list, shard_locations
from ssl_kd.select.propagate import (
    balance_weights,
    certainty,
    class_floors,
    class_similarity,
    neighbour_vote,
    propagate,
    relative,
    unit_rows,
)
from ssl_kd.shards.classes import dataset_info_near
from ssl_kd.shards.reader import ReadStats, iter_shard, read_label
from ssl_kd.shards.skips import SampleError

RANK_BY = ("confidence", "propagation", "vote")
WEIGHTS = ("none", "certainty", "certainty_balance")


class Options(Protocol):
    """What ``ssl-kd select`` asks of the neighbours (keys of its config)."""

    per_class: int
    rank_by: str
    neighbours: int
    weights: str
    far_floor: float | None


def asked(opts: Options) -> bool:
    """Whether the config asks anything of the labeled images."""
    return opts.rank_by != "confidence" or opts.weights != "none" or opts.far_floor is not None


def distribution_of(opts: Options) -> str | None:
    """Which neighbours' distribution is needed: the ranking's, else propagation's for the
    weights, else none."""
    if opts.rank_by != "confidence":
        return opts.rank_by
    return "propagation" if opts.weights != "none" else None


def shortlist_size(per_class: int, rank_by: str, shortlist: int | None) -> int:
    """Candidates per class that top-K selection keeps: K, or with a re-ranking the shortlist
    (default 2K) that the neighbours then cut to K."""
    if rank_by == "confidence":
        return per_class
    return max(per_class, shortlist or 2 * per_class)


@dataclass(frozen=True)
class Labeled:
    """The labeled images: unit embeddings and true classes."""

    embedding: np.ndarray  # (n, d) float32
    cls: np.ndarray  # (n,) int64
    num_classes: int


def read_labeled(directory: str | None, meta: LabelMeta, labels: str) -> Labeled:
    """The embeddings of the label directory ``directory`` with every image's true class from
    its shard; UserError unless the same teacher labeled them and the pool ``labels`` with
    embeddings, and every class has a labeled image."""
    if directory is None:
        raise UserError("--rank-by, --weights and --far-floor need --labeled-labels DIR")
    if not meta.embedding_dim:
        raise UserError(
            f"--rank-by, --weights and --far-floor compare embeddings, and {labels} has none: "
            "relabel with ssl-kd label --embeddings"
        )
    theirs = LabelSet(directory)
    if not theirs.meta.embedding_dim:
        raise UserError(
            f"--labeled-labels {directory} has no embeddings: label the labeled shards with "
            "ssl-kd label --embeddings"
        )
    if theirs.meta.teacher_sha256 != meta.teacher_sha256:
        raise UserError(
            f"--labeled-labels {directory} and {labels} come from different teachers: label "
            "the labeled shards with the teacher that labeled the pool"
        )
    if theirs.meta.embedding_dim != meta.embedding_dim:
        raise UserError(
            f"--labeled-labels {directory} holds {theirs.meta.embedding_dim}-d embeddings and "
            f"{labels} {meta.embedding_dim}-d"
        )
    columns = ["key", "shard", "embedding"]
    table = pa.concat_tables(pq.read_table(p, columns=columns) for p in theirs.files)
    emb = fixed_list(table.column("embedding"), table.num_rows).astype(np.float32)
    truth = _true_classes(directory, table, meta)
    counts = np.bincount(truth, minlength=meta.num_classes)
    if (counts == 0).any():
        missing = [meta.classes[c] for c in np.flatnonzero(counts == 0)]
        raise UserError(
            f"--labeled-labels {directory} has no image of class {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}: every class needs labeled images"
        )
    return Labeled(unit_rows(emb), truth, meta.num_classes)


def _true_classes(directory: str, table: pa.Table, meta: LabelMeta) -> np.ndarray:
    """The ``.cls`` of every (shard, key) of ``table``, read from the shards it was labeled
    from."""
    shards = table.column("shard").cast(pa.string()).to_pylist()
    keys = table.column("key").to_pylist()
    by_name = shard_locations(directory)
    truth: dict[tuple[str, str], int] = {}
    for name in sorted(set(shards)):
        url = by_name.get(name)
        if url is None:
            raise UserError(f"shard {name} of --labeled-labels {directory} is not found")
        info = dataset_info_near([url]) or {}
        if info.get("classes") not in (None, meta.classes):
            raise UserError(
                f"the labeled shards' classes ({', '.join(info['classes'][:5])} ...) are not "
                f"the teacher's ({', '.join(meta.classes[:5])} ...)"
            )
        for sample in iter_shard(url, ReadStats()):
            try:
                cls = read_label(sample)
            except SampleError as exc:
                raise UserError(
                    f"image {sample['__key__']} of {url} has no usable class ({exc}): "
                    "--labeled-labels must label the labeled shards"
                ) from None
            if cls >= meta.num_classes:
                raise UserError(
                    f"image {sample['__key__']} of {url} has class {cls}, and the teacher has "
                    f"{meta.num_classes} classes"
                )
            truth[name, sample["__key__"]] = cls
    missing = next((w for w in zip(shards, keys, strict=True) if w not in truth), None)
    if missing is not None:
        raise UserError(f"image {missing[1]} of shard {missing[0]} is not in that shard")
    return np.array([truth[w] for w in zip(shards, keys, strict=True)], np.int64)


@dataclass(frozen=True)
class Checked:
    """The rows that passed, in their new order (class-major, best first)."""

    table: pa.Table
    cls_ids: np.ndarray  # (rows,) int64
    score: np.ndarray  # (rows,) float32: the score they are ranked by
    certainty: np.ndarray  # (rows,) float32: 1 when no distribution was computed
    report: dict[str, Any]


def check_candidates(
    opts: Options,
    labeled: Labeled,
    table: pa.Table,
    cls_ids: np.ndarray,
    score: np.ndarray,
    image: np.ndarray,
) -> Checked:
    """Floor, re-rank and weigh selection rows: ``table`` (with their ``embedding``), and the
    class, score and image id of each row, class-major and best first."""
    start = time.perf_counter()
    num_classes = labeled.num_classes
    _, first, inverse = np.unique(image, return_index=True, return_inverse=True)
    emb = unit_rows(fixed_list(table.column("embedding"), table.num_rows)[first])
    keep = np.ones(len(cls_ids), bool)
    floors = np.full(num_classes, -np.inf, np.float32)
    if opts.far_floor is not None:
        floors = class_floors(labeled.embedding, labeled.cls, num_classes, opts.far_floor)
        sims = class_similarity(emb[inverse], cls_ids, labeled.embedding, labeled.cls, num_classes)
        keep = sims >= floors[cls_ids]
    rows = np.flatnonzero(keep)
    # Only images that kept a row take part: strangers would pull on the graph's labels.
    used, row_image = np.unique(inverse[rows], return_inverse=True)
    kind = distribution_of(opts)
    probs = _distribution(kind, labeled, emb[used], opts.neighbours)
    if probs is not None and opts.rank_by != "confidence":
        cls_kept = cls_ids[rows]
        new = probs[row_image, cls_kept]
        # Ties: lower image id first, as in top-K selection (shard, then key).
        order = np.lexsort((image[rows], -new, cls_kept))
        rank = np.arange(len(order)) - np.searchsorted(cls_kept[order], cls_kept[order])
        order = order[rank < opts.per_class]
        rows, row_image, score_out = rows[order], row_image[order], new[order]
    else:
        score_out = score[rows]
    sure = np.ones(len(rows), np.float32)
    agree = None
    if probs is not None:
        theirs = probs[row_image]
        mine = theirs[np.arange(len(rows)), cls_ids[rows]]
        sure = relative(certainty(probs))[row_image] * mine / theirs.max(axis=1)
        agree = theirs.argmax(axis=1) == cls_ids[rows]
    far = np.bincount(cls_ids[~keep], minlength=num_classes)
    report = _report(opts, kind, labeled, len(used), floors, far, cls_ids[rows], agree)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return Checked(
        table.take(pa.array(rows)),
        cls_ids[rows],
        score_out.astype(np.float32),
        sure.astype(np.float32),
        report,
    )


def _distribution(kind: str | None, labeled: Labeled, emb: np.ndarray, k: int) -> np.ndarray | None:
    """(images, C): the neighbours' distribution of each image, or None when none is asked."""
    args = (labeled.embedding, labeled.cls, emb, labeled.num_classes, k)
    if kind == "propagation":
        return propagate(*args).probs
    if kind == "vote":
        return neighbour_vote(*args)
    return None


def row_weights(
    kind: str, checked: Checked, repeat: np.ndarray, num_classes: int
) -> np.ndarray | None:
    """float32 weight of each selected row (None for ``none``): its certainty, times with
    ``certainty_balance`` the ``ζ`` of its class over the samples written (repeats counted),
    so classes that the selection left short weigh more."""
    if kind == "none":
        return None
    if kind == "certainty":
        return checked.certainty
    if kind == "certainty_balance":
        zeta = balance_weights(np.repeat(checked.cls_ids, repeat), num_classes)
        return (checked.certainty * zeta[checked.cls_ids]).astype(np.float32)
    raise ValueError(f"unknown weights {kind!r}; choose one of {', '.join(WEIGHTS)}")


def _report(
    opts: Options,
    kind: str | None,
    labeled: Labeled,
    images: int,
    floors: np.ndarray,
    far: np.ndarray,
    cls_ids: np.ndarray,
    agree: np.ndarray | None,
) -> dict[str, Any]:
    """The ``neighbours`` section of ``report.json``."""
    per_class = []
    for c in range(len(floors)):
        mine = cls_ids == c
        per_class.append(
            {
                "class": c,
                "far_floor": float(floors[c]) if np.isfinite(floors[c]) else None,
                "far_removed": int(far[c]),
                # Share of the class's rows whose neighbours' top class is the class.
                "agreement": float(agree[mine].mean())
                if agree is not None and mine.any()
                else None,
            }
        )
    return {
        "rank_by": opts.rank_by,
        "distribution": kind,
        "weights": opts.weights,
        "neighbours": opts.neighbours,
        "labeled_images": len(labeled.cls),
        "images_checked": images,
        "far_removed": int(far.sum()),
        "agreement": float(agree.mean()) if agree is not None and len(agree) else None,
        "per_class": per_class,
    }
