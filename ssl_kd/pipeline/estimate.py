"""``ssl-kd estimate``: project labeling time and storage to a billion images from measurements.

Throughput comes from, in this order: ``--images-per-s`` (your measurement on one worker, e.g.
one GPU); ``--from-bench`` (the JSON of ``bench/label_throughput.py``: the best end-to-end
pipeline figure, scaled by the ratio of multiply-accumulates when ``--model`` or
``--image-size`` differ from the benchmarked model's); or a forward pass of ``--model`` timed
here (an upper bound: decoding and writing are not in it). Storage per image is measured by
writing a sample of label and selection rows with the real writers, and by ``--image-bytes``
for the materialised shards. Every input is echoed in the output, so a projection can be
checked and redone.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ssl_kd.config import option
from ssl_kd.errors import UserError

SAMPLE_ROWS = 100_000  # rows written to measure bytes per label / selection row
# A tar member costs a 512-byte header plus padding to 512 bytes: about 768 bytes on average.
TAR_MEMBER_OVERHEAD = 768
MEMBERS_PER_SAMPLE = 3  # image, .cls, .json soft label


@dataclass(frozen=True)
class EstimateConfig:
    """``ssl-kd estimate``."""

    images: float = option(help="unlabeled images to label (e.g. 1e9)", gt=0)
    model: str = option("resnet50", help="teacher architecture (see `ssl-kd models`)")
    image_size: int = option(224, help="teacher input side in pixels", min=8)
    channels: int = option(3, help="input channels", min=1)
    num_classes: int = option(1000, help="classes", min=2)
    gpus: int = option(1, help="workers labeling in parallel (GPUs, or CPU workers)", min=1)
    images_per_s: float | None = option(
        None, help="measured images/s of one worker (overrides --from-bench)", gt=0
    )
    from_bench: str | None = option(None, help="JSON written by bench/label_throughput.py --out")
    device: Literal["gpu", "cpu"] = option(
        "gpu", help="what one worker is (names the worker-hours in the output)"
    )
    k: int = option(10, help="classes kept per image", min=1)
    embedding_dim: int = option(0, help="stored embedding size (0: none)", min=0)
    per_class: int = option(16000, help="K: images selected per class", min=1)
    top_p: int = option(10, help="P: candidate classes per image", min=1)
    image_bytes: int = option(110_000, help="mean encoded image size in the source shards", min=1)
    budget_s: float = option(2.0, help="seconds spent timing the forward pass (no bench)", gt=0)


def _macs(model: str, channels: int, size: int, num_classes: int) -> int:
    from ssl_kd.models.registry import create_model
    from ssl_kd.models.stats import count_macs

    return int(count_macs(create_model(model, num_classes, channels, size), (channels, size, size)))


def throughput(cfg: EstimateConfig) -> dict[str, Any]:
    """Images/s of one worker and where the figure comes from."""
    if cfg.images_per_s:
        return {"images_per_s": cfg.images_per_s, "source": "--images-per-s"}
    if cfg.from_bench:
        path = Path(cfg.from_bench)
        try:
            bench = json.loads(path.read_text())
            best = max(bench["pipeline"].items(), key=lambda kv: kv[1]["images_per_s"])
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(
                f"{path} is not a bench/label_throughput.py report ({type(exc).__name__})"
            ) from None
        measured = float(best[1]["images_per_s"])
        bench_macs = _macs(bench["arch"], 1, int(bench["image_size"]), 10)
        macs = _macs(cfg.model, cfg.channels, cfg.image_size, cfg.num_classes)
        return {
            "images_per_s": measured * bench_macs / macs,
            "source": f"{path}: {bench['arch']} at {bench['image_size']} px, {best[0]}, "
            f"{measured:.1f} img/s end to end, scaled by MACs {bench_macs:,} / {macs:,}",
            "bytes_per_image_measured": best[1].get("bytes_per_image"),
        }
    import torch

    from ssl_kd.models.registry import create_model
    from ssl_kd.models.stats import cpu_speed

    model = create_model(cfg.model, cfg.num_classes, cfg.channels, cfg.image_size)
    speed = cpu_speed(model, (cfg.channels, cfg.image_size, cfg.image_size), cfg.budget_s, 32)
    return {
        "images_per_s": float(speed["images_per_s"]),
        "source": f"bare forward of {cfg.model} timed here (CPU, {torch.get_num_threads()} "
        "threads, batch 32): an upper bound without decoding and writing",
    }


def bytes_per_row(cfg: EstimateConfig) -> dict[str, float]:
    """Parquet bytes per label row and per selection row, measured on a random sample."""
    from ssl_kd.label.files import LabelMeta, build_table, write_labels
    from ssl_kd.select.files import build_selection, write_selection

    rng = np.random.default_rng(0)
    n, k = SAMPLE_ROWS, min(cfg.k, cfg.num_classes)
    # Random classes and sorted Dirichlet probabilities compress worse than real labels: the
    # figure errs on the large side.
    classes = np.argsort(rng.random((n, cfg.num_classes)), axis=1)[:, :k]
    probs = -np.sort(-rng.dirichlet(np.full(k, 0.3), n), axis=1)
    emb = rng.standard_normal((n, cfg.embedding_dim)) if cfg.embedding_dim else None
    meta = LabelMeta(
        cfg.num_classes,
        [str(i) for i in range(cfg.num_classes)],
        k,
        1.0,
        cfg.model,
        "0" * 64,
        {},
        cfg.embedding_dim,
    )
    keys = [f"{i:012d}" for i in range(n)]
    table = build_table(meta, "u-000000", keys, classes, probs, emb)
    with tempfile.TemporaryDirectory() as tmp:
        label_path = Path(write_labels(table, Path(tmp) / "labels.parquet"))
        ones = np.ones(n, np.int64)
        selection = build_selection(table, classes[:, 0], probs[:, 0], np.arange(n), ones)
        sel_path = Path(write_selection(selection, meta, tmp))
        return {"label": label_path.stat().st_size / n, "selection": sel_path.stat().st_size / n}


def estimate(cfg: EstimateConfig) -> dict[str, Any]:
    """The projection: wall hours, worker-hours and storage, with every input it used."""
    if cfg.top_p > cfg.k:
        raise UserError(f"--top-p {cfg.top_p} exceeds --k {cfg.k}: P classes must be stored")
    speed = throughput(cfg)
    sizes = bytes_per_row(cfg)
    images = float(cfg.images)
    wall_h = images / (speed["images_per_s"] * cfg.gpus) / 3600
    selected = min(images * cfg.top_p, float(cfg.per_class) * cfg.num_classes)
    sample_bytes = cfg.image_bytes + TAR_MEMBER_OVERHEAD * MEMBERS_PER_SAMPLE + 16 * cfg.k
    return {
        "inputs": {**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, **speed},
        "labeling": {
            "images_per_s_per_worker": round(speed["images_per_s"], 1),
            "workers": cfg.gpus,
            "wall_hours": round(wall_h, 2),
            f"{cfg.device}_hours": round(wall_h * cfg.gpus, 1),
        },
        "storage_bytes": {
            "labels": round(images * sizes["label"]),
            "selection": round(selected * sizes["selection"]),
            "materialised_shards": round(selected * sample_bytes),
        },
        "bytes_per_row": {k: round(v, 1) for k, v in sizes.items()},
        "selected_images": round(selected),
    }


def _si_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_estimate(e: dict[str, Any]) -> str:
    """A few lines for people; the JSON form has everything."""
    i, lab, st = e["inputs"], e["labeling"], e["storage_bytes"]
    hours_key = next(k for k in lab if k.endswith("_hours") and k != "wall_hours")
    return "\n".join(
        [
            f"{i['images']:.3g} images through {i['model']} at {i['image_size']} px",
            f"throughput: {lab['images_per_s_per_worker']:,} img/s per worker ({i['source']})",
            f"labeling: {lab['wall_hours']:,} h wall on {lab['workers']} worker(s), "
            f"{lab[hours_key]:,} {hours_key.replace('_', '-')}",
            f"labels: {_si_bytes(st['labels'])} ({e['bytes_per_row']['label']} B/image, k={i['k']}"
            + (f", {i['embedding_dim']}-d embeddings" if i["embedding_dim"] else "")
            + ")",
            f"selection: {e['selected_images']:,} rows (K={i['per_class']} x {i['num_classes']} "
            f"classes), {_si_bytes(st['selection'])}",
            f"materialised shards: {_si_bytes(st['materialised_shards'])} "
            f"({i['image_bytes']:,} B/image + tar headers)",
        ]
    )


def format_summary(cfg: EstimateConfig, e: dict[str, Any]) -> str:
    """What ``ssl-kd estimate`` prints (``--json`` prints ``e`` itself)."""
    return format_estimate(e)
