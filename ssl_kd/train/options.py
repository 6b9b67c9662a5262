"""The configs of the trainers: :class:`TrainConfig` (``ssl-kd train``: the teacher and the
baseline), :class:`StudentConfig` (``ssl-kd pretrain``) and :class:`FinetuneConfig`
(``ssl-kd finetune``). All three share :class:`TrainOptions` and run the same loop
(:mod:`ssl_kd.train.worker`); they differ in their own keys and in
:meth:`TrainOptions.stream_seeds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ssl_kd.config import option
from ssl_kd.errors import ConfigError, UserError
from ssl_kd.models.registry import (
    SMALL_IMAGE,
    TORCHVISION,
    check_model_name,
    check_stochastic_depth,
)
from ssl_kd.models.timm_models import TIMM
from ssl_kd.shards.decode import DEFAULT_MAX_PIXELS

Recipe = Literal["small", "real"]


def _start_timeout() -> Any:
    """The ``start_timeout`` option of every Ray Train recipe."""
    return option(
        900.0,
        help="Ray: seconds a start or restart of the workers waits for the cluster to have room "
        "for all of them (a lost node replaced, an autoscaler's node up) before it fails",
        gt=0,
        operational=True,
    )


def _dist_timeout() -> Any:
    """The ``dist_timeout`` option of every Ray Train recipe."""
    return option(
        600.0,
        help="Ray: seconds a rank waits in a collective for its peers (a dead or stuck peer) "
        "before it fails; above the longest pause of rank 0 alone (an evaluation)",
        gt=0,
        operational=True,
    )


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
    weights: str | None = option(
        None,
        help="state_dict (safetensors or torch) initialising a torchvision:NAME or timm:NAME "
        "arch (new head)",
    )
    width: float = option(1.0, help="width multiplier of cnn models", gt=0)
    dropout: float = option(0.0, help="dropout before the classifier head", min=0, max=0.95)
    stochastic_depth: float | None = option(
        None,
        help="stochastic depth rate of torchvision archs that have it (efficientnet_*, "
        "convnext_*, swin_*, ...; default: the architecture's own)",
        min=0,
        max=0.95,
    )
    num_classes: int | None = option(None, help="number of classes (else from dataset.json)", min=1)
    class_names: str | None = option(None, help="file with one class name per line")
    channels: int | None = option(
        None,
        help="input channels, 1 or 3 (default: 3 for torchvision:NAME, timm:NAME or a mean of 3 "
        "values, else the first image's)",
    )
    image_size: int | None = option(None, help="input side in pixels (else from the images)", min=8)
    mean: list[float] = option([0.5], help="normalisation mean: one, or one per channel", nargs="+")
    std: list[float] = option(
        [0.5], help="normalisation std: one, or one per channel", gt=0, nargs="+"
    )
    resize: int | None = option(
        None,
        help="evaluation: shorter side before the centre crop (default: image_size/0.875 for "
        "the real recipe, image_size for the small one)",
        min=0,
    )
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
    augment: Literal["auto", "small", "real"] = option(
        "auto",
        help=f"small: padded crops; real: random-resized crops; auto: real from {SMALL_IMAGE} px",
    )
    crop_padding: int = option(
        2, help="small recipe: pixels of padding for random crops (0: no crop)", min=0
    )
    crop_scale: list[float] = option(
        [0.08, 1.0], help="real recipe: range of the crop's share of the image area", nargs="+"
    )
    crop_ratio: list[float] = option(
        [3 / 4, 4 / 3], help="real recipe: range of the crop's aspect ratio", nargs="+"
    )
    flip: bool = option(True, help="random horizontal flips")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", help="fp32, or autocast to bf16 or fp16 (fp16 with a gradient scaler)"
    )
    strong_ops: int = option(
        2,
        help="strong augmentation: RandAugment-style ops per image, each at a random magnitude",
        min=0,
    )
    cutout: float = option(
        0.5,
        help="strong augmentation: largest cutout square, a share of the side (0: none)",
        min=0,
        max=1,
    )
    ema_decay: float | None = option(
        None,
        help="keep an EMA of the weights, which the final checkpoint holds (default: 0.999 "
        "with --ssl, else none; 0: none)",
        min=0,
        max=0.99999,
    )
    unlabeled: str | None = option(
        None, help="--ssl: the unlabeled pool's shards (dir, brace pattern, glob or list file)"
    )
    ssl: Literal["none", "fixmatch"] = option(
        "none",
        help="fixmatch: also learn from the pool, each strong view's target being its weak "
        "view's confident prediction",
    )
    mu: int = option(7, help="--ssl: pool images per labeled image in a step", min=1)
    threshold: float = option(
        0.95, help="--ssl: confidence a weak view's prediction needs to be a target", gt=0, max=1
    )
    threshold_mode: Literal["fixed", "adaptive"] = option(
        "fixed",
        help="--ssl: one threshold for all classes, or FreeMatch's self-adaptive per-class ones",
    )
    threshold_momentum: float = option(
        0.999, help="--ssl adaptive: EMA momentum of the thresholds", min=0, max=0.99999
    )
    unsup_weight: float = option(1.0, help="--ssl: weight of the pool's loss", min=0)
    ssl_start: int = option(
        0, help="--ssl: supervised steps before the pool joins (a warm start in one run)", min=0
    )
    shuffle_buffer: int = option(5000, help="samples in the shuffle buffer", min=0)
    seed: int = option(0, help="random seed (init, data order, augmentation)")
    log_every: int = option(50, help="steps between metrics lines", min=1, operational=True)
    eval_every: int = option(
        0, help="steps between evaluations on val_data (0: at end)", min=0, operational=True
    )
    ckpt_every: int = option(500, help="steps between checkpoints", min=1, operational=True)
    num_workers: int | Literal["auto"] = option(
        "auto",
        help="DataLoader worker processes per rank (auto: none for the small recipe, else "
        "from the CPUs; on resume, the number the run started with)",
        min=0,
        operational=True,
    )
    decoded_cache_mb: int = option(
        256,
        help="MB of decoded images each data stream of a rank keeps for its later epochs when "
        "read in-process (0: decode on every read; training is the same either way)",
        min=0,
        operational=True,
    )
    device: str = option("auto", help="auto, cpu, cuda or cuda:N", operational=True)

    def ema(self) -> float:
        """The EMA decay in force (0: no EMA)."""
        if self.ema_decay is not None:
            return self.ema_decay
        return 0.999 if self.ssl != "none" else 0.0

    def recipe(self, image_size: int) -> Recipe:
        """The augmentation recipe for inputs of ``image_size`` px (``augment: auto``)."""
        if self.augment != "auto":
            return self.augment
        return "real" if image_size >= SMALL_IMAGE else "small"

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
    try:
        check_model_name(cfg.arch)
    except UserError as exc:
        raise ConfigError("arch", str(exc)) from None
    if cfg.weights is not None:
        if cfg.init:
            raise ConfigError("weights", "initialises a new model; init already gives weights")
        if not cfg.arch.startswith((TORCHVISION, TIMM)):
            raise ConfigError(
                "weights", f"initialises torchvision:NAME and timm:NAME archs, not {cfg.arch!r}"
            )
    if cfg.stochastic_depth is not None:
        if cfg.init:
            raise ConfigError("stochastic_depth", "sets up a new model; init already built one")
        try:
            check_stochastic_depth(cfg.arch)
        except UserError as exc:
            raise ConfigError("stochastic_depth", str(exc)) from None
    _check_ssl(cfg)
    _check_range("crop_scale", cfg.crop_scale, upper=1.0)
    _check_range("crop_ratio", cfg.crop_ratio)


def _check_ssl(cfg: TrainConfig | StudentConfig) -> None:
    """The --ssl keys: a pool with fixmatch and only then, steps left for it, no feature loss."""
    if cfg.ssl != "none" and cfg.unlabeled is None:
        raise ConfigError("unlabeled", f"--ssl {cfg.ssl} needs the pool's shards")
    if cfg.ssl == "none" and cfg.unlabeled is not None:
        raise ConfigError("ssl", "--unlabeled is read only with --ssl fixmatch")
    if cfg.ssl_start >= cfg.steps and cfg.ssl != "none":
        raise ConfigError(
            "ssl_start", f"{cfg.ssl_start} leaves none of the {cfg.steps} steps to the pool"
        )
    if cfg.ssl != "none" and cfg.feature_loss != "none":
        raise ConfigError("feature_loss", "does not combine with --ssl; train one or the other")


def _check_range(key: str, values: list[float], upper: float | None = None) -> None:
    """Two increasing values above 0 (and at most ``upper``)."""
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ConfigError(key, f"expected two increasing values above 0 (min max), got {values}")
    if upper is not None and values[1] > upper:
        raise ConfigError(key, f"must be at most {upper}, got {values}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainOptions):
    """``ssl-kd train``."""

    # Evaluations during training are printed on stdout (the students log them).
    evals_on_stdout: ClassVar[bool] = True
    # The student's own keys, fixed: the teacher and the baseline are the student's loop with
    # the hard loss, a kept head and no RandAugment (not fields, so not flags either).
    fresh_head: ClassVar[bool] = False
    loss: ClassVar[Literal["hard", "soft", "mixed"]] = "hard"
    temperature: ClassVar[float] = 1.0
    alpha: ClassVar[float] = 0.5
    randaugment: ClassVar[int] = 0
    randaugment_magnitude: ClassVar[int] = 9
    labeled_data: ClassVar[str | None] = None  # joint training: pretrain's alone
    labeled_share: ClassVar[float] = 0.0
    feature_loss: ClassVar[str] = "none"  # feature distillation: pretrain's alone
    feature_weight: ClassVar[float] = 0.0
    keep_projection: ClassVar[bool] = False
    strong_augment: ClassVar[bool] = False  # the pool's strong views are FixMatch's own
    sample_weights: ClassVar[bool] = False  # the selection's per-image weights: pretrain's alone

    init: str | None = option(
        None,
        help="start from this checkpoint's weights (a supervised or imported teacher to adapt "
        "to the pool with --ssl fixmatch)",
    )
    workers: int = option(1, help="Ray Train workers (DDP ranks)", min=1)
    use_gpu: bool = option(False, help="one GPU per worker (NCCL); else CPU (gloo)")
    executor: Literal["ray", "local"] = option(
        "local", help="one local process, or Ray Train", operational=True
    )
    max_failures: int = option(
        2, help="Ray: worker-group restarts from the last checkpoint", min=0, operational=True
    )
    start_timeout: float = _start_timeout()
    dist_timeout: float = _dist_timeout()

    def validate(self) -> None:
        """Cross-field checks (called by the config loader)."""
        _check(self)


@dataclass(frozen=True, kw_only=True)
class StudentOptions(TrainOptions):
    """The keys of the student's trainers, ``pretrain`` and ``finetune``."""

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
    strong_augment: bool = option(
        False,
        help="student noise, batched on the training device: --strong-ops RandAugment-style "
        "ops and a cutout on every training image (its label was computed on the clean image)",
    )
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
    start_timeout: float = _start_timeout()
    dist_timeout: float = _dist_timeout()
    device: str = option("auto", help="local executor: auto, cpu, cuda or cuda:N", operational=True)

    def validate(self) -> None:
        """Cross-field checks (called by the config loader)."""
        _check(self)

    def stream_seeds(self, rank: int) -> tuple[int, int]:
        """Every rank augments and reads the data in an order of its own."""
        return self.seed * 1009 + rank + 1, self.seed * 7919 + rank


