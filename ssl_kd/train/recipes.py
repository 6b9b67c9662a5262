"""What a training image goes through before the model: the input format a config asks for,
the per-image part of its augmentation recipe, and how many loader processes read it.

Two recipes (``cfg.recipe``): ``small`` (28-32 px data, the demo) fits each image to size, and
padded crops and flips follow on whole batches on the training device; ``real`` takes a
random-resized crop of each image where it is decoded (in the loader workers), and flips follow
on whole batches. Evaluation resizes and centre-crops (:func:`fit_size`) either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ssl_kd.device import usable_cpus
from ssl_kd.models.preprocess import Preprocess, fit_size, infer_preprocess, random_resized_crop
from ssl_kd.models.registry import TORCHVISION
from ssl_kd.models.timm_models import TIMM
from ssl_kd.train.options import Config, Recipe

# num_workers auto: more decoding processes per rank than this rarely pay for their memory.
MAX_AUTO_WORKERS = 8
# torchvision's evaluation ratio of crop to resized side (224 of 256).
CROP_FRACTION = 0.875


def input_format(cfg: Config, urls: list[str]) -> Preprocess:
    """The config's input format; the real recipe evaluates at torchvision's resize ratio."""
    channels = cfg.channels
    if channels is None and (
        cfg.arch.startswith((TORCHVISION, TIMM)) or 3 in (len(cfg.mean), len(cfg.std))
    ):
        channels = 3  # an RGB model, whatever the mode of the first image of the shards
    pp = infer_preprocess(urls, channels, cfg.image_size, cfg.mean, cfg.std)
    resize = cfg.resize
    if resize is None:
        real = cfg.recipe(pp.image_size) == "real"
        resize = round(pp.image_size / CROP_FRACTION) if real else 0
    return replace(pp, resize=resize)


def loader_workers(requested: int | str, recipe: Recipe, shards: int, local_ranks: int) -> int:
    """DataLoader worker processes for one rank: ``requested``, or for ``auto`` none with the
    small recipe (a 28-px batch is cheaper to augment in-process than to pass between
    processes) and else the rank's share of the CPUs less one for the training loop, at most
    one per shard and :data:`MAX_AUTO_WORKERS`."""
    if requested != "auto":
        return int(requested)
    if recipe == "small":
        return 0
    return max(1, min(MAX_AUTO_WORKERS, usable_cpus() // local_ranks - 1, shards))


def image_transform(
    cfg: Config, pp: Preprocess, recipe: Recipe
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-image part of the recipe: the small one's fit to size, or the real one's
    random-resized crop; then RandAugment when asked for."""
    if recipe == "real":
        scale, ratio = cfg.crop_scale, cfg.crop_ratio
        first = random_resized_crop(pp.image_size, scale, ratio, pp.interpolation)
    else:
        first = fit_size(pp)
    if not cfg.randaugment:
        return first
    from torchvision.transforms import v2

    noise = v2.RandAugment(num_ops=cfg.randaugment, magnitude=cfg.randaugment_magnitude)

    def transform(img: torch.Tensor) -> torch.Tensor:
        return noise(first(img))

    return transform
