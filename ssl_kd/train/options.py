"""The configs of the trainers: :class:`TrainConfig` (``ssl-kd train``: the teacher and the
baseline), :class:`StudentConfig` (``ssl-kd pretrain``) and :class:`FinetuneConfig`
(``ssl-kd finetune``). All three share :class:`TrainOptions` and run the same loop
(:mod:`ssl_kd.train.worker`); they differ in their own keys and in
:meth:`TrainOptions.stream_seeds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ssl_kd.config import option
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.models.registry import list_models
from ssl_kd.shards.decode import DEFAULT_MAX_PIXELS


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """Fields shared by :class:`TrainConfig` and the student configs."""

    evals_on_stdout: ClassVar[bool] = False

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
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        help="images with more pixels are skipped unread (the decompression-bomb guard)",
        min=1,
    )
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

    def stream_seeds(self, rank: int) -> tuple[int | None, int]:
        """``(augmentation seed, data-order seed)`` of ``rank``; None: no reseed after the init.

        ``ssl-kd train`` augments from the stream that initialised the weights and reads every
        rank's shards in the order of ``seed``, as it always has, so its results reproduce.
        """
        return None, self.seed


def _check(cfg: TrainConfig | StudentConfig) -> None:
    if cfg.executor == "local" and cfg.workers > 1:
        raise UserError("--workers > 1 needs --executor ray (DDP ranks are Ray workers)")
    # Checked with the config, so `ssl-kd run` refuses a bad section before any stage runs.
    if cfg.arch is not None and cfg.arch not in list_models():
        raise ConfigError(
            "arch", f"unknown model {cfg.arch!r}; choose one of: {', '.join(list_models())}"
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainOptions):
    """``ssl-kd train``."""

    # Evaluations during training are printed on stdout (the students log them).
    evals_on_stdout: ClassVar[bool] = True
    # The student's own keys, fixed: the teacher and the baseline are the student's loop with no
    # init checkpoint, the hard loss and no RandAugment (not fields, so not flags either).
    init: ClassVar[str | None] = None
    fresh_head: ClassVar[bool] = False
    loss: ClassVar[Literal["hard", "soft", "mixed"]] = "hard"
    temperature: ClassVar[float] = 1.0
    alpha: ClassVar[float] = 0.5
    randaugment: ClassVar[int] = 0
    randaugment_magnitude: ClassVar[int] = 9

    workers: int = option(1, help="Ray Train workers (DDP ranks)", min=1)
    use_gpu: bool = option(False, help="one GPU per worker (NCCL); else CPU (gloo)")
    executor: Literal["ray", "local"] = option(
        "local", help="one local process, or Ray Train", operational=True
    )
    max_failures: int = option(
        2, help="Ray: worker-group restarts from the last checkpoint", min=0, operational=True
    )

    def validate(self) -> None:
        """Cross-field checks (called by the config loader)."""
        _check(self)


@dataclass(frozen=True, kw_only=True)
class StudentConfig(TrainOptions):
    """``ssl-kd pretrain``: the student on pseudo-labeled shards (from ssl-kd materialize)."""

    data: str = option(help="training shards (dir, brace pattern, glob or list file)")
    init: str | None = option(None, help="start from this checkpoint's weights")
    fresh_head: bool = option(False, help="with init: a new, randomly initialised classifier head")
    arch: str = option("cnn", help="student architecture (see `ssl-kd models`; init overrides)")
    dropout: float = option(0.0, help="dropout before the head (student noise)", min=0, max=0.95)
    loss: Literal["hard", "soft", "mixed"] = option(
        "hard", help="hard: CE on the selected class; soft: KD on the top-k; mixed: both"
    )
    temperature: float = option(1.0, help="KD temperature T (soft, mixed)", gt=0)
    alpha: float = option(0.5, help="weight of the KD part in mixed", min=0, max=1)
    label_smoothing: float = option(0.0, help="label smoothing of the hard part", min=0, max=0.99)
    randaugment: int = option(0, help="RandAugment ops per image (student noise; 0: off)", min=0)
    randaugment_magnitude: int = option(9, help="RandAugment magnitude", min=0, max=30)
    steps: int = option(5000, help="optimisation steps (the training budget)", min=1)
    batch_size: int = option(128, help="images per step on each worker", min=2)
    warmup_steps: int = option(200, help="linear warm-up steps (cosine, constant)", min=0)
    workers: int = option(1, help="Ray Train workers (DDP ranks)", min=1)
    use_gpu: bool = option(False, help="one GPU per worker (NCCL); else CPU (gloo)")
    executor: Literal["ray", "local"] = option(
        "ray", help="Ray Train, or one local process", operational=True
    )
    max_failures: int = option(
        2, help="worker-group restarts from the last checkpoint", min=0, operational=True
    )
    num_workers: int = option(
        0, help="DataLoader workers per rank (0 keeps resume exact)", min=0, operational=True
    )
    device: str = option("auto", help="local executor: auto, cpu, cuda or cuda:N", operational=True)

    def validate(self) -> None:
        """Cross-field checks (called by the config loader)."""
        _check(self)

    def stream_seeds(self, rank: int) -> tuple[int, int]:
        """Every rank augments and reads the data in an order of its own."""
        return self.seed * 1009 + rank + 1, self.seed * 7919 + rank


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(StudentConfig):
    """``ssl-kd finetune``: the pretrained student on the true labels only."""

    data: str = option(help="labeled shards (the true labels)")
    init: str = option(help="pretrained student checkpoint")  # type: ignore[assignment]
    loss: Literal["hard", "soft", "mixed"] = option("hard", help="hard: the true labels")
    steps: int = option(1000, help="optimisation steps (the training budget)", min=1)
    lr: float = option(0.01, help="peak learning rate (lower than pretraining)", gt=0)
    warmup_steps: int = option(50, help="linear warm-up steps (cosine, constant)", min=0)