@dataclass(frozen=True, kw_only=True)
class StudentConfig(StudentOptions):
    """``ssl-kd pretrain``: the student on pseudo-labeled shards (from ssl-kd materialize),
    optionally with true-labeled images mixed into every batch (joint training)."""

    labeled_data: str | None = option(
        None,
        help="joint training: true-labeled shards mixed into every batch (their classes must "
        "be the pseudo-labels' classes)",
    )
    labeled_share: float = option(
        0.25, help="with labeled_data: the share of each batch taken from it", gt=0, max=0.9
    )
    feature_loss: Literal["none", "cosine", "mse"] = option(
        "none",
        help="also match the student's penultimate features, through a linear projection, to "
        "the teacher embeddings stored in the shards (cosine or squared L2 distance)",
    )
    feature_weight: float = option(1.0, help="weight β of the feature loss", gt=0)
    keep_projection: bool = option(
        False, help="keep the feature projection in the final checkpoint (default: dropped)"
    )
    sample_weights: bool = option(
        False,
        help="weigh each image's pseudo-label loss by the weight the selection gave it "
        "(select --weights): weighted means Σ w·ℓ / Σ w",
    )

    def validate(self) -> None:
        """Cross-field checks (called by the config loader)."""
        super().validate()
        if self.labeled_data is not None and min(joint_split(self)) < 1:
            raise ConfigError(
                "labeled_share",
                f"{self.labeled_share} of a batch of {self.batch_size} leaves one part of the "
                "batch empty; change it or raise the batch size",
            )


