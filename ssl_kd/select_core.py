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

from dataclasses import dataclass, field

import numpy as np

NO_TIE = np.iinfo(np.int64).max


def make_ids(file_index: int, key_order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tie, ref) for the rows of one label file, given the row order that sorts its keys."""
    n = len(key_order)
    rank = np.empty(n, np.int64)
    rank[np.asarray(key_order)] = np.arange(n, dtype=np.int64)
    base = np.int64(file_index) << np.int64(32)
    return base | rank, base | np.arange(n, dtype=np.int64)


@dataclass
class ClassTopK:
    """The K best (score desc, tie asc) candidates per class seen so far, and candidate counts."""

    score: np.ndarray  # (C, K) float32, -inf where empty
    tie: np.ndarray  # (C, K) int64, NO_TIE where empty
    ref: np.ndarray  # (C, K) int64
    candidates: np.ndarray  # (C,) int64: candidates offered (after min_score)
    _pending: list = field(default_factory=list)
    _pending_size: int = 0

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
        """Offer candidates (1-D arrays of equal length); keeps the best K per class.

        Candidates that beat the current K-th best are buffered and merged in bulk (a merge
        re-sorts the touched lists, so fewer, larger merges are cheaper); call :meth:`flush`
        before reading the lists.
        """
        self.candidates += np.bincount(cls_ids, minlength=len(self.candidates))
        score = score.astype(np.float32)
        enters = self._beats_kth(cls_ids, score, tie)
        self._pending.append((cls_ids[enters], score[enters], tie[enters], ref[enters]))
        self._pending_size += int(enters.sum())
        if self._pending_size >= self.score.size:
            self.flush()

    def flush(self) -> None:
        """Merge the buffered candidates into the lists."""
        if self._pending:
            parts = [np.concatenate(x) for x in zip(*self._pending, strict=True)]
            self._pending, self._pending_size = [], 0
            self._merge(*parts)

    def _beats_kth(self, cls_ids: np.ndarray, score: np.ndarray, tie: np.ndarray) -> np.ndarray:
        worst_score = self.score[cls_ids, -1]
        worst_tie = self.tie[cls_ids, -1]
        return (score > worst_score) | ((score == worst_score) & (tie < worst_tie))

    def _merge(
        self, cls_ids: np.ndarray, score: np.ndarray, tie: np.ndarray, ref: np.ndarray
    ) -> None:
        # The current K-th entry of each class: a candidate must beat it to enter.
        enters = self._beats_kth(cls_ids, score, tie)
        if not enters.any():
            return
        cls_ids, score, tie, ref = cls_ids[enters], score[enters], tie[enters], ref[enters]
        touched = np.unique(cls_ids)
        k = self.k
        # The filled part of the touched classes' lists, followed by the newcomers.
        cur = np.isfinite(self.score[touched])
        all_cls = np.concatenate([np.repeat(touched, k)[cur.ravel()], cls_ids])
        all_score = np.concatenate([self.score[touched][cur], score])
        all_tie = np.concatenate([self.tie[touched][cur], tie])
        all_ref = np.concatenate([self.ref[touched][cur], ref])
        order = np.lexsort((all_tie, _class_score_key(all_cls, all_score)))
        sorted_cls = all_cls[order]
        start = np.searchsorted(sorted_cls, touched)
        counts = np.diff(np.append(start, len(order)))
        rank = np.arange(len(order)) - np.repeat(start, counts)
        keep = order[rank < k]
        # Scatter back: class row, rank column; slots past a short class's count stay empty.
        rows = np.repeat(touched, np.minimum(counts, k))
        cols = rank[rank < k]
        for name, values, empty in (("score", all_score, -np.inf), ("tie", all_tie, NO_TIE),
                                    ("ref", all_ref, -1)):  # fmt: skip
            arr = getattr(self, name)
            arr[touched] = empty
            arr[rows, cols] = values[keep]

    def merge(self, other: ClassTopK) -> None:
        """Fold in another partial result (e.g. of another file): exact, order-independent."""
        self.flush()
        other.flush()
        filled = np.isfinite(other.score)
        cls_ids = np.nonzero(filled)[0]
        self.candidates += other.candidates
        self._merge(cls_ids, other.score[filled], other.tie[filled], other.ref[filled])

    def selected_counts(self) -> np.ndarray:
        """Selected candidates per class (< K where a class ran short)."""
        self.flush()
        return np.isfinite(self.score).sum(axis=1)


def _class_score_key(cls_ids: np.ndarray, score: np.ndarray) -> np.ndarray:
    """One int64 sorting as (class ascending, score descending): scores are non-negative
    float32, whose bit patterns order like the values."""
    bits = score.astype(np.float32).view(np.int32).astype(np.int64)
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


def repeats(selected: int, k: int) -> np.ndarray:
    """How often each of ``selected`` ranked samples is repeated to fill ``k`` (upsampling)."""
    if selected == 0:
        return np.zeros(0, np.int64)
    base, extra = divmod(k, selected)
    out = np.full(selected, base, np.int64)
    out[:extra] += 1
    return out
