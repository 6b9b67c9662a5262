"""Exact streaming per-class top-K selection over pseudo-labels (no Ray, no I/O).

Every image is a candidate for each of its top-P classes with the teacher's probability as
score; each class keeps its K best candidates. Ties are broken by (shard, key) ascending, so the
result does not depend on file order, batch size or how the work was split. Memory is O(C·K)
plus one batch, whatever the number of images.

An image is identified by one int64, ``file index << 32 | rank of its key in the file``, which
orders images as (shard, key) do; the lower the id, the better on equal scores.

Two selectors compute the same answer (tests hold both to a brute force):

- :class:`HeapSelector` — faiss heaps, one per class (``faiss.ResultHeap``), fed class-major
  blocks. Candidates must come in ascending image id, which makes faiss's strict comparison
  reject an equal-scored newcomer exactly when our tie rule would.
- :class:`MergeSelector` — numpy: candidates that beat a class's current K-th are buffered and
  merged in bulk by one sort.

``bench/select_scale.py`` times both; the stage defaults to the faster (faiss).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import faiss
import numpy as np

NO_IMAGE = np.iinfo(np.int64).max
SCORE_BINS = 256  # of the top-1 score histograms, over [0, 1]


def image_ids(file_index: int, ranks: np.ndarray) -> np.ndarray:
    """Image ids of the rows of one label file, given each row's rank in key order."""
    return (np.int64(file_index) << np.int64(32)) | np.asarray(ranks, np.int64)


