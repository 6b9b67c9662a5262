"""Options every trainer here shares: data, model, input format, optimisation, augmentation,
logging. ``ssl-kd train`` uses them as they are; the student trainer adds its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ssl_kd.config import option


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """Fields shared by :class:`~ssl_kd.train.supervised.TrainConfig` and the student configs."""

    data: str = option(help="labeled training shards (dir, brace pattern, glob or list file)")
    out: str = option(help="output directory (config, checkpoint, metrics)", operational=True)
    val_data: str | None = option(
        None, help="labeled shards evaluated during and after training", operational=True
    )
    arch: str = option("cnn", help="model architecture (see `ssl-kd models`)")
    width: float = option(1.0, help="width multiplier of cnn models", gt=0)
    dropout: float = option(0.0, help="dropout before the classifier head", min=0, max=0.95)
    num_classes: int | None = option(None, help="number of classes (else from dataset.json)", min=1)
    class_names: str | None = option(None, help="file with one class name per line")
    channels: int | None = option(None, help="input channels, 1 or 3 (else from the images)")
    image_size: int | None = option(None, help="input side in pixels (else from the images)", min=8)
    mean: float = option(0.5, help="normalisation mean")
    std: float = option(0.5, help="normalisation std", gt=0)
    steps: int = option(2000, help="optimisation steps (the training budget)", min=1)
    batch_size: int = option(128, help="images per step", min=2)
    optimizer: Literal["sgd", "adamw"] = option("sgd", help="optimizer")
    lr: float = option(0.1, help="peak learning rate", gt=0)
    weight_decay: float = option(5e-4, help="weight decay (not on biases/norms)", min=0)
    momentum: float = option(0.9, help="SGD momentum", min=0, max=1)
    schedule: Literal["cosine", "onecycle", "constant"] = option("cosine", help="LR schedule")
    warmup_steps: int = option(100, help="linear warm-up steps (cosine, constant)", min=0)
    label_smoothing: float = option(0.0, help="label smoothing", min=0, max=0.99)
    crop_padding: int = option(2, help="pixels of padding for random crops (0: no crop)", min=0)
    flip: bool = option(True, help="random horizontal flips")
    shuffle_buffer: int = option(5000, help="samples in the shuffle buffer", min=0)
    seed: int = option(0, help="random seed (init, data order, augmentation)")
    log_every: int = option(50, help="steps between metrics lines", min=1, operational=True)
    eval_every: int = option(
        0, help="steps between evaluations on val_data (0: at end)", min=0, operational=True
    )
    ckpt_every: int = option(500, help="steps between checkpoints", min=1, operational=True)
    num_workers: int = option(
        0, help="DataLoader workers (0 keeps resume exact)", min=0, operational=True
    )
    device: str = option("auto", help="auto, cpu, cuda or cuda:N", operational=True)
