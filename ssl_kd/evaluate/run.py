"""Evaluation of a classifier checkpoint on labeled shards.

The metrics come from :mod:`ssl_kd.evaluate.metrics`; :mod:`ssl_kd.models.stats` adds size and
CPU speed.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from ssl_kd import atomic
from ssl_kd import config as cfglib
from ssl_kd.config import option
from ssl_kd.device import resolve_device
from ssl_kd.errors import UserError
from ssl_kd.evaluate import reference_cache
from ssl_kd.evaluate.metrics import Reference, eval_loader, predict, score
from ssl_kd.models.external import TeacherSpec, load_teacher
from ssl_kd.models.preprocess import Preprocess
from ssl_kd.models.stats import cpu_speed, model_size
from ssl_kd.shards import expand_shards
from ssl_kd.shards.decode import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

# Above this many classes the per-class table is left to the JSON file.
MAX_PRINTED_CLASSES = 20


@dataclass(frozen=True)
class EvalConfig:
    """``ssl-kd evaluate``."""

    checkpoint: str = option(help="checkpoint to evaluate")
    data: str = option(help="labeled shards (dir, brace pattern, glob or list file)")
    teacher: str | None = option(
        None,
        help="teacher checkpoint, TorchScript archive or exported program: adds top-1 agreement, "
        "KL(teacher||student), teacher top-1 and the linear CKA of the penultimate features",
    )
    out: str | None = option(None, help="write the metrics as JSON to this file", operational=True)
    teacher_cache: str | None = option(
        None,
        help="directory keeping the teacher's outputs on this data, a file per teacher and data: "
        "the first evaluation writes them, later ones read them instead of running the teacher "
        "(the same metrics, without the teacher's forward pass)",
        operational=True,
    )
    batch_size: int = option(256, help="images per forward pass", min=1)
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", help="forward-pass precision (autocast)"
    )
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        help="images with more pixels are skipped unread (the decompression-bomb guard)",
        min=1,
    )
    num_workers: int = option(0, help="DataLoader worker processes", min=0, operational=True)
    device: str = option("auto", help="auto, cpu, cuda or cuda:N", operational=True)
    latency: bool = option(True, help="time CPU latency (batch 1) and throughput (batch 256)")
    latency_budget_s: float = option(
        1.0, help="seconds spent on each CPU timing", gt=0, operational=True
    )


def check_teacher(meta: dict[str, Any], teacher_meta: dict[str, Any], teacher_path: str) -> None:
    """UserError unless the teacher predicts the same classes (each model reads the images
    with its own preprocessing)."""
    if teacher_meta["num_classes"] != meta["num_classes"]:
        raise UserError(
            f"teacher {teacher_path} has {teacher_meta['num_classes']} classes but the evaluated "
            f"model has {meta['num_classes']}"
        )
    if list(teacher_meta["classes"]) != list(meta["classes"]):
        # Names may come from different sources (ids vs dataset.json) for the same label order.
        log.warning("teacher class names differ from the model's; comparing by class index")


def _reference(
    cfg: EvalConfig, meta: dict[str, Any], urls: list[str]
) -> tuple[Reference, dict[str, Any], str | None]:
    """The teacher to compare with (with its stored outputs where ``teacher_cache`` has them),
    the fidelity block's teacher fields, and the key to store its outputs under (None: not
    stored)."""
    assert cfg.teacher
    loaded = load_teacher(TeacherSpec(cfg.teacher))
    check_teacher(meta, loaded.meta, cfg.teacher)
    t_pp = Preprocess.from_dict(loaded.meta["preprocess"])
    key = cached = None
    if cfg.teacher_cache:
        settings = {"precision": cfg.precision, "max_pixels": cfg.max_pixels}
        # The worker count fixes the order in which the images come.
        settings["num_workers"] = cfg.num_workers
        key = reference_cache.cache_key(loaded.digest, urls, t_pp.to_dict(), **settings)
        if key is not None:
            cached = reference_cache.load(cfg.teacher_cache, key)
    shape = (t_pp.channels, t_pp.image_size, t_pp.image_size)
    info = {"teacher": cfg.teacher, "teacher_arch": loaded.meta["arch"]}
    info |= {f"teacher_{k}": v for k, v in model_size(loaded.model, shape).items()}
    return Reference(loaded.model, t_pp, cached), info, key


def run_evaluate(cfg: EvalConfig, progress: bool = False) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` on ``cfg.data``; writes ``cfg.out`` (JSON) when set."""
    evaluated = load_teacher(TeacherSpec(cfg.checkpoint))
    urls = expand_shards(cfg.data)
    model, meta = evaluated.model, evaluated.meta
    pp = Preprocess.from_dict(meta["preprocess"])
    teacher: Reference | None = None
    teacher_info: dict[str, Any] = {}
    cache_key = None
    if cfg.teacher:
        teacher, teacher_info, cache_key = _reference(cfg, meta, urls)
    device = resolve_device(cfg.device)
    shape = (pp.channels, pp.image_size, pp.image_size)
    size = model_size(model, shape)
    # Timed while the model is still on the CPU, whatever device evaluates it.
    speed = cpu_speed(model, shape, cfg.latency_budget_s) if cfg.latency else None
    model.to(device)
    if teacher is not None:
        teacher.model.to(device)
    # With stored teacher outputs too: the teacher's geometry decides how JPEGs are decoded.
    t_pp = teacher.pp if teacher is not None else None
    loader = eval_loader(
        urls,
        pp,
        meta["num_classes"],
        cfg.batch_size,
        cfg.num_workers,
        cfg.max_pixels,
        t_pp,
        pin_memory=device.type == "cuda",
    )
    t0 = time.perf_counter()
    p = predict(
        model,
        loader,
        device,
        pp,
        teacher,
        progress,
        precision=cfg.precision,
        keep_teacher_outputs=cache_key is not None,
    )
    metrics = score(p, detailed=True, classes=meta["classes"])
    seconds = time.perf_counter() - t0
    if metrics["n"] == 0:
        raise UserError(
            f"no usable image in the {len(urls)} shard(s) of {cfg.data}: nothing to evaluate "
            "(the log lists why samples were skipped)"
        )
    if cfg.teacher_cache and cache_key is not None and p.teacher_outputs is not None:
        reference_cache.save(cfg.teacher_cache, cache_key, p.teacher_outputs)
    if "fidelity" in metrics:
        metrics["fidelity"] = {**teacher_info, **metrics["fidelity"]}
    stats = loader.dataset.stats.as_dict() if cfg.num_workers == 0 else None
    result = {
        **metrics,
        "fidelity": metrics.get("fidelity"),
        "model": size,
        "cpu": speed,
        "seconds": round(seconds, 3),
        "images_per_s": round(metrics["n"] / seconds, 1) if seconds > 0 else None,
        "arch": meta["arch"],
        "precision": cfg.precision,
        "checkpoint_step": evaluated.step,
        "shards": len(urls),
        "read_stats": stats,
        "config": cfglib.to_dict(cfg),
    }
    if cfg.out:
        atomic.write_text(cfg.out, json.dumps(result, indent=2) + "\n")
    return result


