"""Ensembles of classifiers and test-time augmentation: better pseudo-labels from the teachers
one already has.

An :class:`Ensemble` averages the class probabilities of its members over the views of each
batch (the batch itself, plus its horizontal flip and/or four copies shifted diagonally by
``shift`` pixels). Its ``forward`` returns the log of that mean distribution, so anything that
takes logits (labeling's softmax at a temperature, evaluation, fidelity) sees the ensemble as
one classifier: ``softmax(forward(x))`` is the mean distribution, and a labeling temperature
T re-tempers it (``p ** (1/T)``, renormalised). One member with TTA is a TTA teacher.

An ensemble is saved as one ssl_kd checkpoint (``arch: ensemble``, each member's architecture
in ``meta["members"]``), so ``ssl-kd label --teacher``, ``evaluate`` and the pipeline load it
as they load any checkpoint. Members must predict the same classes from the same input
preprocessing; their architectures may differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssl_kd.models.registry import Classifier

ENSEMBLE = "ensemble"  # the arch name of an ensemble checkpoint
TTA_VIEWS = ("flip", "shift")


def default_shift(image_size: int) -> int:
    """Pixels of the ``shift`` views: 2 at 28 px, 16 at 224 px (1/14 of the side)."""
    return max(1, image_size // 14)


def tta_views(x: torch.Tensor, tta: Sequence[str], shift: int) -> list[torch.Tensor]:
    """The batch, then its horizontal flip (``flip``) and four diagonal shifts by ``shift``
    pixels with the border repeated (``shift``)."""
    views = [x]
    if "flip" in tta:
        views.append(x.flip(-1))
    if "shift" in tta:
        h, w = x.shape[-2:]
        padded = nn.functional.pad(x, (shift, shift, shift, shift), mode="replicate")
        for dy, dx in ((0, 0), (0, 2), (2, 0), (2, 2)):
            top, left = dy * shift, dx * shift
            views.append(padded[..., top : top + h, left : left + w])
    return views


def check_tta(tta: Sequence[str]) -> tuple[str, ...]:
    """``tta`` as a tuple of known view names; ValueError naming the choices otherwise."""
    unknown = [t for t in tta if t not in TTA_VIEWS]
    if unknown:
        raise ValueError(f"unknown TTA view {unknown[0]!r}; choose from {', '.join(TTA_VIEWS)}")
    return tuple(dict.fromkeys(tta))


class Ensemble(nn.Module):
    """The mean class distribution of ``members`` over the TTA views; ``forward`` gives its log."""

    def __init__(self, members: Sequence[nn.Module], tta: Sequence[str] = (), shift: int = 2):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.tta = check_tta(tta)
        self.shift = shift
        self.feature_dim = getattr(members[0], "feature_dim", 0)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Mean softmax over members and views, float32 (N, classes)."""
        total: torch.Tensor | None = None
        count = 0
        for view in tta_views(x, self.tta, self.shift):
            for member in self.members:
                p = torch.softmax(member(view).float(), dim=1)
                total = p if total is None else total + p
                count += 1
        assert total is not None
        return total / count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probabilities(x).clamp_min(1e-12).log()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The first member's penultimate features of the batch itself (its embedding)."""
        return self.members[0].features(x)


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and logits of a classifier (one pass) or an ensemble."""
    if isinstance(model, Ensemble):
        return model.features(x), model(x)
    feats = model.features(x)
    return feats, model.head(feats)  # eval mode: dropout is the identity


def has_features(model: nn.Module) -> bool:
    """Whether ``features_and_logits`` works on ``model``: an ssl_kd classifier, or an ensemble
    of them (its first member's features are the ensemble's). A TorchScript archive gives
    logits only."""
    if isinstance(model, Ensemble):
        model = model.members[0]
    return isinstance(model, Classifier)
