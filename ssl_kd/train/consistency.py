"""FixMatch's consistency loss (Sohn et al. 2020) with a fixed or a self-adaptive threshold.

A semi-supervised batch is ``[training images (n) | pool, strong view (m)]``, and its targets
carry the training images' own targets and the logits of the pool's weak views (``weak_logits``,
computed without gradient). The training images are scored by the trainer's own loss (the
labeled cross-entropy of a teacher; a student's loss on its pseudo-labels); the weak view's
prediction, where its confidence passes the threshold, is the hard target of the strong view.
Thresholds:

- ``fixed``: one confidence for every class (FixMatch: 0.95);
- ``adaptive``: FreeMatch's self-adaptive thresholds (Wang et al., ICLR 2023): a global level
  τ, the EMA of the pool's mean top-1 confidence, scaled per class by the EMA of the mean
  predicted probability of that class over its maximum, so classes the model is still unsure
  of get a lower bar (FlexMatch's aim, without a per-image memory of the pool).

The adaptive state is part of the checkpoint (:meth:`Thresholds.state_dict`). With DDP every
rank averages the batch statistics over all ranks before updating, so thresholds stay equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.nn import functional as F

Targets = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Targets], dict[str, torch.Tensor]]
ThresholdMode = Literal["fixed", "adaptive"]
WEAK_LOGITS = "weak_logits"  # the targets' key of the weak views' logits


def _all_mean(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over the DDP ranks (itself with one process)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class Thresholds:
    """Per-class confidence thresholds of the pool's pseudo-labels, fixed or self-adaptive."""

    def __init__(
        self, num_classes: int, mode: ThresholdMode, value: float, momentum: float = 0.999
    ) -> None:
        self.mode = mode
        self.value = value
        self.momentum = momentum
        # FreeMatch starts from 1/C: every prediction passes until the model grows confident.
        self.level = torch.tensor(1.0 / num_classes)
        self.class_prob = torch.full((num_classes,), 1.0 / num_classes)

    def per_class(self) -> torch.Tensor:
        """The current threshold of each class."""
        if self.mode == "fixed":
            return torch.full_like(self.class_prob, self.value)
        return self.class_prob / self.class_prob.max() * self.level

    @torch.no_grad()
    def mask(self, probs: torch.Tensor) -> torch.Tensor:
        """1.0 where a pool image's top-1 confidence passes its class's threshold (float (M,));
        an adaptive state first takes in this batch."""
        if self.mode == "adaptive":
            stats = _all_mean(torch.cat([probs.max(dim=1).values.mean()[None], probs.mean(0)]))
            stats = stats.cpu()
            m = self.momentum
            self.level = m * self.level + (1 - m) * stats[0]
            self.class_prob = m * self.class_prob + (1 - m) * stats[1:]
        conf, pseudo = probs.max(dim=1)
        return (conf >= self.per_class().to(probs.device)[pseudo]).float()

    def state_dict(self) -> dict[str, Any]:
        """The adaptive state, for checkpoints (plain floats: weights-only loading)."""
        return {"level": float(self.level), "class_prob": self.class_prob.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output."""
        self.level = torch.tensor(float(state["level"]))
        self.class_prob = torch.tensor(state["class_prob"], dtype=torch.float32)


def fixmatch_loss(base: LossFn, thresholds: Thresholds, weight: float = 1.0) -> LossFn:
    """``base``'s loss on the batch's first images (everything but the pool's strong views:
    the labeled images of a teacher, the training images of a student) plus ``weight`` × the
    masked cross-entropy of the strong views against the weak views' pseudo-labels.

    Parts: ``base``'s, and ``unsup`` (averaged over all pool images, as FixMatch does),
    ``mask`` (the share of pool images above their threshold) and ``threshold`` (the mean of
    the per-class thresholds); without ``weak_logits`` in the targets the last three are 0.
    """

    def loss_fn(logits: torch.Tensor, targets: Targets) -> dict[str, torch.Tensor]:
        weak = targets.get(WEAK_LOGITS)
        n = len(logits) - (0 if weak is None else len(weak))
        parts = base(logits[:n], {k: v for k, v in targets.items() if k != WEAK_LOGITS})
        zero = torch.zeros((), device=logits.device)
        if weak is None:  # a step before the pool joins (ssl_start)
            return {**parts, "unsup": zero, "mask": zero, "threshold": zero}
        probs = weak.detach().float().softmax(dim=1)
        mask = thresholds.mask(probs)
        pseudo = probs.argmax(dim=1)
        unsup = (F.cross_entropy(logits[n:], pseudo, reduction="none") * mask).mean()
        return {
            **parts,
            "loss": parts["loss"] + weight * unsup,
            "unsup": unsup.detach(),
            "mask": mask.mean(),
            "threshold": thresholds.per_class().mean().to(logits.device),
        }

    return loss_fn
