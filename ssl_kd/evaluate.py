"""Evaluation of a classifier checkpoint on labeled shards: top-1 and top-5 accuracy."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ssl_kd import atomic
from ssl_kd import config as cfglib
from ssl_kd.config import option
from ssl_kd.device import resolve_device
from ssl_kd.preprocess import Preprocess, fit_size, normalize
from ssl_kd.shards import expand_shards
from ssl_kd.shards.dataset import ShardImageDataset
from ssl_kd.train.checkpoint import load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """``ssl-kd evaluate``."""

    checkpoint: str = option(help="checkpoint to evaluate")
    data: str = option(help="labeled shards (dir, brace pattern, glob or list file)")
    out: str | None = option(None, help="write the metrics as JSON to this file")
    batch_size: int = option(256, help="images per forward pass", min=1)
    num_workers: int = option(0, help="DataLoader worker processes", min=0)
    device: str = option("auto", help="auto, cpu, cuda or cuda:N")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    pp: Preprocess,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1, top-5 (top-k for fewer classes), mean cross-entropy and sample count."""
    model.eval()
    n = correct1 = correct5 = 0
    loss_sum = 0.0
    for images, labels in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        images = normalize(images.to(device, non_blocking=True), pp)
        labels = torch.as_tensor(labels).to(device)
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += len(labels)
    if n == 0:
        return {"n": 0, "top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
    return {"n": n, "top1": correct1 / n, "top5": correct5 / n, "loss": loss_sum / n}


def eval_loader(
    urls: list[str], pp: Preprocess, num_classes: int, batch_size: int, num_workers: int = 0
) -> DataLoader:
    """A deterministic loader over labeled shards prepared as ``pp`` says."""
    ds = ShardImageDataset(urls, fit_size(pp), pp.channels, num_classes=num_classes)
    # A private generator keeps evaluation from consuming the global RNG of a training run.
    return DataLoader(
        ds, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator()
    )


def run_evaluate(cfg: EvalConfig, progress: bool = False) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` on ``cfg.data``; writes ``cfg.out`` (JSON) when set."""
    ckpt = load_checkpoint(cfg.checkpoint)
    urls = expand_shards(cfg.data)
    model, meta = model_from_checkpoint(ckpt)
    device = resolve_device(cfg.device)
    model.to(device)
    pp = Preprocess.from_dict(meta["preprocess"])
    loader = eval_loader(urls, pp, meta["num_classes"], cfg.batch_size, cfg.num_workers)
    t0 = time.perf_counter()
    metrics = evaluate(model, loader, device, pp, progress)
    seconds = time.perf_counter() - t0
    stats = loader.dataset.stats.as_dict() if cfg.num_workers == 0 else None
    result = {
        **metrics,
        "seconds": round(seconds, 3),
        "images_per_s": round(metrics["n"] / seconds, 1) if seconds > 0 else None,
        "arch": meta["arch"],
        "checkpoint_step": ckpt.get("step"),
        "shards": len(urls),
        "read_stats": stats,
        "config": cfglib.to_dict(cfg),
    }
    if cfg.out:
        atomic.write_text(cfg.out, json.dumps(result, indent=2) + "\n")
    return result
