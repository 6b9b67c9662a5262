"""What a training run reads before any model exists: the shards, their classes, the input
format, the soft labels' k and temperature, joint training's labeled shards, the stored
teacher embeddings' dimension and whether the samples carry weights. Bad input raises
UserError here, before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssl_kd import storage
from ssl_kd.errors import UserError
from ssl_kd.models.checkpoint import load_checkpoint
from ssl_kd.models.ensemble import ENSEMBLE
from ssl_kd.models.preprocess import Preprocess
from ssl_kd.shards import expand_shards
from ssl_kd.shards.classes import dataset_info_near, resolve_classes
from ssl_kd.train.features import stored_embedding_dim
from ssl_kd.train.options import Config, Recipe
from ssl_kd.train.recipes import input_format


@dataclass(frozen=True)
class Inputs:
    """What the config's shards and init checkpoint say, before any model exists."""

    urls: list[str]
    classes: list[str]
    pp: Preprocess
    soft_k: int
    label_temperature: float
    recipe: Recipe
    labeled_urls: list[str] = field(default_factory=list)  # joint training's true labels
    embedding_dim: int = 0  # feature distillation: the stored teacher embeddings' dimension
    pool_urls: list[str] = field(default_factory=list)  # --ssl: the unlabeled pool's shards
    sample_weights: bool = False  # the loss reads each sample's weight


def read_inputs(cfg: Config) -> Inputs:
    """Shards, classes and preprocessing of ``cfg``; bad input raises UserError."""
    if cfg.weights is not None and not storage.is_file(cfg.weights):
        raise UserError(f"weights file {storage.display(cfg.weights)} does not exist")
    urls = expand_shards(cfg.data)
    classes = resolve_classes(urls, cfg.class_names, cfg.num_classes)
    info = dataset_info_near(urls)
    soft = (info or {}).get("soft_label") or {}
    if cfg.loss != "hard" and not soft:
        raise UserError(
            f"--loss {cfg.loss} needs soft labels, and {cfg.data} has none: use the shards "
            "written by ssl-kd materialize, or --loss hard"
        )
    if cfg.init:
        init_meta = load_checkpoint(cfg.init)["meta"]
        if init_meta["arch"] == ENSEMBLE:
            raise UserError(
                f"{cfg.init} is an ensemble; start from one of its members' checkpoints"
            )
        pp = Preprocess.from_dict(init_meta["preprocess"])
        if not cfg.fresh_head and init_meta["num_classes"] != len(classes):
            raise UserError(
                f"{cfg.init} predicts {init_meta['num_classes']} classes and {cfg.data} has "
                f"{len(classes)}: add --fresh-head to train a new classifier head"
            )
    else:
        pp = input_format(cfg, urls)
    soft_k = int(soft.get("k", 0)) if cfg.loss != "hard" else 0
    label_temperature = float(soft.get("temperature", 1.0))
    recipe = cfg.recipe(pp.image_size)
    labeled = _labeled_urls(cfg, classes)
    dim = 0
    if cfg.feature_loss != "none":
        dim = stored_embedding_dim(cfg.feature_loss, cfg.data, urls, info)
    pool = expand_shards(cfg.unlabeled) if cfg.unlabeled else []
    weighted = _check_weights(cfg, info)
    return Inputs(
        urls, classes, pp, soft_k, label_temperature, recipe, labeled, dim, pool, weighted
    )


def _check_weights(cfg: Config, info: dict | None) -> bool:
    """Whether the loss weighs samples; UserError when asked of shards that carry no weights."""
    if not cfg.sample_weights:
        return False
    if not (info or {}).get("weights"):
        raise UserError(
            f"--sample-weights needs per-sample weights in the shards, and {cfg.data} has none: "
            "select with --weights certainty (or certainty_balance), then materialize again"
        )
    return True


def _labeled_urls(cfg: Config, classes: list[str]) -> list[str]:
    """Joint training's true-labeled shards, checked to have the pseudo-labels' classes."""
    if cfg.labeled_data is None:
        return []
    urls = expand_shards(cfg.labeled_data)
    theirs = resolve_classes(urls, cfg.class_names, cfg.num_classes)
    if theirs != classes:
        raise UserError(
            f"--labeled-data {cfg.labeled_data} has classes {_names(theirs)} and {cfg.data} "
            f"has {_names(classes)}: joint training needs the same classes in the same order"
        )
    return urls


def _names(classes: list[str]) -> str:
    shown = ", ".join(classes[:5])
    return f"[{shown}{', ...' if len(classes) > 5 else ''}] ({len(classes)})"
