"""Teacher checkpoints combined into one ensemble checkpoint (``ssl-kd ensemble``).

The members are ssl_kd checkpoints (trained here, or external torchvision teachers imported as
checkpoints) that predict the same classes from the same preprocessing. The ensemble
checkpoint records each member's architecture, the file it came from and its sha256, and the
TTA views; see :mod:`ssl_kd.models.ensemble` for what it computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ssl_kd import storage
from ssl_kd.config import option
from ssl_kd.errors import UserError
from ssl_kd.models.checkpoint import (
    load_checkpoint,
    make_meta,
    model_from_checkpoint,
    save_checkpoint,
)
from ssl_kd.models.ensemble import ENSEMBLE, Ensemble, check_tta, default_shift
from ssl_kd.models.preprocess import Preprocess


@dataclass(frozen=True)
class EnsembleConfig:
    """``ssl-kd ensemble``."""

    members: list[str] = option(help="member checkpoints (ssl_kd checkpoints)", nargs="+")
    out: str = option(help="the ensemble checkpoint to write")
    tta: list[str] = option(
        [], help="test-time augmentation views besides the image: flip, shift", nargs="+"
    )
    shift: int | None = option(
        None, help="pixels of the shift views (default: the image side / 14)", min=1
    )


def run_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """Write the ensemble checkpoint of ``cfg``; returns its description."""
    ckpt = combine(cfg.members, cfg.tta, cfg.shift)
    path = save_checkpoint(cfg.out, ckpt)
    return {"checkpoint": path, "members": ckpt["meta"]["members"], "tta": ckpt["meta"]["tta"]}


def format_summary(cfg: EnsembleConfig, summary: dict[str, Any]) -> str:
    """The line ``ssl-kd ensemble`` prints."""
    archs = ", ".join(m["arch"] for m in summary["members"])
    views = " + ".join(["the image", *summary["tta"]])
    n = len(summary["members"])
    return f"ensemble of {n} ({archs}) over {views} -> {summary['checkpoint']}"


def combine(
    paths: Sequence[str], tta: Sequence[str] = (), shift: int | None = None
) -> dict[str, Any]:
    """The ensemble checkpoint (``model``, ``meta``) of the checkpoints at ``paths`` with the
    ``tta`` views; UserError when the members do not fit together."""
    if not paths:
        raise UserError("an ensemble needs at least one member checkpoint")
    try:
        views = check_tta(tta)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    members, metas = [], []
    for path in paths:
        if not storage.is_file(path):
            raise UserError(f"member checkpoint {storage.display(path)} does not exist")
        ckpt = load_checkpoint(path)
        meta = ckpt["meta"]
        if meta["arch"] == ENSEMBLE or meta.get("source") in _IMPORTED_ONLY:
            kind = "an ensemble" if meta["arch"] == ENSEMBLE else _IMPORTED_ONLY[meta["source"]]
            raise UserError(f"{path} is {kind}; members are single ssl_kd checkpoints")
        _check_fits(metas[0] if metas else None, meta, paths[0], path)
        model, _ = model_from_checkpoint(ckpt)
        members.append(model)
        metas.append({**meta, "file": storage.display(path), "sha256": storage.sha256(path)})
    first = metas[0]
    pp = Preprocess.from_dict(first["preprocess"])
    shift = default_shift(pp.image_size) if shift is None else shift
    ensemble = Ensemble(members, views, shift)
    meta = make_meta(ENSEMBLE, 1.0, 0.0, first["classes"], pp, {})
    meta["members"] = [
        {k: m.get(k, 0.0 if k == "dropout" else None) for k in _MEMBER_KEYS} for m in metas
    ]
    meta["tta"] = list(views)
    meta["shift"] = shift
    return {"model": ensemble.state_dict(), "meta": meta}


_MEMBER_KEYS = ("arch", "width", "dropout", "file", "sha256")
# Imported teachers that create_model cannot rebuild: archives referenced by path, CLIP towers.
_IMPORTED_ONLY = {
    "torchscript": "a TorchScript teacher",
    "exported": "an exported program",
    "open_clip": "a zero-shot CLIP teacher",
}


def _check_fits(first: dict[str, Any] | None, meta: dict[str, Any], p0: str, path: str) -> None:
    if first is None:
        return
    if meta["classes"] != first["classes"]:
        raise UserError(
            f"{path} predicts other classes than {p0}: ensemble members need the same classes "
            "in the same order"
        )
    if meta["preprocess"] != first["preprocess"]:
        raise UserError(
            f"{path} reads its images with other preprocessing than {p0} "
            f"({meta['preprocess']} vs {first['preprocess']}): ensemble members need the same"
        )
