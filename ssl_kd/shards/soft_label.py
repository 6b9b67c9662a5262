"""The soft-label members of a pseudo-labeled sample, as ``ssl-kd materialize`` writes them.

A pseudo-labeled sample ``KEY`` holds, beside its image member (original bytes and extension):

- ``KEY.cls``: the selected class as a decimal integer (ASCII), so any WebDataset reader that
  wants hard labels finds them where it looks for them;
- ``KEY.json``: one JSON object with ``class`` (the same integer), ``topk_class`` (the teacher's
  top-k class ids, best first), ``topk_prob`` (their probabilities), ``score`` and ``rank`` (the
  selection's score and the sample's rank in its class), ``source_shard`` and ``source_key``
  (where the image came from), and ``weight`` (only when the selection weighed its rows,
  ``select --weights``: the sample's weight in the student's loss, a float >= 0; ``dataset.json``
  then says so under ``weights``);
- ``KEY.emb`` (only when the labels stored embeddings): the teacher's L2-normalised penultimate
  embedding of the image, ``d`` raw little-endian float16 values (``2·d`` bytes, no header);
  ``dataset.json`` beside the shards gives ``d`` under ``embedding.dim``.

:func:`encode` writes the ``cls`` and ``json`` members and :func:`encode_embedding` the ``emb``
one; :func:`decode`, :func:`decode_weight` and :func:`decode_embedding` read back what training
needs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from ssl_kd.shards.reader import read_label
from ssl_kd.shards.skips import SampleError, plain


def encode(
    cls: int,
    topk_class: list[int],
    topk_prob: list[float],
    score: float,
    rank: int,
    source_shard: str,
    source_key: str,
    weight: float | None = None,
) -> dict[str, bytes]:
    """The ``cls`` and ``json`` members (extension → bytes) of one pseudo-labeled sample; the
    json has a ``weight`` only when one is given."""
    soft: dict[str, Any] = {
        "class": cls,
        "topk_class": topk_class,
        "topk_prob": [float(p) for p in topk_prob],
        "score": float(score),
        "rank": rank,
        "source_shard": source_shard,
        "source_key": source_key,
    }
    if weight is not None:
        soft["weight"] = float(weight)
    return {"cls": str(cls).encode(), "json": json.dumps(soft).encode()}


EMBEDDING = "emb"  # the member's extension


def encode_embedding(embedding: np.ndarray) -> bytes:
    """The ``emb`` member of one sample: the embedding as raw little-endian float16."""
    return np.asarray(embedding, dtype="<f2").tobytes()


def decode_embedding(sample: dict[str, Any], dim: int) -> np.ndarray:
    """The sample's stored teacher embedding as float32 ``(dim,)``; SampleError if it is
    missing or has another size."""
    raw = sample.get(EMBEDDING)
    if raw is None:
        raise SampleError("bad embedding", f"no .{EMBEDDING} member")
    if len(raw) != 2 * dim:
        raise SampleError("bad embedding", f"{len(raw)} bytes, expected {2 * dim} ({dim} float16)")
    return np.frombuffer(raw, dtype="<f2").astype(np.float32)


def decode(
    sample: dict[str, Any], num_classes: int | None, k: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """``(class, topk_class, topk_prob)`` of a pseudo-labeled sample, the first ``k`` classes;
    SampleError if a member is missing or malformed."""
    label = read_label(sample, num_classes)
    raw = sample.get("json")
    if raw is None:
        raise SampleError("bad soft label", "no .json member")
    try:
        soft = json.loads(raw)
        classes, probs = soft["topk_class"][:k], soft["topk_prob"][:k]
    except (ValueError, KeyError, TypeError) as exc:
        raise SampleError("bad soft label", plain(exc)) from None
    if len(classes) != k or len(probs) != k:
        raise SampleError("bad soft label", f"fewer than {k} classes")
    if num_classes is not None and (min(classes) < 0 or max(classes) >= num_classes):
        raise SampleError("bad soft label", f"class out of range for {num_classes} classes")
    try:
        # numpy, not torch: per-sample torch.tensor calls cost more than decoding a small PNG
        return label, np.array(classes, np.int64), np.array(probs, np.float32)
    except (ValueError, TypeError) as exc:
        raise SampleError("bad soft label", plain(exc)) from None


def decode_weight(sample: dict[str, Any]) -> np.float32:
    """The sample's ``weight`` (from its ``json`` member); SampleError if it is missing, not a
    number, negative or not finite."""
    raw = sample.get("json")
    if raw is None:
        raise SampleError("bad soft label", "no .json member")
    try:
        weight = json.loads(raw)["weight"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SampleError("bad soft label", f"no weight ({plain(exc)})") from None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise SampleError("bad soft label", f"weight {weight!r} is not a number")
    if not math.isfinite(weight) or weight < 0:
        raise SampleError("bad soft label", f"weight {weight} is not a finite number >= 0")
    return np.float32(weight)