def split_ids(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(file index, key rank) of image ids."""
    return image >> np.int64(32), image & np.int64(0xFFFFFFFF)


@dataclass
class TopK:
    """The K best candidates per class (score desc, image id asc) and candidate counts."""

    score: np.ndarray  # (C, K) float32, -inf where empty
    image: np.ndarray  # (C, K) int64, NO_IMAGE where empty
    candidates: np.ndarray  # (C,) int64: candidates offered (after min_score)
    # (C, SCORE_BINS) int64: per class, the histogram of the top-1 scores of the images whose
    # top-1 it is (what a per-class score floor is chosen from)
    top1: np.ndarray = field(default_factory=lambda: np.zeros((0, SCORE_BINS), np.int64))

    @classmethod
    def empty(cls, num_classes: int, per_class: int) -> TopK:
        """No candidates yet."""
        return cls(
            np.full((num_classes, per_class), -np.inf, np.float32),
            np.full((num_classes, per_class), NO_IMAGE, np.int64),
            np.zeros(num_classes, np.int64),
            np.zeros((num_classes, SCORE_BINS), np.int64),
        )

    @property
    def per_class(self) -> int:
        """Candidates kept per class (K)."""
        return self.score.shape[1]

    def selected_counts(self) -> np.ndarray:
        """Selected candidates per class (< K where a class ran short)."""
        return np.isfinite(self.score).sum(axis=1)

    def merge(self, other: TopK) -> None:
        """Fold in another partial result (e.g. of other files): exact, order-independent."""
        # Partials returned by Ray are zero-copy, read-only views of the object store.
        for name in ("score", "image", "candidates", "top1"):
            if not getattr(self, name).flags.writeable:
                setattr(self, name, getattr(self, name).copy())
        filled = np.isfinite(other.score)
        self.candidates += other.candidates
        if other.top1.size:  # a selector's own result has no histogram
            self.top1 = self.top1 + other.top1 if self.top1.size else other.top1.copy()
        self.absorb(np.nonzero(filled)[0], other.score[filled], other.image[filled])

    def beats_kth(self, cls_ids: np.ndarray, score: np.ndarray, image: np.ndarray) -> np.ndarray:
        """Which candidates would enter their class's list now."""
        # A contiguous copy of the K-th column: gathers from C values stay in cache.
        worst = np.ascontiguousarray(self.score[:, -1])[cls_ids]
        beats = score > worst
        equal = np.flatnonzero(score == worst)
        if len(equal):
            beats[equal] = image[equal] < self.image[cls_ids[equal], -1]
        return beats

    def absorb(self, cls_ids: np.ndarray, score: np.ndarray, image: np.ndarray) -> None:
        """Merge candidates into the lists (not counted in ``candidates``): one sort."""
        enters = self.beats_kth(cls_ids, score, image)
        if not enters.any():
            return
        cls_ids, score, image = cls_ids[enters], score[enters], image[enters]
        touched = np.flatnonzero(np.bincount(cls_ids, minlength=len(self.candidates)))
        per_class = self.per_class
        # The filled part of the touched classes' lists, followed by the newcomers.
        cur = np.isfinite(self.score[touched])
        all_cls = np.concatenate([np.repeat(touched, per_class)[cur.ravel()], cls_ids])
        all_score = np.concatenate([self.score[touched][cur], score])
        all_image = np.concatenate([self.image[touched][cur], image])
        order = _sort_order(_class_score_key(all_cls, all_score), all_image)
        start = np.searchsorted(all_cls[order], touched)
        counts = np.diff(np.append(start, len(order)))
        rank = np.arange(len(order)) - np.repeat(start, counts)
        keep = order[rank < per_class]
        # Scatter back: class row, rank column; slots past a short class's count stay empty.
        rows = np.repeat(touched, np.minimum(counts, per_class))
        cols = rank[rank < per_class]
        self.score[touched], self.image[touched] = -np.inf, NO_IMAGE
        self.score[rows, cols] = all_score[keep]
        self.image[rows, cols] = all_image[keep]


class Selector(Protocol):
    """Streaming per-class top-K: offer candidates, then take the result once."""

    def add(self, cls_ids: np.ndarray, score: np.ndarray, image: np.ndarray) -> None: ...

    def result(self) -> TopK: ...


@dataclass
class MergeSelector:
    """numpy: candidates that beat the current K-th are buffered and merged by one sort.

    A merge re-sorts the touched lists, so fewer, larger merges are cheaper: the buffer is
    flushed once it holds C·K candidates.
    """

    best: TopK
    _pending: list = field(default_factory=list)
    _pending_size: int = 0

    @classmethod
    def create(cls, num_classes: int, per_class: int) -> MergeSelector:
        """An empty selector."""
        return cls(TopK.empty(num_classes, per_class))

    def add(self, cls_ids: np.ndarray, score: np.ndarray, image: np.ndarray) -> None:
        """Offer candidates (1-D arrays of equal length, any order)."""
        best = self.best
        best.candidates += np.bincount(cls_ids, minlength=len(best.candidates))
        score = score.astype(np.float32)
        enters = best.beats_kth(cls_ids, score, image)
        self._pending.append((cls_ids[enters], score[enters], image[enters]))
        self._pending_size += int(enters.sum())
        if self._pending_size >= best.score.size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            parts = [np.concatenate(x) for x in zip(*self._pending, strict=True)]
            self._pending, self._pending_size = [], 0
            self.best.absorb(*parts)

    def result(self) -> TopK:
        """The lists, all candidates merged."""
        self._flush()
        return self.best


class HeapSelector:
    """faiss: one min-heap of size K per class; newcomers must beat the heap's root.

    Candidates must be offered in ascending image id (equal ids: one image in several classes).
    faiss replaces a root only on a strictly better score, so an equal-scored later (higher id)
    candidate is rejected, as our tie rule wants. Heap ids are ``-2 - image``: among equal
    scores faiss evicts the smallest id first, which must be our highest image id, and faiss
    takes id -1 for an empty slot, which no image may map to.
    """

    def __init__(self, num_classes: int, per_class: int) -> None:
        self._heap = faiss.ResultHeap(num_classes, per_class, keep_max=True)
        self._candidates = np.zeros(num_classes, np.int64)
        self._last = np.int64(-1)

    def add(self, cls_ids: np.ndarray, score: np.ndarray, image: np.ndarray) -> None:
        """Offer candidates (1-D arrays of equal length) in ascending image id."""
        if len(image) == 0:
            return
        if image[0] < self._last or np.any(image[1:] < image[:-1]):
            raise ValueError("HeapSelector needs candidates in ascending image id")
        self._last = image[-1]
        num_classes = len(self._candidates)
        self._candidates += np.bincount(cls_ids, minlength=num_classes)
        score = score.astype(np.float32, copy=False)
        # The root of each heap is its class's current K-th score: most candidates stop here.
        enters = score > np.ascontiguousarray(self._heap.D[:, 0])[cls_ids]
        for subset, d, i in _class_major_blocks(
            cls_ids[enters], score[enters], _heap_id(image[enters]), num_classes
        ):
            if subset is None:
                self._heap.add_result(d, i)
            else:
                self._heap.add_result_subset(subset, d, i)

    def result(self) -> TopK:
        """The lists in (score desc, image asc) order."""
        self._heap.finalize()
        score, image = self._heap.D, _heap_id(self._heap.I)
        empty = score < 0  # faiss's neutral value; probabilities are >= 0
        score[empty], image[empty] = -np.inf, NO_IMAGE
        # finalize() sorts by score only; order equal scores by image id.
        c, per_class = score.shape
        order = _sort_order(
            _class_score_key(np.repeat(np.arange(c), per_class), score.ravel()), image.ravel()
        )
        rows = order.reshape(c, per_class)  # classes stay in their rows: the class is the major key
        return TopK(score.ravel()[rows], image.ravel()[rows], self._candidates)


def _heap_id(ids: np.ndarray) -> np.ndarray:
    """image id <-> faiss heap id (its own inverse): order-reversing, never -1."""
    return np.int64(-2) - ids


SELECTORS = {"faiss": HeapSelector, "numpy": MergeSelector.create}


def _class_major_blocks(
    cls_ids: np.ndarray, score: np.ndarray, ids: np.ndarray, num_classes: int
) -> Iterator[tuple[np.ndarray | None, np.ndarray, np.ndarray]]:
    """(classes or None for all, scores, ids) blocks of shape (classes, width), -inf padded.

    Candidates are grouped by class keeping their order; a class with more candidates than the
    width continues in further blocks that cover only the classes still going, so padding stays
    within one block's width per class however skewed the classes are.
    """
    n = len(cls_ids)
    if n == 0:
        return
    # Stable keeps ascending ids within a class; on 16-bit ints numpy's stable sort is a radix sort.
    small = cls_ids.astype(np.uint16) if num_classes <= 1 << 16 else cls_ids
    order = np.argsort(small, kind="stable")
    counts = np.bincount(cls_ids, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    by_class = cls_ids[order]
    pos = np.arange(n) - starts[by_class]
    width = max(16, 2 * n // num_classes)
    for first in range(0, int(counts.max()), width):
        subset = np.flatnonzero(counts > first)
        mine = np.flatnonzero((pos >= first) & (pos < first + width))
        row_of = np.zeros(num_classes, np.int64)
        row_of[subset] = np.arange(len(subset))
        d = np.full((len(subset), width), -np.inf, np.float32)
        i = np.full((len(subset), width), -1, np.int64)
        r, col = row_of[by_class[mine]], pos[mine] - first
        d[r, col] = score[order[mine]]
        i[r, col] = ids[order[mine]]
        yield (None if len(subset) == num_classes else subset), d, i


def _sort_order(key: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """The permutation sorting by (key, tie), as ``np.lexsort((tie, key))`` but ~2x faster.

    Two unstable argsorts and one plain sort of packed int64 values (numpy's vectorised sort)
    replace lexsort's two indirect stable sorts: equal keys are numbered densely, and the
    (dense number, rank of tie) pairs, both < 2**32, are sorted packed in one int64.
    """
    n = len(key)
    by_key = np.argsort(key)
    sorted_key = key[by_key]
    dense = np.empty(n, np.int64)
    dense[by_key] = np.cumsum(np.concatenate([[0], sorted_key[1:] != sorted_key[:-1]]))
    by_tie = np.argsort(tie)
    tie_rank = np.empty(n, np.int64)
    tie_rank[by_tie] = np.arange(n, dtype=np.int64)
    packed = (dense << np.int64(32)) | tie_rank
    packed.sort()
    return by_tie[packed & np.int64(0xFFFFFFFF)]


def _class_score_key(cls_ids: np.ndarray, score: np.ndarray) -> np.ndarray:
    """One int64 sorting as (class ascending, score descending). Scores are finite and
    non-negative float32 (bit patterns order like the values) or -inf (empty, sorts last)."""
    bits = score.astype(np.float32).view(np.int32).astype(np.int64)
    bits[score == 0] = 0  # -0.0 as 0.0
    bits[np.isneginf(score)] = -1
    return (cls_ids.astype(np.int64) << 32) | (0x7FFFFFFF - bits)


def candidates_of(
    topk_class: np.ndarray, topk_prob: np.ndarray, top_p: int, min_score: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class, score, row) for each image's top-P classes, scores below ``min_score`` dropped."""
    n = topk_class.shape[0]
    cls_ids = topk_class[:, :top_p].astype(np.int64).ravel()
    score = topk_prob[:, :top_p].astype(np.float32).ravel()
    rows = np.repeat(np.arange(n, dtype=np.int64), top_p)
    if min_score is not None:
        ok = score >= min_score
        cls_ids, score, rows = cls_ids[ok], score[ok], rows[ok]
    return cls_ids, score, rows


def top1_histogram(topk_class: np.ndarray, topk_prob: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, SCORE_BINS) counts of the images' top-1 scores, by their top-1 class."""
    cls = topk_class[:, 0].astype(np.int64)
    bins = np.minimum((topk_prob[:, 0] * SCORE_BINS).astype(np.int64), SCORE_BINS - 1)
    counts = np.bincount(cls * SCORE_BINS + bins, minlength=num_classes * SCORE_BINS)
    return counts.reshape(num_classes, SCORE_BINS)


def otsu_floor(hist: np.ndarray) -> float:
    """Otsu's threshold of one class's score histogram: the score that splits it into the two
    groups with the largest between-group variance, in the middle of the gap when the groups
    are apart (0.0 when it holds one value or none)."""
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0 or np.count_nonzero(hist) < 2:
        return 0.0
    centers = (np.arange(len(hist)) + 0.5) / len(hist)
    w0 = np.cumsum(hist)[:-1]  # below each cut (cut after bin i)
    w1 = total - w0
    s0 = np.cumsum(hist * centers)[:-1]
    m0 = np.divide(s0, w0, out=np.zeros_like(s0), where=w0 > 0)
    m1 = np.divide((hist * centers).sum() - s0, w1, out=np.zeros_like(s0), where=w1 > 0)
    between = w0 * w1 * (m0 - m1) ** 2
    # Every cut inside an empty gap between the groups scores the same: take the gap's middle.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((best[0] + best[-1]) / 2 + 1) / len(hist)


def repeats(selected: int, per_class: int) -> np.ndarray:
    """How often each of ``selected`` ranked samples is repeated to fill ``per_class``
    (upsampling)."""
    if selected == 0:
        return np.zeros(0, np.int64)
    base, extra = divmod(per_class, selected)
    out = np.full(selected, base, np.int64)
    out[:extra] += 1
    return out
