"""Image preprocessing shared by training, evaluation and labeling, recorded in checkpoints.

A model is only valid on inputs prepared the way it was trained, so the :class:`Preprocess`
settings travel inside every checkpoint and later stages rebuild the transform from there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from ssl_kd.errors import UserError
from ssl_kd.shards.reader import SampleError, peek_image


@dataclass(frozen=True)
class Preprocess:
    """Input format of a model: channels (1 or 3), square size, per-channel normalisation."""

    channels: int
    image_size: int
    mean: float = 0.5
    std: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for checkpoints and Parquet metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def fit_size(pp: Preprocess) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image transform of a decoded uint8 (C, H, W) tensor: resize the shorter side to
    ``image_size`` and centre-crop, only when the image is not already that size.

    Augmentation and normalisation run later on whole batches (:func:`augment`,
    :func:`normalize`), on the training device: per-image transforms cost more than a small
    model's forward pass on a 2-core machine.
    """
    size = pp.image_size

    def fit(img: torch.Tensor) -> torch.Tensor:
        if img.shape[-2:] == (size, size):
            return img
        img = TF.resize(img, [size], antialias=True)
        return TF.center_crop(img, [size, size])

    return fit


def normalize(images: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """uint8 (N, C, H, W) → float, scaled to [0, 1] then normalised by ``pp.mean``/``pp.std``."""
    return (images.float() / 255.0 - pp.mean) / pp.std


def augment(images: torch.Tensor, crop_padding: int, flip: bool) -> torch.Tensor:
    """Random padded crops and horizontal flips of a uint8 batch, one draw per image.

    Draws from the global (CPU) torch RNG whatever the batch's device, so a checkpointed RNG
    state replays the same augmentation.
    """
    n, _, h, w = images.shape
    dev = images.device
    out = images
    if crop_padding > 0:
        p = crop_padding
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,)).to(dev)
        dx = torch.randint(0, 2 * p + 1, (n,)).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (N, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, :]  # (N, 1, W)
        idx = torch.arange(n, device=dev)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n) < 0.5).to(dev)
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


def infer_preprocess(
    urls: list[str],
    channels: int | None,
    image_size: int | None,
    mean: float,
    std: float,
) -> Preprocess:
    """Fill unset channels/size from the first image of the shards."""
    if channels is None or image_size is None:
        try:
            img = peek_image(urls)
        except SampleError as exc:
            raise UserError(exc.detail or str(exc)) from None
        if channels is None:
            channels = 1 if img.shape[0] == 1 else 3
        if image_size is None:
            h, w = img.shape[-2:]
            if w != h:
                raise UserError(
                    f"images are {w}x{h}, not square: set --image-size to the side to train at"
                )
            image_size = w
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    return Preprocess(channels=channels, image_size=image_size, mean=mean, std=std)
