"""Pseudo-labels checked by their neighbours in the teacher's embedding space (no Ray, no I/O).

Three signals, each a function of L2-normalised embeddings of the labeled images (with their
true classes) and of a pool of candidate images:

- **Label propagation** (Iscen et al., CVPR 2019, "Label Propagation for Deep Semi-supervised
  Learning"; the authors' code is github.com/ahmetius/LP-DeepSSL): a kNN graph over labeled and
  pool images together, edge weight ``max(cos, 0) ** gamma``, ``W = A + Aᵀ``, symmetrically
  normalised ``Wn = D^-1/2 W D^-1/2``; per class ``c`` the system ``(I − α Wn) z_c = y_c`` is
  solved by conjugate gradient, ``y_c`` being ``1 / n_c`` on the ``n_c`` labeled images of ``c``
  (so that large classes do not drown small ones). A pool image's propagated distribution is its
  row of ``Z`` (negatives clipped) normalised to sum 1; its class the argmax, its certainty
  ``ω = 1 − H(ẑ) / log C`` divided by the pool's largest ω, and each class's balance weight
  ``ζ_c = (N / C) / N_c`` over the ``N_c`` pool images propagated to ``c`` (the paper's eq. 11
  and its class weights). The division, as in the authors' code, matters: with α near 1 the
  labels spread far, so even an image deep inside its class gets a flat-looking ẑ (0.8 / 0.2
  for two classes, ω ≈ 0.3) while one between classes gets ω ≈ 0.
- **Neighbour vote**: the ``max(cos, 0) ** gamma``-weighted class histogram of each image's k
  nearest *labeled* images, normalised to sum 1. No graph, no solve: a cheaper, more local check.
- **Distance to the class**: the mean cosine of an image to its few nearest labeled images of a
  given class, and per class a floor from the labeled images themselves (a quantile of each
  labeled image's similarity to the other labeled images of its class), so that images of none
  of the task's classes (an open-set pool), which sit far from every labeled image of the class
  the teacher gave them, can be dropped.

Nothing here returns NaN: an image that no labeled image reaches (no path in the graph, or only
zero-weight neighbours) gets the uniform distribution and certainty 0; a class without labeled
images gets no mass, a similarity of -inf and no floor.

Cost, for n = labeled + pool images of dimension d, k neighbours, C classes and ``max_iter``
CG iterations: the exact kNN search (``faiss.IndexFlatIP``, all pairs, blocked and
multithreaded by faiss) is O(n² d); the graph holds at most 2nk edges; CG is O(max_iter · nk · C)
(sparse products in numpy, one class at a time) with O(n · C) memory for ``Z``. So it runs on
the selection's shortlist of candidates (a few times K per class), not on the whole pool.
Measured (``bench/propagate_scale.py``, ``BENCHMARKS.md``) on 61,000 × 128-d, k = 50, 10
classes, 2 cores: kNN graph 8.0 s, conjugate gradient 6.7 s. The search grows with n², CG with
C: for much larger shortlists swap the flat search for an approximate one
(``faiss.IndexIVFFlat`` or ``IndexHNSWFlat``), as :mod:`ssl_kd.select.dedup` does above 50,000
vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

NEIGHBOURS = 50  # the paper's k
GAMMA = 3.0  # the paper's exponent of the edge weights
ALPHA = 0.99  # the paper's α: how far labels spread (1: to the whole component)
MAX_ITER = 20  # the paper's CG iterations
FAR_TOP = 3  # labeled images of the class whose similarities a distance averages


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """A float32 copy with every row scaled to unit L2 norm; all-zero rows stay zero."""
    v = np.array(vectors, dtype=np.float32, ndmin=2)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1)


def _search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` of ``queries`` in ``base`` (``k`` clipped to ``len(base)``):
    (similarities, ids), best first."""
    k = min(k, len(base))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, np.float32))
    return index.search(np.ascontiguousarray(queries, np.float32), k)


