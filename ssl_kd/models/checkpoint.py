"""Checkpoints: ``state_dict``s plus JSON-able metadata, loadable with ``weights_only=True``.

Layout, the same for every trainer (``ssl-kd train``, ``pretrain``, ``finetune``)::

    model       the model's state_dict (unwrapped: no DDP ``module.`` prefix)
    optimizer   the optimizer's state_dict
    scheduler   {"kind", "step"}: the schedule is a pure function of the config and the step
    step        optimisation steps taken
    ranks       one entry per DDP rank, in rank order: {"epoch", "seen_in_epoch", "rng"}, where
                that rank's batch stream is and its RNG states (:func:`rng_state`), and with
                loader workers ``worker_seen`` (samples taken from each) and ``turn``
    scaler      fp16 training only: the gradient scaler's state
    meta        arch, width, dropout, classes, preprocessing, config, versions (:func:`make_meta`)

Checkpoints that only carry weights (``model``, ``meta``) load for inference. Before one layout,
``ssl-kd train`` stored its single rank's ``epoch``, ``seen_in_epoch`` and ``rng`` at top level
instead of ``ranks``; :func:`rank_states` reads both.
"""

from __future__ import annotations

import io
import os
import random
from typing import Any

import torch

from ssl_kd import __version__, storage
from ssl_kd.atomic import atomic_path
from ssl_kd.errors import UserError
from ssl_kd.models.ensemble import ENSEMBLE, Ensemble
from ssl_kd.models.preprocess import Preprocess
from ssl_kd.models.registry import Classifier, create_model
from ssl_kd.models.weights_file import read_weights

FORMAT_VERSION = 1


def make_meta(
    arch: str,
    width: float,
    dropout: float,
    classes: list[str],
    preprocess: Preprocess,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Metadata every checkpoint carries, enough to rebuild the model and its input transform."""
    return {
        "format_version": FORMAT_VERSION,
        "ssl_kd_version": __version__,
        "arch": arch,
        "width": width,
        "dropout": dropout,
        "num_classes": len(classes),
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "config": config,
    }


def rng_state() -> dict[str, Any]:
    """Torch and Python RNG states (what augmentation and init draw from)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def rank_states(ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-rank stream positions and RNG states of a resumable checkpoint (either layout)."""
    if "ranks" in ckpt:
        return list(ckpt["ranks"])
    return [{"epoch": ckpt["epoch"], "seen_in_epoch": ckpt["seen_in_epoch"], "rng": ckpt["rng"]}]


def save_checkpoint(path: str | os.PathLike[str], ckpt: dict[str, Any]) -> str:
    """Write atomically (temp file + rename, or one put): a checkpoint is always complete."""
    # Serialised in memory first: torch.save's own writer reports a full disk as an opaque
    # RuntimeError ("unexpected pos"); a plain file write raises OSError ENOSPC with the path.
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())
    return os.fspath(path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load with ``weights_only=True`` onto the CPU; bad paths or files (a safetensors file
    included: it holds no metadata) raise UserError."""
    p = storage.display(path)
    if not storage.is_file(path):
        if storage.is_dir(path):
            raise UserError(f"checkpoint {p} is a directory: pass the file ({p}/checkpoint.pt)")
        raise UserError(f"checkpoint {p} does not exist")
    ckpt, kind = read_weights(os.fspath(path), "ssl_kd checkpoint")
    if kind == "safetensors":  # tensors only: an architecture's weights, without ssl_kd's meta
        raise UserError(
            f"{p} is a safetensors state_dict, not an ssl_kd checkpoint: name its architecture "
            "(--arch or --teacher torchvision:NAME or timm:NAME) and pass the file as --weights"
        )
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise UserError(f"{p} is not an ssl_kd checkpoint (no 'model' and 'meta' entries)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[Classifier | Ensemble, dict[str, Any]]:
    """Rebuild the classifier (or ensemble) described by ``ckpt['meta']`` and load its weights."""
    meta = ckpt["meta"]
    pp = Preprocess.from_dict(meta["preprocess"])
    n = meta["num_classes"]
    if meta["arch"] == ENSEMBLE:
        members = [
            create_model(m["arch"], n, pp.channels, pp.image_size, m["width"], m["dropout"])
            for m in meta["members"]
        ]
        model: Classifier | Ensemble = Ensemble(members, meta["tta"], meta["shift"])
    else:
        dropout = meta.get("dropout", 0.0)
        model = create_model(meta["arch"], n, pp.channels, pp.image_size, meta["width"], dropout)
    model.load_state_dict(ckpt["model"])
    return model, meta


def check_resumable(
    saved: dict[str, Any],
    now: dict[str, Any],
    operational: frozenset[str],
    out: str | os.PathLike[str],
) -> None:
    """UserError when the config of the run in ``out`` differs from ``now`` in a key outside
    ``operational`` (keys that change where or how a run is watched, not what it computes)."""
    for key, value in saved.items():
        if key not in operational and now.get(key) != value:
            raise UserError(
                f"{out} holds a run with a different config ({key}: {value!r} there, "
                f"{now.get(key)!r} now); choose another --out or remove it"
            )
