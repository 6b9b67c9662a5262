"""Feature distillation: the student also learns the teacher's representation, not only its
answers (FitNets, Romero et al. 2015; CRD and its baselines, Tian et al. 2020).

The teacher's L2-normalised penultimate embedding of every selected image travels with its
pseudo-label (the ``emb`` member, :mod:`ssl_kd.shards.soft_label`), so the teacher is never run
again. A linear projection maps the student's penultimate features to the teacher's embedding
space, and :func:`with_feature_loss` adds ``weight`` times their distance to the student's loss:

- ``cosine``: ``1 - cos(projection(f), e)``, the batch mean; blind to the projection's scale;
- ``mse``: ``||projection(f) - e||²``, summed over dimensions, the batch mean (the squared
  Euclidean distance to a unit vector; a per-element mean would shrink it by the dimension).

The projection only serves training: the saved student is the plain classifier unless
``keep_projection`` asks for it (then the checkpoint's ``projection`` entry holds it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ssl_kd.errors import UserError
from ssl_kd.shards.reader import ReadStats, iter_shard
from ssl_kd.shards.soft_label import EMBEDDING as MEMBER
from ssl_kd.train.losses import StudentLoss, Targets

FEATURE_LOSSES = ("none", "cosine", "mse")
# Targets keys: the stored teacher embeddings, and the projected student features that
# train_step adds for a FeatureDistiller.
EMBEDDING = "embedding"
STUDENT_FEATURES = "student_features"


class FeatureDistiller(nn.Module):
    """A classifier with a projection of its penultimate features; ``forward`` returns
    ``(logits, projected features)`` from one pass."""

    def __init__(self, student: nn.Module, embedding_dim: int) -> None:
        super().__init__()
        self.student = student
        self.projection = nn.Linear(student.feature_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.student.features(x)
        # The classifier's own forward is head(dropout(features)): the same logits.
        return self.student.head(self.student.dropout(feats)), self.projection(feats)


def stored_embedding_dim(kind: str, data: str, urls: list[str], info: dict | None) -> int:
    """The dimension of the teacher embeddings stored with the shards (``info`` is their
    ``dataset.json``); UserError when there are none or the first sample disagrees."""
    stored = (info or {}).get("embedding")
    if not stored:
        raise UserError(
            f"--feature-loss {kind} needs the teacher's embeddings in the shards, and {data} "
            "has none: label with --embeddings, then select and materialize again"
        )
    dim = int(stored["dim"])
    for sample in iter_shard(urls[0], ReadStats()):  # the first sample stands for the shards
        size = len(sample.get(MEMBER, b""))
        if size != 2 * dim:
            raise UserError(
                f"sample {sample['__key__']} of {urls[0]} holds a {size // 2}-d embedding "
                f"where dataset.json says {dim}-d: the shards and their dataset.json disagree; "
                "materialize them again"
            )
        break
    return dim


def feature_distance(kind: str, projected: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """The batch mean of ``cosine`` (1 - cosine similarity) or ``mse`` (squared L2 distance)."""
    projected, embedding = projected.float(), embedding.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(projected, embedding, dim=1)).mean()
    if kind == "mse":
        return (projected - embedding).pow(2).sum(dim=1).mean()
    raise ValueError(f"unknown feature loss {kind!r}; choose one of {', '.join(FEATURE_LOSSES)}")


def with_feature_loss(base: StudentLoss, kind: str, weight: float) -> StudentLoss:
    """``base`` plus ``weight`` × the feature distance of the images that carry an embedding
    (the first ones of a batch: joint training's true-labeled images come last and have none).
    Parts: ``base``'s and ``feature`` (unweighted)."""

    def loss_fn(logits: torch.Tensor, targets: Targets) -> dict[str, torch.Tensor]:
        embedding, projected = targets[EMBEDDING], targets[STUDENT_FEATURES]
        rest = {k: v for k, v in targets.items() if k not in (EMBEDDING, STUDENT_FEATURES)}
        parts = base(logits, rest)
        feature = feature_distance(kind, projected[: len(embedding)], embedding)
        return {**parts, "loss": parts["loss"] + weight * feature, "feature": feature.detach()}

    return loss_fn