def _without_self(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` results of each row that are not the row itself (a self-search returns
    the query, though not always first when it has exact duplicates); missing slots: id -1."""
    own = np.arange(len(ids))[:, None]
    other = (ids != own) & (ids >= 0)
    keep = other & (np.cumsum(other, axis=1) <= k)
    out_s = np.zeros((len(ids), k), np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    col = np.cumsum(keep, axis=1) - 1
    rows, cols = np.nonzero(keep)
    out_s[rows, col[rows, cols]] = sims[rows, cols]
    out_i[rows, col[rows, cols]] = ids[rows, cols]
    return out_s, out_i


@dataclass(frozen=True)
class SparseSymmetric:
    """A symmetric n × n sparse matrix in CSR form (entries of one (row, col) add up)."""

    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (nnz,) int64
    data: np.ndarray  # (nnz,) float64

    @property
    def n(self) -> int:
        """Rows (and columns)."""
        return len(self.indptr) - 1

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``self @ x`` for ``x`` of shape (n, b), one column at a time (memory: one value per
        edge)."""
        out = np.zeros((x.shape[1], self.n), np.float64)
        starts = self.indptr[:-1]
        filled = starts < self.indptr[1:]  # reduceat mishandles empty rows: skip them
        if not len(self.data):
            return out.T
        # Contiguous 1-D gathers and reductions: ten times faster than one 2-D gather.
        for col, values in zip(out, np.ascontiguousarray(x.T, np.float64), strict=True):
            col[filled] = np.add.reduceat(self.data * values[self.indices], starts[filled])
        return out.T

    def dense(self) -> np.ndarray:
        """The matrix as a dense array (small matrices: tests)."""
        m = np.zeros((self.n, self.n))
        rows = np.repeat(np.arange(self.n), np.diff(self.indptr))
        np.add.at(m, (rows, self.indices), self.data)
        return m


def knn_graph(embeddings: np.ndarray, k: int = NEIGHBOURS, gamma: float = GAMMA) -> SparseSymmetric:
    """``D^-1/2 (A + Aᵀ) D^-1/2`` where ``A`` links each unit vector to its ``k`` nearest others
    (``k`` clipped to n − 1) with weight ``max(cos, 0) ** gamma``; isolated rows stay zero."""
    x = unit_rows(embeddings)
    n = len(x)
    k = max(0, min(k, n - 1))
    sims, ids = _without_self(*_search(x, x, k + 1), k)
    valid = ids >= 0
    rows = np.repeat(np.arange(n), k)[valid.ravel()]
    cols = ids[valid]
    weight = np.maximum(sims[valid].astype(np.float64), 0) ** gamma
    # A + Aᵀ: every edge in both directions.
    rows, cols = np.concatenate([rows, cols]), np.concatenate([cols, rows])
    weight = np.concatenate([weight, weight])
    degree = np.bincount(rows, weights=weight, minlength=n)
    scale = np.divide(1.0, np.sqrt(degree), out=np.zeros(n), where=degree > 0)
    order = np.argsort(rows, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)
    data = (scale[rows] * weight * scale[cols])[order]
    return SparseSymmetric(indptr, cols[order].astype(np.int64), data)


def conjugate_gradient(
    matvec: Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    max_iter: int = MAX_ITER,
    tol: float = 1e-6,
) -> np.ndarray:
    """``x`` with ``A x ≈ b`` for a symmetric positive definite ``A`` given as ``matvec``,
    every column of ``b`` (n, m) solved independently (its own step sizes), from ``x = 0``,
    stopping after ``max_iter`` iterations or when every residual is below ``tol · |b|``."""
    b = np.asarray(b, np.float64)
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = (r * r).sum(axis=0)
    goal = (tol**2) * rs  # squared: compared with squared residual norms
    for _ in range(max_iter):
        if np.all(rs <= goal):
            break
        ap = matvec(p)
        curvature = (p * ap).sum(axis=0)
        # Solved (or empty) columns have p = 0: their step is 0, not 0 / 0.
        step = np.divide(rs, curvature, out=np.zeros_like(rs), where=curvature > 0)
        x += step * p
        r -= step * ap
        rs_next = (r * r).sum(axis=0)
        p = r + np.divide(rs_next, rs, out=np.zeros_like(rs), where=rs > 0) * p
        rs = rs_next
    return x


def normalize_rows(scores: np.ndarray) -> np.ndarray:
    """Non-negative scores as float32 distributions (rows sum to 1); all-zero rows uniform."""
    s = np.maximum(np.asarray(scores, np.float64), 0)
    total = s.sum(axis=1, keepdims=True)
    uniform = np.full_like(s, 1.0 / max(1, s.shape[1]))
    return np.where(total > 0, s / np.where(total > 0, total, 1), uniform).astype(np.float32)


def certainty(probs: np.ndarray) -> np.ndarray:
    """``1 − H(p) / log C`` per row of distributions ``probs`` (n, C): 1 for a one-hot row,
    0 for the uniform one (1 everywhere when C = 1)."""
    c = probs.shape[1]
    if c < 2:
        return np.ones(len(probs), np.float32)
    p = np.asarray(probs, np.float64)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)
    return np.clip(1 + plogp.sum(axis=1) / math.log(c), 0, 1).astype(np.float32)


def relative(values: np.ndarray) -> np.ndarray:
    """``values`` divided by their maximum (unchanged when that is not positive)."""
    top = float(values.max()) if len(values) else 0.0
    return (values / top if top > 0 else values).astype(np.float32)


def balance_weights(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """``ζ_c = (N / C) / N_c`` for the ``N_c`` of ``N`` images of class ``c`` (0 where none)."""
    counts = np.bincount(np.asarray(classes, np.int64), minlength=num_classes)[:num_classes]
    n = counts.sum()
    return np.divide(n / num_classes, counts, out=np.zeros(num_classes), where=counts > 0).astype(
        np.float32
    )


@dataclass(frozen=True)
class Propagation:
    """Label propagation's answer for each pool image."""

    probs: np.ndarray  # (n, C) float32: the propagated distribution ẑ (uniform if unreached)
    classes: np.ndarray  # (n,) int64: its argmax
    certainty: np.ndarray  # (n,) float32: ω = 1 − H(ẑ) / log C, over the pool's largest ω
    balance: np.ndarray  # (C,) float32: ζ_c over the pool images' propagated classes


def _labeled_columns(labeled_cls: np.ndarray, num_classes: int) -> np.ndarray:
    """``Y`` of the labeled rows: ``1 / n_c`` at each image's class (the paper's eq. 5)."""
    counts = np.bincount(labeled_cls, minlength=num_classes)
    y = np.zeros((len(labeled_cls), num_classes))
    y[np.arange(len(labeled_cls)), labeled_cls] = 1.0 / counts[labeled_cls]
    return y


def propagate(
    labeled: np.ndarray,
    labeled_cls: np.ndarray,
    pool: np.ndarray,
    num_classes: int,
    k: int = NEIGHBOURS,
    alpha: float = ALPHA,
    gamma: float = GAMMA,
    max_iter: int = MAX_ITER,
) -> Propagation:
    """Label propagation from the ``labeled`` embeddings (true classes ``labeled_cls``) to the
    ``pool`` embeddings over one kNN graph of both."""
    labeled_cls = np.asarray(labeled_cls, np.int64)
    n_lab = len(labeled)
    graph = knn_graph(np.concatenate([unit_rows(labeled), unit_rows(pool)]), k, gamma)
    y = np.zeros((graph.n, num_classes))
    y[:n_lab] = _labeled_columns(labeled_cls, num_classes)
    # (I − α Wn) is positive definite: Wn's eigenvalues lie in [−1, 1] and α < 1.
    z = conjugate_gradient(lambda v: v - alpha * graph.matmul(v), y, max_iter)
    probs = normalize_rows(z[n_lab:])
    classes = probs.argmax(axis=1).astype(np.int64)
    sure = relative(certainty(probs))
    return Propagation(probs, classes, sure, balance_weights(classes, num_classes))


def neighbour_vote(
    labeled: np.ndarray,
    labeled_cls: np.ndarray,
    pool: np.ndarray,
    num_classes: int,
    k: int = NEIGHBOURS,
    gamma: float = GAMMA,
) -> np.ndarray:
    """(n, C) float32: each pool image's ``max(cos, 0) ** gamma``-weighted class histogram of
    its ``k`` nearest labeled images, normalised (uniform where all weights are 0)."""
    sims, ids = _search(unit_rows(labeled), unit_rows(pool), k)
    weight = np.maximum(sims.astype(np.float64), 0) ** gamma
    cls = np.asarray(labeled_cls, np.int64)[ids]
    flat = np.repeat(np.arange(len(ids)), ids.shape[1]) * num_classes + cls.ravel()
    votes = np.bincount(flat, weights=weight.ravel(), minlength=len(ids) * num_classes)
    return normalize_rows(votes.reshape(len(ids), num_classes))


def _per_class_top(labeled_cls: np.ndarray, num_classes: int, top: int) -> np.ndarray:
    """How many nearest labeled images each class's similarities average: ``top``, fewer for a
    class with at most ``top`` labeled images, so an image and a leave-one-out labeled image
    average the same number."""
    counts = np.bincount(labeled_cls, minlength=num_classes)
    return np.clip(np.minimum(top, counts - 1), 1, None)


def class_similarity(
    pool: np.ndarray,
    pool_cls: np.ndarray,
    labeled: np.ndarray,
    labeled_cls: np.ndarray,
    num_classes: int,
    top: int = FAR_TOP,
) -> np.ndarray:
    """(n,) float32: each pool image's mean cosine to its ``top`` nearest labeled images of its
    class ``pool_cls`` (-inf where that class has no labeled image)."""
    pool, labeled = unit_rows(pool), unit_rows(labeled)
    pool_cls, labeled_cls = np.asarray(pool_cls, np.int64), np.asarray(labeled_cls, np.int64)
    tops = _per_class_top(labeled_cls, num_classes, top)
    out = np.full(len(pool), -np.inf, np.float32)
    for c in np.unique(pool_cls):
        mine, theirs = pool_cls == c, labeled_cls == c
        if theirs.any():
            sims, _ = _search(labeled[theirs], pool[mine], int(tops[c]))
            out[mine] = sims.mean(axis=1)
    return out


def class_floors(
    labeled: np.ndarray,
    labeled_cls: np.ndarray,
    num_classes: int,
    quantile: float,
    top: int = FAR_TOP,
) -> np.ndarray:
    """(C,) float32: per class, the ``quantile`` of its labeled images' mean cosine to their
    ``top`` nearest *other* labeled images of the class (-inf, no floor, for a class with fewer
    than two)."""
    labeled, labeled_cls = unit_rows(labeled), np.asarray(labeled_cls, np.int64)
    tops = _per_class_top(labeled_cls, num_classes, top)
    floors = np.full(num_classes, -np.inf, np.float32)
    for c in range(num_classes):
        mine = labeled[labeled_cls == c]
        if len(mine) < 2:
            continue
        t = int(tops[c])
        sims, _ = _without_self(*_search(mine, mine, t + 1), t)
        floors[c] = np.quantile(sims.mean(axis=1), quantile)
    return floors
