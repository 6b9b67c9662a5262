"""``ssl-kd train``: supervised training on labeled shards (the teacher, or the baseline).

Outputs in ``out``: ``config.yaml`` (resolved), ``checkpoint.pt`` (resumable, every
``ckpt_every`` steps and at the end), ``metrics.jsonl`` (one line per ``log_every`` steps and
per evaluation) and ``summary.json``. Rerunning with the same ``out`` and config resumes.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from ssl_kd import atomic, storage
from ssl_kd import config as cfglib
from ssl_kd.device import resolve_device
from ssl_kd.evaluate.metrics import eval_loader, evaluate
from ssl_kd.models.checkpoint import (
    check_resumable,
    load_checkpoint,
    make_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ssl_kd.models.preprocess import augment, fit_size, infer_preprocess, normalize
from ssl_kd.models.registry import create_model
from ssl_kd.shards import expand_shards
from ssl_kd.shards.classes import resolve_classes
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.train.loop import MetricsLog, StreamState, cross_entropy, stream_batches, train_step
from ssl_kd.train.optim import build_optimizer
from ssl_kd.train.options import TrainOptions
from ssl_kd.train.schedule import lr_schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainOptions):
    """``ssl-kd train``."""


def run_train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) as ``cfg`` says; returns the summary also written to summary.json."""
    urls = expand_shards(cfg.data)
    val_urls = expand_shards(cfg.val_data) if cfg.val_data else []
    classes = resolve_classes(urls, cfg.class_names, cfg.num_classes)
    pp = infer_preprocess(urls, cfg.channels, cfg.image_size, cfg.mean, cfg.std)
    device = resolve_device(cfg.device)
    out = cfg.out
    ckpt_path = storage.join(out, "checkpoint.pt")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = create_model(cfg.arch, len(classes), pp.channels, pp.image_size, cfg.width, cfg.dropout)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    schedule = lr_schedule(cfg.schedule, cfg.lr, cfg.steps, cfg.warmup_steps)
    meta = make_meta(cfg.arch, cfg.width, cfg.dropout, classes, pp, cfglib.to_dict(cfg))
    step, state = 0, StreamState()
    if storage.is_file(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        check_resumable(
            ckpt["meta"]["config"], cfglib.to_dict(cfg), cfglib.operational_keys(type(cfg)), out
        )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        state = StreamState(int(ckpt["epoch"]), int(ckpt["seen_in_epoch"]))
        set_rng_state(ckpt["rng"])
        log.info("resuming %s from step %d", out, step)
    model.to(device)
    cfglib.save(cfg, storage.join(out, "config.yaml"))
    metrics_log = MetricsLog(storage.join(out, "metrics.jsonl"))

    def save() -> None:
        save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": {"kind": cfg.schedule, "step": step},
                "step": step,
                "epoch": state.epoch,
                "seen_in_epoch": state.seen_in_epoch,
                "rng": rng_state(),
                "meta": meta,
            },
        )

    def run_eval() -> dict[str, Any]:
        loader = eval_loader(val_urls, pp, len(classes), 256, cfg.num_workers)
        result = evaluate(model, loader, device, pp)
        metrics_log.write({"step": step, **{f"val_{k}": v for k, v in result.items()}})
        return result

    dataset = ShardImageDataset(
        urls,
        fit_size(pp),
        pp.channels,
        num_classes=len(classes),
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
    )
    loss_fn = cross_entropy(cfg.label_smoothing)
    start_step, t0 = step, time.perf_counter()
    window: list[float] = []
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        unit="step",
        desc="train",
        disable=not progress,
        mininterval=1,
    )
    batches = stream_batches(dataset, cfg.batch_size, state, cfg.num_workers)
    while step < cfg.steps:
        images, labels = next(batches)
        images = augment(images.to(device), cfg.crop_padding, cfg.flip)
        parts = train_step(
            model, normalize(images, pp), labels.to(device), optimizer, schedule[step], loss_fn
        )
        step += 1
        window.append(parts["loss"])
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t0
            rate = (step - start_step) * cfg.batch_size / elapsed
            loss = sum(window) / len(window)
            metrics_log.write(
                {
                    "step": step,
                    "epoch": state.epoch,
                    "lr": float(schedule[step - 1]),
                    "loss": loss,
                    "images_per_s": rate,
                }
            )
            bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.0f}")
            window.clear()
        if val_urls and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            bar.write(f"step {step}: val top1 {run_eval()['top1']:.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save()
    bar.close()
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {
        "step": step,
        "resumed_at": start_step,
        "arch": cfg.arch,
        "classes": classes,
        "train_seconds": round(seconds, 2),
        "images_per_s": round((step - start_step) * cfg.batch_size / seconds, 1)
        if step > start_step
        else None,
        "skipped_samples": dataset.stats.skipped,
        "checkpoint": str(ckpt_path),
    }
    if val_urls:
        summary["val"] = run_eval()
    atomic.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary
