"""The teacher's outputs on an evaluation set, kept between evaluations.

A pipeline scores every student against the same teacher on the same test shards, and the
teacher's logits and penultimate features are the same each time. The first evaluation stores
them in a file named by everything that decides them: the teacher's sha256, the shards' names,
sizes and modification times, the teacher's preprocessing, the precision, the pixel limit and the
loader's worker count (which fixes the order of the images). Later evaluations read that file
instead of running the teacher; on the Fashion-MNIST demo that is most of each evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ssl_kd import atomic, storage
from ssl_kd.errors import UserError

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class ReferenceOutputs:
    """The teacher's outputs per image, in the loader's order, on the CPU."""

    labels: torch.Tensor  # int64 (n,): a later pass must see the same labels in the same order
    logits: torch.Tensor  # float32 (n, C)
    features: torch.Tensor | None  # float32 (n, d); None for a teacher without features
    source: str = ""  # the file they were read from, for errors

    def take(self, start: int, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The features (or None) and logits of the images ``start`` .. ``start + len(labels)``;
        UserError when the stored labels there are not ``labels`` (the data changed)."""
        end = start + len(labels)
        if end > len(self.labels) or not torch.equal(self.labels[start:end], labels.cpu()):
            raise UserError(
                f"the teacher outputs in {self.source} do not match the evaluation data from "
                f"image {start} on: delete that file and evaluate again"
            )
        feats = self.features[start:end] if self.features is not None else None
        return feats, self.logits[start:end]


def cache_key(
    teacher_digest: str, urls: list[str], teacher_pp: dict[str, Any], **settings: Any
) -> str | None:
    """The file name (a sha256) for these outputs, or None when a shard's version cannot be
    read (an http or pipe shard: a change to it would go unseen, so nothing is cached)."""
    try:
        versions = [storage.version(url) for url in urls]
    except (OSError, UserError):
        return None
    blob = json.dumps(
        {
            "format": FORMAT,
            "teacher": teacher_digest,
            "shards": list(zip(urls, versions, strict=True)),
            "preprocess": teacher_pp,
            **settings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load(directory: str, key: str) -> ReferenceOutputs | None:
    """The outputs stored under ``key`` in ``directory``, or None when there are none."""
    path = storage.join(directory, f"{key}.pt")
    if not storage.is_file(path):
        return None
    state = torch.load(storage.loadable(path), map_location="cpu", weights_only=True)
    log.info("teacher outputs read from %s", storage.display(path))
    return ReferenceOutputs(state["labels"], state["logits"], state.get("features"), path)


def save(directory: str, key: str, outputs: ReferenceOutputs) -> str:
    """Store ``outputs`` under ``key`` in ``directory`` (atomically); returns the file."""
    path = storage.join(directory, f"{key}.pt")
    state = {"format": FORMAT, "labels": outputs.labels, "logits": outputs.logits}
    if outputs.features is not None:
        state["features"] = outputs.features
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)
    log.info("teacher outputs kept in %s", storage.display(path))
    return path