def _si(x: float) -> str:
    """1234567 → '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:g}"


def format_summary(cfg: EvalConfig, r: dict[str, Any]) -> str:
    """The printable summary of :func:`run_evaluate`'s result (``ssl-kd evaluate``'s stdout)."""
    out = r["config"].get("out")
    lines = [
        f"{r['arch']} on {r['n']} images: top-1 {100 * r['top1']:.2f}%  "
        f"top-5 {100 * r['top5']:.2f}%  ({r['seconds']:.1f} s, {r['images_per_s']} img/s)"
        + (f" -> {out}" if out else "")
    ]
    cal = r["calibration"]
    lines.append(
        f"calibration: ECE {100 * cal['ece']:.2f}% ({cal['n_bins']} bins)  "
        f"mean confidence {100 * cal['confidence_mean']:.2f}%"
    )
    m = r["model"]
    lines.append(
        f"size: {_si(m['params'])} params  {_si(m['macs'])} MACs/image  {m['size_mb']:.2f} MB"
    )
    if r["cpu"]:
        cpu = r["cpu"]
        lines.append(
            f"CPU ({cpu['threads']} threads): {cpu['latency_ms']:.2f} ms/image at batch 1, "
            f"{cpu['images_per_s']:.0f} img/s at batch {cpu['throughput_batch']}"
        )
    if r["fidelity"]:
        f = r["fidelity"]
        lines.append(
            f"teacher {f['teacher_arch']} ({_si(f['teacher_params'])} params, "
            f"{_si(f['teacher_macs'])} MACs): agreement {100 * f['agreement']:.2f}%  "
            f"KL(teacher||student) {f['kl']:.4f} nats  teacher top-1 {100 * f['teacher_top1']:.2f}%"
            # A TorchScript teacher gives logits only: no features to compare.
            + (f"  CKA {f['cka']:.4f}" if f.get("cka") is not None else "  CKA n/a")
        )
    if len(r["per_class"]) <= MAX_PRINTED_CLASSES:
        lines.append(f"{'class':>5} {'name':<20} {'n':>7} {'top-1':>8}")
        for row in r["per_class"]:
            acc = f"{100 * row['top1']:.2f}%" if row["top1"] is not None else "-"
            lines.append(f"{row['class']:>5} {row['name'][:20]:<20} {row['n']:>7} {acc:>8}")
    return "\n".join(lines)
