"""Image preprocessing shared by training, evaluation and labeling, recorded in checkpoints.

A model is only valid on inputs prepared the way it was trained, so the :class:`Preprocess`
settings travel inside every checkpoint and later stages rebuild the transform from there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from ssl_kd.errors import UserError
from ssl_kd.shards.reader import SampleError, peek_image

# torchvision's ImageNet evaluation transform: what its pretrained classifiers expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_RESIZE = 256
IMAGENET_SIZE = 224
# How images reach ``resize`` before the centre crop (timm's ``crop_mode``): the shorter side
# (``center``), both sides, the aspect ratio lost (``squash``), or the longer side, the rest
# padded with the mean colour (``border``).
CROP_MODES = ("center", "squash", "border")
# How images are resized: torchvision's evaluation transform is bilinear, CLIP's (and many timm
# models') bicubic.
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """Input format of a model: channels (1 or 3), square size, per-channel normalisation, and
    the side images are resized to before the centre crop (``resize``; 0: ``image_size``), with
    ``interpolation`` (antialiased) and ``crop_mode`` (:data:`CROP_MODES`).

    ``mean`` and ``std`` hold one value per channel, or one value for all channels.
    """

    channels: int
    image_size: int
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    resize: int = 0
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(
                f"interpolation {self.interpolation!r} is not supported; use one of "
                f"{', '.join(INTERPOLATIONS)}"
            )
        if self.crop_mode not in CROP_MODES:
            raise UserError(
                f"crop mode {self.crop_mode!r} is not supported; use one of {', '.join(CROP_MODES)}"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            values = tuple(float(v) for v in (value if isinstance(value, Sequence) else [value]))
            if len(values) not in (1, self.channels):
                raise UserError(
                    f"--{name} has {len(values)} values; give 1 or {self.channels} (one per "
                    "channel)"
                )
            object.__setattr__(self, name, values)
        if any(v <= 0 for v in self.std):
            raise UserError(f"--std must be > 0, got {list(self.std)}")
        if self.resize and self.resize < self.image_size:
            raise UserError(
                f"--resize {self.resize} is smaller than --image-size {self.image_size}; the "
                "centre crop must fit in the resized image"
            )

    @property
    def resize_to(self) -> int:
        """The side (shorter, both or longer, by ``crop_mode``) before the centre crop."""
        return self.resize or self.image_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for checkpoints and Parquet metadata; ``interpolation`` and
        ``crop_mode`` appear only when not the defaults, so files written before they existed
        describe the same transform."""
        out: dict[str, Any] = {
            "channels": self.channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }
        if self.interpolation != "bilinear":
            out["interpolation"] = self.interpolation
        if self.crop_mode != "center":
            out["crop_mode"] = self.crop_mode
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict` (older files hold a single mean and std, no resize)."""
        return cls(**data)


def imagenet_preprocess(
    image_size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocess:
    """torchvision's ImageNet evaluation transform, each part overridable."""
    size = image_size or IMAGENET_SIZE
    if resize is None:  # torchvision's ratio: 256 for 224
        resize = IMAGENET_RESIZE if size == IMAGENET_SIZE else round(size / 0.875)
    return Preprocess(
        channels=3,
        image_size=size,
        mean=tuple(mean or IMAGENET_MEAN),
        std=tuple(std or IMAGENET_STD),
        resize=resize,
    )


def fit_size(pp: Preprocess) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image transform of a decoded uint8 (C, H, W) tensor: resize to ``pp.resize_to`` as
    ``pp.crop_mode`` says (``pp.interpolation``, antialiased) and centre-crop ``image_size``,
    skipping what is already the right size; the evaluation transform of timm and torchvision.

    Augmentation and normalisation run later on whole batches (:func:`augment`,
    :func:`normalize`), on the training device: per-image transforms cost more than a small
    model's forward pass on a 2-core machine.
    """
    size, side, mode = pp.image_size, pp.resize_to, pp.crop_mode
    how = TF.InterpolationMode(pp.interpolation)
    # timm pads a ``border`` image with the mean colour, which normalises to 0.
    fill = [round(255 * m) for m in pp.mean]

    def fit(img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        if (h, w) == (size, size) and side == size:
            return img
        if mode == "center" and min(h, w) != side:
            img = TF.resize(img, [side], interpolation=how, antialias=True)
        elif mode == "squash" and (h, w) != (side, side):
            img = TF.resize(img, [side, side], interpolation=how, antialias=True)
        elif mode == "border" and max(h, w) != side:
            ratio = max(h, w) / side  # timm's ResizeKeepRatio(longest=1)
            img = TF.resize(img, [round(h / ratio), round(w / ratio)], how, antialias=True)
        if img.shape[-2:] != (size, size):
            img = _crop_or_pad(img, size, fill)
        return img

    return fit


def _crop_or_pad(img: torch.Tensor, size: int, fill: list[int]) -> torch.Tensor:
    """The centre ``size`` x ``size`` of ``img``, padded with ``fill`` where it is smaller."""
    h, w = img.shape[-2:]
    if h < size or w < size:
        canvas = torch.tensor(fill, dtype=img.dtype).view(-1, 1, 1)
        canvas = canvas.expand(img.shape[0], max(h, size), max(w, size)).clone()
        top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
        canvas[:, top : top + h, left : left + w] = img
        img = canvas
    return TF.center_crop(img, [size, size])


def random_resized_crop(
    size: int, scale: Sequence[float], ratio: Sequence[float], interpolation: str = "bilinear"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image training transform for real images: a random crop of ``scale`` of the area
    and ``ratio`` aspect, resized to ``size`` (antialiased), as torchvision's
    ``RandomResizedCrop``; draws from the torch RNG of the process that runs it."""
    from torchvision.transforms import v2

    how = TF.InterpolationMode(interpolation)
    return v2.RandomResizedCrop(
        size, scale=tuple(scale), ratio=tuple(ratio), interpolation=how, antialias=True
    )


def normalize(images: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """uint8 (N, C, H, W) → float, scaled to [0, 1] then normalised per channel by
    ``pp.mean``/``pp.std``; keeps the batch's memory format (channels-last stays so)."""
    x = images.float() / 255.0
    if len(pp.mean) == 1 and len(pp.std) == 1:
        return (x - pp.mean[0]) / pp.std[0]
    mean = torch.tensor(pp.mean, device=x.device).view(-1, 1, 1)
    std = torch.tensor(pp.std, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


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
    mean: Sequence[float],
    std: Sequence[float],
    resize: int = 0,
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
    return Preprocess(
        channels=channels, image_size=image_size, mean=tuple(mean), std=tuple(std), resize=resize
    )