def joint_split(cfg: Config) -> tuple[int, int]:
    """``(pseudo-labeled, true-labeled)`` images of each batch (no true-labeled ones without
    ``labeled_data``)."""
    if cfg.labeled_data is None:
        return cfg.batch_size, 0
    labeled = round(cfg.batch_size * cfg.labeled_share)
    return cfg.batch_size - labeled, labeled


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(StudentOptions):
    """``ssl-kd finetune``: the pretrained student on the true labels only."""

    labeled_data: ClassVar[str | None] = None  # the true labels are all it trains on
    labeled_share: ClassVar[float] = 0.0
    feature_loss: ClassVar[str] = "none"  # nor does it see the teacher's embeddings
    feature_weight: ClassVar[float] = 0.0
    keep_projection: ClassVar[bool] = False
    sample_weights: ClassVar[bool] = False  # true labels weigh alike

    data: str = option(help="labeled shards (the true labels)")
    init: str = option(help="pretrained student checkpoint")  # type: ignore[assignment]
    loss: Literal["hard", "soft", "mixed"] = option("hard", help="hard: the true labels")
    steps: int = option(1000, help="optimisation steps (the training budget)", min=1)
    lr: float = option(0.01, help="peak learning rate (lower than pretraining)", gt=0)
    warmup_steps: int = option(50, help="linear warm-up steps (cosine, constant)", min=0)


# Every trainer's config: the one training loop runs all three.
Config = TrainConfig | StudentOptions
