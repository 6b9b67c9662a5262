"""The options of ``ssl-kd label`` (and of ``jobs/label.py`` and a pipeline's ``label:``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ssl_kd.config import option
from ssl_kd.shards.decode import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class LabelConfig:
    """``ssl-kd label``."""

    teacher: str = option(
        help="teacher: an ssl_kd checkpoint, a TorchScript archive, an exported program "
        "(torch.export), torchvision:NAME or timm:NAME[.TAG] (with --weights) or open_clip:ARCH "
        "(zero-shot CLIP, with --weights and --class-names)"
    )
    shards: str = option(help="unlabeled shards (dir, brace pattern, glob or list file)")
    out: str = option(
        help="directory of label files (one Parquet file per shard)", operational=True
    )
    weights: str | None = option(
        None,
        help="torchvision:NAME, timm:NAME and open_clip:ARCH teachers: the state_dict file, "
        "safetensors or torch (nothing is downloaded)",
    )
    class_names: str | None = option(
        None, help="external teachers: one class name per line, in the teacher's order"
    )
    prompts: str | None = option(
        None, help="open_clip:ARCH teachers: prompt templates, one per line with {} for the class"
    )
    keep_classes: str | None = option(
        None, help="label with these classes only (names or indices, one per line); renormalised"
    )
    image_size: int | None = option(
        None, help="external teachers: centre-crop side (default 224, timm: its config's)", min=8
    )
    resize: int | None = option(
        None,
        help="external teachers: shorter side before the crop (default 256 for 224, timm: "
        "from its config's crop_pct)",
        min=8,
    )
    mean: list[float] | None = option(
        None,
        help="external teachers: per-channel mean (default ImageNet's, timm: its config's)",
        nargs="+",
    )
    std: list[float] | None = option(
        None,
        help="external teachers: per-channel std (default ImageNet's, timm: its config's)",
        nargs="+",
    )
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", help="forward-pass precision (autocast; bf16 also on CPUs with AMX)"
    )
    tta: list[str] = option(
        [],
        help="test-time augmentation: average the teacher's probabilities over the image and "
        "these views (flip, shift)",
        nargs="+",
    )
    k: int = option(10, help="classes kept per image", min=1)
    temperature: float = option(1.0, help="softmax temperature of the soft labels", gt=0)
    embeddings: bool = option(False, help="also store L2-normalised float16 embeddings")
    jpeg_draft: bool = option(
        True,
        help="decode a JPEG larger than the teacher needs at a reduced scale (PIL's draft "
        "mode: several times faster on web photos; the pixels differ slightly from a full "
        "decode and resize)",
    )
    batch_size: int = option(256, help="images per forward pass", min=1)
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        help="images with more pixels are skipped unread (the decompression-bomb guard)",
        min=1,
    )
    executor: Literal["ray", "local"] = option(
        "ray", help="Ray actors, or this process only", operational=True
    )
    workers: int = option(0, help="worker actors (0: one per GPU, else per cpus_per_worker)", min=0)
    cpus_per_worker: int = option(
        1,
        help="CPUs per worker actor (its decode processes and torch threads share them)",
        min=1,
        operational=True,
    )
    decode_workers: int = option(
        0,
        help="processes decoding and resizing images in each worker (0: the worker's CPUs "
        "with a GPU, 1 on the CPU; 1: a thread of the worker); the forward pass keeps the CPUs "
        "left over, at least 1",
        min=0,
        operational=True,
    )
    max_retries: int = option(2, help="retries of a failed shard", min=0, operational=True)
    device: str = option("auto", help="auto, cpu, cuda or cuda:N", operational=True)
