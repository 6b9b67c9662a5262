"""Strong augmentation of whole uint8 batches: RandAugment-style ops and cutout, one draw per
image (Cubuk et al. 2020; the FixMatch variant, Sohn et al. 2020: each image gets ``ops``
operations chosen at random, each at a random magnitude, then one cutout square).

Per-image ``torchvision.transforms.v2.RandAugment`` calls cost more than a small model's
forward pass on a 2-core machine (the earlier noisy-student measurement: 3x slower training), so
each op here runs once per batch on the images that drew it, with per-image magnitudes, on the
training device. Geometric ops (rotate, shear, translate) are one ``grid_sample`` of per-image
affine matrices; ``equalize`` and ``autocontrast`` are torchvision's batched v2 kernels. Gray
(C=1) and colour (C=3) images alike: ``color`` (saturation) leaves a gray image as it is.

Every draw comes from the global CPU torch RNG, whatever the batch's device, so a checkpointed
RNG state replays the same augmentation (as :func:`ssl_kd.models.preprocess.augment` does).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Grey of the filled-in area (rotations, shears, translations and cutout), as FixMatch's RA.
FILL = 127


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (N, 1, H, W) of float images, ITU-R 601 weights as PIL's ``L`` mode."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``other + factor·(x − other)`` per image, clamped to [0, 255] (PIL's ImageEnhance)."""
    f = factor.view(-1, 1, 1, 1)
    return (other + f * (x - other)).clamp(0, 255)


def _identity(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x


def _autocontrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return TF.autocontrast(x.round().to(torch.uint8)).float()


def _equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return TF.equalize(x.round().to(torch.uint8)).float()


def _brightness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), 0.05 + 0.9 * m * 2)  # factor in [0.05, 1.85]


def _color(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).expand_as(x), 0.05 + 0.9 * m * 2)


def _contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    return _blend(x, mean, 0.05 + 0.9 * m * 2)


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # PIL's SMOOTH kernel; the border keeps its pixels, as PIL's and torchvision's do.
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(x, smooth, 0.05 + 0.9 * m * 2)


def _posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    bits = (4 + (m * 4).floor().clamp(max=3)).view(-1, 1, 1, 1)  # 4..7 bits kept
    step = 2.0 ** (8 - bits)
    return (x.round() / step).floor() * step


def _solarize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    threshold = (256 * (1 - m)).view(-1, 1, 1, 1)  # m = 0: nothing inverted
    return torch.where(x >= threshold, 255 - x, x)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-image affine maps (N, 2, 3) in normalised coordinates; nearest pixels, grey fill."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Shift by the fill so the zero padding of grid_sample becomes grey.
    out = F.grid_sample(x - FILL, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out + FILL


def _eye(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(2, 3, device=device).repeat(n, 1, 1)


def _signed(m: torch.Tensor) -> torch.Tensor:
    """A magnitude in [0, 1] with a random sign (drawn from the CPU RNG, then moved)."""
    sign = torch.where(torch.rand(len(m)) < 0.5, -1.0, 1.0).to(m.device)
    return m * sign


def _rotate(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    angle = _signed(m) * math.radians(30)
    theta = _eye(len(x), x.device)
    cos, sin = angle.cos(), angle.sin()
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    return _affine(x, theta)


def _shear_x(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    theta = _eye(len(x), x.device)
    theta[:, 0, 1] = _signed(m) * 0.3
    return _affine(x, theta)


def _shear_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    theta = _eye(len(x), x.device)
    theta[:, 1, 0] = _signed(m) * 0.3
    return _affine(x, theta)


def _translate_x(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    theta = _eye(len(x), x.device)
    theta[:, 0, 2] = _signed(m) * 0.3 * 2  # normalised coordinates span 2: 30% of the width
    return _affine(x, theta)


def _translate_y(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    theta = _eye(len(x), x.device)
    theta[:, 1, 2] = _signed(m) * 0.3 * 2
    return _affine(x, theta)


# FixMatch's RandAugment pool (its Table 12), magnitudes in [0, 1] mapped to each op's range.
OPS: dict[str, Op] = {
    "identity": _identity,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "brightness": _brightness,
    "color": _color,
    "contrast": _contrast,
    "sharpness": _sharpness,
    "posterize": _posterize,
    "solarize": _solarize,
    "rotate": _rotate,
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
}


def cutout(images: torch.Tensor, size: float) -> torch.Tensor:
    """One grey square per image, its side a random share in (0, ``size``] of the image's
    shorter side, centred anywhere (clipped at the border), as FixMatch's RA does."""
    n, _, h, w = images.shape
    dev = images.device
    side = (torch.rand(n) * size * min(h, w)).round().clamp(min=1).to(dev)
    cy = (torch.rand(n) * h).floor().to(dev)
    cx = (torch.rand(n) * w).floor().to(dev)
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    y0, x0 = (cy - side / 2).view(-1, 1, 1), (cx - side / 2).view(-1, 1, 1)
    s = side.view(-1, 1, 1)
    inside = (rows >= y0) & (rows < y0 + s) & (cols >= x0) & (cols < x0 + s)
    return torch.where(inside[:, None], torch.full_like(images, FILL), images)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the CPU kernels inside on one thread, then restore the thread count.

    The ops here are many small kernels on a few hundred small images: splitting each over
    intra-op threads costs more in synchronisation than it saves, badly so when the cores are
    busy (measured on 2 cores under load: 420 ms a batch of 192 28-px images on 2 threads,
    12 ms on one). Kernels on an accelerator are not affected.
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def strong_augment(images: torch.Tensor, ops: int = 2, cutout_size: float = 0.5) -> torch.Tensor:
    """``ops`` random ops at random magnitudes, then cutout (``cutout_size`` 0: none), for each
    image of a uint8 (N, C, H, W) batch; returns a uint8 batch of the same shape and device."""
    with one_cpu_thread(images.device):
        return _strong_augment(images, ops, cutout_size)


def _strong_augment(images: torch.Tensor, ops: int, cutout_size: float) -> torch.Tensor:
    n = len(images)
    names = list(OPS)
    x = images.float()
    for _ in range(ops):
        choice = torch.randint(0, len(names), (n,))
        magnitude = torch.rand(n)
        for i, name in enumerate(names):
            idx = (choice == i).nonzero().squeeze(1)
            if len(idx) == 0 or name == "identity":
                continue
            idx_dev = idx.to(x.device)
            x[idx_dev] = OPS[name](x[idx_dev], magnitude[idx].to(x.device))
    out = x.round().clamp(0, 255).to(torch.uint8)
    if cutout_size > 0:
        out = cutout(out, cutout_size)
    return out
