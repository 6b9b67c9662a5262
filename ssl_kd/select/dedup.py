"""Near-duplicate and leakage detection on L2-normalised embeddings, with faiss.

Cosine similarity of unit vectors is their inner product, so both jobs are inner-product
searches: a range search of the selection against itself (pairs at or above the threshold), and
a nearest-neighbour search of the selection against an evaluation set. Up to ``FLAT_LIMIT``
vectors the indexes are exact (flat); above it an inverted-file index searches ``nprobe`` of its
lists, trading a little recall for time.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

FLAT_LIMIT = 50_000


def _index(vectors: np.ndarray, flat_limit: int = FLAT_LIMIT) -> faiss.Index:
    n, d = vectors.shape
    if n <= flat_limit:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * math.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(0).permutation(n)[: 64 * nlist]]
        index.train(sample)
        index.nprobe = 16
    index.add(vectors)
    return index


def _unit(vectors: np.ndarray) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    faiss.normalize_L2(v)  # float16 storage leaves norms a hair off 1
    return v


def near_duplicates(
    vectors: np.ndarray, priority: np.ndarray, threshold: float, flat_limit: int = FLAT_LIMIT
) -> np.ndarray:
    """Mask of vectors to drop: of every group at cosine >= ``threshold``, the highest
    ``priority`` one stays (ties: lower index). Exact up to ``flat_limit`` vectors."""
    v = _unit(vectors)
    n = len(v)
    drop = np.zeros(n, bool)
    if n < 2:
        return drop
    # range_search keeps results strictly above the radius: step just below the threshold.
    radius = float(np.nextafter(np.float32(threshold), 0))
    lims, _, ids = _index(v, flat_limit).range_search(v, radius)
    kept = np.zeros(n, bool)
    for i in np.lexsort((np.arange(n), -priority)):
        if drop[i]:
            continue
        kept[i] = True
        neighbours = ids[lims[i] : lims[i + 1]]
        neighbours = neighbours[(neighbours != i) & ~kept[neighbours]]
        drop[neighbours] = True
    return drop


def leaked(
    vectors: np.ndarray, reference: np.ndarray, threshold: float, flat_limit: int = FLAT_LIMIT
) -> np.ndarray:
    """Mask of vectors whose nearest ``reference`` vector has cosine >= ``threshold``."""
    if len(vectors) == 0 or len(reference) == 0:
        return np.zeros(len(vectors), bool)
    scores, _ = _index(_unit(reference), flat_limit).search(_unit(vectors), 1)
    return scores[:, 0] >= threshold
