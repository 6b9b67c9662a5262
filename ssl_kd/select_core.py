"""Exact streaming per-class top-K selection over pseudo-labels (no Ray, no I/O).

Every image is a candidate for each of its top-P classes with the teacher's probability as
score; each class keeps its K best candidates. Ties are broken by (shard, key) ascending, so the
result does not depend on file order, batch size or how the work was split. Memory is O(C·K)
plus one batch, whatever the number of images: a candidate that cannot beat a full class's
current K-th best is dropped at once, and the rest are merged into that class's list.

A candidate is identified by two int64 numbers: ``tie`` (file index << 32 | rank of its key in
the file), which orders candidates as (shard, key) do, and ``ref`` (file index << 32 | row),
which finds the row again when the selection is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_TIE = np.iinfo(np.int64).max


def make_ids(file_index: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tie, ref) for the rows of one label file, given its keys in row order."""
    order = np.argsort(keys, kind="stable")
    rank = np.empty(len(keys), np.int64)
    rank[order] = np.arange(len(keys), dtype=np.int64)
    base = np.int64(file_index) << np.int64(32)
    return base | rank, base | np.arange(len(keys), dtype=np.int64)


@dataclass
class ClassTopK:
    """The K best (score desc, tie asc) candidates per class seen so far, and candidate counts."""

    score: np.ndarray  # (C, K) float32, -inf where empty
    tie: np.ndarray  # (C, K) int64, NO_TIE where empty
    ref: np.ndarray  # (C, K) int64
    candidates: np.ndarray  # (C,) int64: candidates offered (after min_score)

    @classmethod
    def empty(cls, num_classes: int, k: int) -> ClassTopK:
        """No candidates yet."""
        return cls(
            np.full((num_classes, k), -np.inf, np.float32),
            np.full((num_classes, k), NO_TIE, np.int64),
            np.full((num_classes, k), -1, np.int64),
            np.zeros(num_classes, np.int64),
        )

    @property
    def k(self) -> int:
        """Candidates kept per class."""
        return self.score.shape[1]

    def add(self, cls_ids: np.ndarray, score: np.ndarray, tie: np.ndarray, ref: np.ndarray) -> None:
        """Offer candidates (1-D arrays of equal length); keeps the best K per class."""
        np.add.at(self.candidates, cls_ids, 1)
        self._merge(cls_ids, score.astype(np.float32), tie, ref)

    def _merge(
        self, cls_ids: np.ndarray, score: np.ndarray, tie: np.ndarray, ref: np.ndarray
    ) -> None:
        # The current K-th entry of each class: a candidate must beat it to enter.
        worst_score = self.score[cls_ids, -1]
        worst_tie = self.tie[cls_ids, -1]
        enters = (score > worst_score) | ((score == worst_score) & (tie < worst_tie))
        if not enters.any():
            return
        cls_ids, score, tie, ref = cls_ids[enters], score[enters], tie[enters], ref[enters]
        touched = np.unique(cls_ids)
        k = self.k
        # Current lists of the touched classes, flattened, followed by the newcomers.
        all_cls = np.concatenate([np.repeat(touched, k), cls_ids])
        all_score = np.concatenate([self.score[touched].ravel(), score])
        all_tie = np.concatenate([self.tie[touched].ravel(), tie])
        all_ref = np.concatenate([self.ref[touched].ravel(), ref])
        order = np.lexsort((all_tie, -all_score, all_cls))
        sorted_cls = all_cls[order]
        start = np.searchsorted(sorted_cls, touched)
        rank = np.arange(len(order)) - np.repeat(start, np.diff(np.append(start, len(order))))
        # Every touched class has at least its k old entries (padding included), so exactly k
        # survive per class, already in (class, score desc, tie asc) order.
        keep = order[rank < k]
        self.score[touched] = all_score[keep].reshape(len(touched), k)
        self.tie[touched] = all_tie[keep].reshape(len(touched), k)
        self.ref[touched] = all_ref[keep].reshape(len(touched), k)

    def merge(self, other: ClassTopK) -> None:
        """Fold in another partial result (e.g. of another file): exact, order-independent."""
        filled = np.isfinite(other.score)
        cls_ids = np.nonzero(filled)[0]
        self.candidates += other.candidates
        self._merge(cls_ids, other.score[filled], other.tie[filled], other.ref[filled])

    def selected_counts(self) -> np.ndarray:
        """Selected candidates per class (< K where a class ran short)."""
        return np.isfinite(self.score).sum(axis=1)


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


def repeats(selected: int, k: int) -> np.ndarray:
    """How often each of ``selected`` ranked samples is repeated to fill ``k`` (upsampling)."""
    if selected == 0:
        return np.zeros(0, np.int64)
    base, extra = divmod(k, selected)
    out = np.full(selected, base, np.int64)
    out[:extra] += 1
    return out
