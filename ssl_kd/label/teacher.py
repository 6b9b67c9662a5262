"""Teacher labeling core (no Ray): one shard in, one table of top-k soft pseudo-labels out.

:class:`Teacher` loads a checkpoint once and maps a uint8 image batch to top-k classes and
probabilities (softmax at temperature T) and, optionally, L2-normalised penultimate embeddings.
:func:`label_shard` streams one shard through it — a background thread reads and decodes the
next batch while the model runs on this one — and :func:`label_shard_to_dir` writes the result
(errors file first, then the Parquet file, both atomically).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ssl_kd import atomic, storage
from ssl_kd.device import resolve_device
from ssl_kd.errors import UserError
from ssl_kd.label.files import LabelMeta, build_table, label_file_name, write_labels
from ssl_kd.models.checkpoint import load_checkpoint, model_from_checkpoint
from ssl_kd.models.preprocess import Preprocess, fit_size, normalize
from ssl_kd.shards.reader import DEFAULT_MAX_PIXELS, ReadStats, decoded_samples, iter_shard
from ssl_kd.shards.spec import shard_name


class Teacher:
    """A checkpoint loaded once for inference; ``predict`` maps uint8 batches to top-k labels."""

    def __init__(
        self,
        checkpoint: str,
        k: int = 10,
        temperature: float = 1.0,
        embeddings: bool = False,
        device: str = "auto",
    ) -> None:
        ckpt = load_checkpoint(checkpoint)
        try:
            model, meta = model_from_checkpoint(ckpt)
        except (KeyError, TypeError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise UserError(
                f"{checkpoint}: weights do not fit its architecture ({first})"
            ) from None
        if not 1 <= k <= meta["num_classes"]:
            raise UserError(
                f"--k {k} does not fit the teacher's {meta['num_classes']} classes; "
                f"use 1..{meta['num_classes']}"
            )
        if temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {temperature}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.pp = Preprocess.from_dict(meta["preprocess"])
        self.k = k
        self.temperature = temperature
        self.embeddings = embeddings
        self.meta = LabelMeta(
            num_classes=meta["num_classes"],
            classes=list(meta["classes"]),
            k=k,
            temperature=float(temperature),
            teacher_arch=meta["arch"],
            teacher_sha256=storage.sha256(checkpoint),
            preprocess=self.pp.to_dict(),
            embedding_dim=model.feature_dim if embeddings else 0,
        )

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """uint8 (N, C, H, W) → (top-k classes, top-k probabilities, embeddings or None)."""
        x = normalize(images.to(self.device, non_blocking=True), self.pp)
        feats = self.model.features(x)
        logits = self.model.head(feats)  # eval mode: dropout is the identity
        probs = torch.softmax(logits.float() / self.temperature, dim=1)
        top = probs.topk(self.k, dim=1, sorted=True)
        emb = None
        if self.embeddings:
            emb = torch.nn.functional.normalize(feats.float(), dim=1).half().cpu().numpy()
        return top.indices.cpu().numpy(), top.values.cpu().numpy(), emb


@dataclass
class ShardResult:
    """One labeled shard: its table, what the read skipped, and where the time went."""

    shard: str
    table: pa.Table
    stats: ReadStats
    seconds: dict[str, float] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        """JSON-able per-shard summary."""
        return {
            "shard": self.shard,
            "rows": self.table.num_rows,
            "skipped": self.stats.skipped,
            "truncated": self.shard in self.stats.truncated_shards,
            "empty": self.table.num_rows == 0 and self.stats.skipped == 0,
            "reasons": dict(self.stats.reasons),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }


_DONE = object()


def _prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``it`` in a background thread, ``depth`` items ahead (decode overlaps inference)."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def worker() -> None:
        try:
            for item in it:
                q.put(item)
            q.put(_DONE)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not _DONE:
        if isinstance(item, BaseException):
            raise item
        yield item


def _batches(
    url: str,
    pp: Preprocess,
    batch_size: int,
    stats: ReadStats,
    timer: dict[str, float],
    max_pixels: int,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    keys: list[str] = []
    images: list[torch.Tensor] = []
    t0 = time.perf_counter()
    decoded = decoded_samples(
        iter_shard(url, stats),
        stats,
        pp.channels,
        labeled=False,
        transform=fit_size(pp),
        max_pixels=max_pixels,
        size=pp.image_size,
    )
    for key, img, _ in decoded:
        keys.append(key)
        images.append(img)
        if len(keys) == batch_size:
            timer["read_decode"] += time.perf_counter() - t0
            yield keys, torch.stack(images)
            keys, images = [], []
            t0 = time.perf_counter()
    timer["read_decode"] += time.perf_counter() - t0
    if keys:
        yield keys, torch.stack(images)


def label_shard(
    teacher: Teacher, url: str, batch_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ShardResult:
    """Label every readable sample of one shard (bad samples are skipped and counted)."""
    stats = ReadStats()
    timer = {"read_decode": 0.0, "forward": 0.0}
    start = time.perf_counter()
    all_keys: list[str] = []
    classes, probs, embs = [], [], []
    for keys, images in _prefetch(_batches(url, teacher.pp, batch_size, stats, timer, max_pixels)):
        t0 = time.perf_counter()
        c, p, e = teacher.predict(images)
        timer["forward"] += time.perf_counter() - t0
        all_keys += keys
        classes.append(c)
        probs.append(p)
        if e is not None:
            embs.append(e)
    k = teacher.k
    dim = teacher.meta.embedding_dim
    table = build_table(
        teacher.meta,
        shard_name(url),
        all_keys,
        np.concatenate(classes) if classes else np.zeros((0, k), np.int64),
        np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
        (np.concatenate(embs) if embs else np.zeros((0, dim), np.float16)) if dim else None,
    )
    timer["total"] = time.perf_counter() - start
    return ShardResult(shard_name(url), table, stats, timer)


def errors_file_name(shard_url: str) -> str:
    """``u-000012.errors.jsonl``: the bad samples of a shard, beside its labels."""
    return label_file_name(shard_url).removesuffix(".parquet") + ".errors.jsonl"


def label_shard_to_dir(
    teacher: Teacher,
    url: str,
    out: str | Path,
    batch_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict:
    """Label ``url`` into ``out``: errors file (if any), then the Parquet file; both atomic."""
    result = label_shard(teacher, url, batch_size, max_pixels)
    t0 = time.perf_counter()
    if result.stats.errors:
        lines = "".join(json.dumps(e) + "\n" for e in result.stats.errors)
        atomic.write_text(storage.join(out, errors_file_name(url)), lines)
    path = write_labels(result.table, storage.join(out, label_file_name(url)))
    result.seconds["write"] = time.perf_counter() - t0
    status = result.status()
    status["bytes"] = storage.size(path)
    status["worker"] = os.getpid()
    return status
