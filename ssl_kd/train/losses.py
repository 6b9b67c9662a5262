"""Student losses (Yalniz et al. 2019; Hinton et al. 2015): hard, soft (KD) and mixed.

Each returns a dict of its parts, ``loss`` being the one to minimise. Targets are a dict of
tensors: ``label`` (N,) the selected class; ``topk_class`` (N, k) and ``topk_prob`` (N, k) the
teacher's top-k soft label, as stored (softmax at the labeling temperature ``label_temperature``);
with ``sample_weights``, ``weight`` (N,) each image's weight from the selection, which turns
every part's batch mean into the weighted mean ``Σ w·ℓ / Σ w`` (per rank: DDP then averages the
ranks' gradients, which is the global weighted mean when the ranks' weights add up alike).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

Targets = dict[str, torch.Tensor]
StudentLoss = Callable[[torch.Tensor, Targets], dict[str, torch.Tensor]]
LOSSES = ("hard", "soft", "mixed")


def teacher_distribution(
    topk_prob: torch.Tensor, label_temperature: float, temperature: float
) -> torch.Tensor:
    """The teacher's top-k probabilities re-tempered to ``temperature`` and renormalised.

    Stored probabilities are ``softmax(z / T0)``; ``p ** (T0 / T)`` is proportional to
    ``exp(z / T)``, so the classes outside the top-k are the only thing lost.
    """
    p = topk_prob.float().clamp_min(1e-12) ** (label_temperature / temperature)
    return p / p.sum(dim=1, keepdim=True)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``values`` (N,), or with ``weight`` (N,) ``Σ w·v / Σ w`` (0 when every
    weight is 0: such a batch teaches nothing)."""
    if weight is None:
        return values.mean()
    w = weight.to(values.dtype)
    return (w * values).sum() / w.sum().clamp_min(torch.finfo(values.dtype).tiny)


def kd_loss(
    logits: torch.Tensor,
    topk_class: torch.Tensor,
    topk_prob: torch.Tensor,
    label_temperature: float,
    temperature: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (or ``weight``-weighted mean) KL(teacher_T ‖ student_T) × T², the teacher's mass on
    its top-k classes only."""
    q = teacher_distribution(topk_prob, label_temperature, temperature)
    log_s = F.log_softmax(logits.float() / temperature, dim=1).gather(1, topk_class.long())
    kl = (q * (q.clamp_min(1e-12).log() - log_s)).sum(dim=1)
    return weighted_mean(kl, weight) * temperature**2


def hard_loss(
    logits: torch.Tensor,
    label: torch.Tensor,
    label_smoothing: float = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy on ``label``: the batch mean, or the ``weight``-weighted mean."""
    if weight is None:
        return F.cross_entropy(logits, label, label_smoothing=label_smoothing)
    each = F.cross_entropy(logits, label, label_smoothing=label_smoothing, reduction="none")
    return weighted_mean(each, weight)


def student_loss(
    kind: str,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
    label_temperature: float = 1.0,
    sample_weights: bool = False,
) -> StudentLoss:
    """``hard``: cross-entropy on the selected class; ``soft``: KD; ``mixed``: α·kd + (1−α)·ce;
    with ``sample_weights``, each part weighted by the targets' ``weight``."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")

    def loss_fn(logits: torch.Tensor, targets: Targets) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        weight = targets["weight"] if sample_weights else None
        if kind in ("hard", "mixed"):
            parts["ce"] = hard_loss(logits, targets["label"], label_smoothing, weight)
        if kind in ("soft", "mixed"):
            parts["kd"] = kd_loss(
                logits,
                targets["topk_class"],
                targets["topk_prob"],
                label_temperature,
                temperature,
                weight,
            )
        if kind == "hard":
            loss = parts["ce"]
        elif kind == "soft":
            loss = parts["kd"]
        else:
            loss = alpha * parts["kd"] + (1 - alpha) * parts["ce"]
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    return loss_fn


def joint_loss(pseudo: StudentLoss, labeled: int, label_smoothing: float = 0.0) -> StudentLoss:
    """Joint training: the last ``labeled`` images of a batch carry true labels (``true_label``)
    and are scored by cross-entropy, the others by ``pseudo``; the loss is the mean over all
    images, so each part weighs its share of the batch. Parts: ``pseudo``, ``true_ce`` and
    those of ``pseudo``."""

    def loss_fn(logits: torch.Tensor, targets: Targets) -> dict[str, torch.Tensor]:
        n = len(logits) - labeled
        parts = pseudo(logits[:n], {k: v for k, v in targets.items() if k != "true_label"})
        true_ce = F.cross_entropy(
            logits[n:], targets["true_label"], label_smoothing=label_smoothing
        )
        loss = (n * parts["loss"] + labeled * true_ce) / len(logits)
        rest = {k: v for k, v in parts.items() if k != "loss"}
        return {"loss": loss, "pseudo": parts["loss"].detach(), "true_ce": true_ce.detach(), **rest}

    return loss_fn
