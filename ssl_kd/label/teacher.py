"""Teacher labeling core (no Ray): one shard in, one table of top-k soft pseudo-labels out.

:class:`Teacher` loads a checkpoint once and maps a uint8 image batch to top-k classes and
probabilities (softmax at temperature T) and, optionally, L2-normalised penultimate embeddings.
:func:`label_shard` streams one shard through it — a background thread prepares the next batch,
decoded by a pool of processes (:mod:`ssl_kd.shards.decode_pool`) or in that thread, while the
model runs on this one — and :func:`label_shard_to_dir` writes the result (errors file first,
then the Parquet file, both atomically).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ssl_kd import atomic, storage
from ssl_kd.device import autocast, resolve_device, use_channels_last
from ssl_kd.errors import UserError
from ssl_kd.label.files import LabelMeta, build_table, label_file_name, write_labels
from ssl_kd.models.ensemble import Ensemble, check_tta, default_shift, features_and_logits
from ssl_kd.models.external import TeacherSpec, load_teacher
from ssl_kd.models.preprocess import Preprocess, fit_size, normalize
from ssl_kd.shards.background import in_background
from ssl_kd.shards.decode_pool import DecodeSpec, decode_in_order
from ssl_kd.shards.reader import DEFAULT_MAX_PIXELS, ReadStats, decoded_samples, iter_shard
from ssl_kd.shards.spec import shard_name

log = logging.getLogger(__name__)


class Teacher:
    """A teacher loaded once for inference; ``predict`` maps uint8 batches to top-k labels.

    The teacher is an ssl_kd checkpoint, a torchvision or timm classifier with a weights file,
    a TorchScript archive, an exported program or a zero-shot CLIP model
    (:class:`~ssl_kd.models.external.TeacherSpec`). On CUDA a batch that
    runs out of memory is split in halves and retried, and the smaller size is kept.
    """

    def __init__(
        self,
        spec: TeacherSpec | str,
        k: int = 10,
        temperature: float = 1.0,
        embeddings: bool = False,
        device: str = "auto",
        precision: str = "fp32",
        jpeg_draft: bool = True,
        tta: Sequence[str] = (),
    ) -> None:
        spec = TeacherSpec(spec) if isinstance(spec, str) else spec
        loaded = load_teacher(spec)
        meta = loaded.meta
        if not 1 <= k <= meta["num_classes"]:
            raise UserError(
                f"--k {k} does not fit the teacher's {meta['num_classes']} classes; "
                f"use 1..{meta['num_classes']}"
            )
        if temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {temperature}")
        if embeddings and not loaded.has_features:
            raise UserError(
                "--embeddings needs a teacher whose penultimate features are known (an ssl_kd "
                "checkpoint, torchvision:NAME, timm:NAME or open_clip:ARCH); a TorchScript "
                "archive or an exported program gives logits only"
            )
        self.device = resolve_device(device)
        self.pp = Preprocess.from_dict(meta["preprocess"])
        self.precision = precision
        self.channels_last = use_channels_last(self.device, precision, self.pp.image_size)
        model = _with_tta(loaded.model, tta, self.pp, spec.teacher).to(self.device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.k = k
        self.temperature = temperature
        self.embeddings = embeddings
        self.jpeg_draft = jpeg_draft
        self.max_batch: int | None = None  # lowered after a CUDA out-of-memory error
        self.meta = LabelMeta(
            num_classes=meta["num_classes"],
            classes=list(meta["classes"]),
            k=k,
            temperature=float(temperature),
            teacher_arch=meta["arch"],
            teacher_sha256=loaded.digest,
            preprocess=self.pp.to_dict(),
            embedding_dim=model.feature_dim if embeddings else 0,
            extra={
                "teacher": _provenance(loaded.source),
                "precision": precision,
                "jpeg_draft": jpeg_draft,  # its labels differ slightly from a full decode's
                **_ensemble_extra(model, meta),
            },
        )

    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """uint8 (N, C, H, W) → (top-k classes, top-k probabilities, embeddings or None)."""
        n = len(images)
        step = min(n, self.max_batch or n)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        i = 0
        while i < n:
            try:
                parts.append(self._predict(images[i : i + step]))
            except torch.OutOfMemoryError:
                if step == 1:
                    raise
                step //= 2
                self.max_batch = step
                log.warning("out of memory on the accelerator: labeling batch halved to %d", step)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            i += step
        classes = np.concatenate([p[0] for p in parts])
        probs = np.concatenate([p[1] for p in parts])
        emb = np.concatenate([p[2] for p in parts]) if self.embeddings else None  # type: ignore[misc]
        return classes, probs, emb

    @torch.inference_mode()
    def _predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if self.device.type == "cuda":
            images = images.pin_memory()
        x = normalize(images.to(self.device, non_blocking=True), self.pp)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            if self.embeddings:
                feats, logits = features_and_logits(self.model, x)
            else:
                feats, logits = None, self.model(x)
        probs = torch.softmax(logits.float() / self.temperature, dim=1)
        top = probs.topk(self.k, dim=1, sorted=True)
        emb = None
        if feats is not None:
            emb = torch.nn.functional.normalize(feats.float(), dim=1).half().cpu().numpy()
        return top.indices.cpu().numpy(), top.values.cpu().numpy(), emb


def _with_tta(model: torch.nn.Module, tta: Sequence[str], pp: Preprocess, name: str) -> Any:
    """``model`` averaged over the ``tta`` views (an ensemble of one), or as it is."""
    if not tta:
        return model
    try:
        views = check_tta(tta)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if isinstance(model, Ensemble):
        if model.tta:
            raise UserError(
                f"{name} is an ensemble with its own test-time augmentation "
                f"({', '.join(model.tta)}); label it without --tta"
            )
        model.tta = views
        return model
    return Ensemble([model], views, default_shift(pp.image_size))


def _ensemble_extra(model: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """What the label metadata records of an ensemble: its members and views."""
    if not isinstance(model, Ensemble):
        return {}
    extra: dict[str, Any] = {"tta": list(model.tta)}
    if "members" in meta:
        extra["members"] = meta["members"]
    return extra


def _provenance(source: dict[str, Any]) -> dict[str, Any]:
    """Where the teacher came from, as the label files record it (names and digests, no paths:
    the same teacher labels the same way wherever its files are)."""
    return {k: v for k, v in source.items() if v is not None}


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


def decode_spec(
    pp: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS, jpeg_draft: bool = True
) -> DecodeSpec:
    """How labeling decodes for a teacher with input ``pp`` (what decode processes run); with
    ``jpeg_draft``, a JPEG larger than needed is decoded at a reduced scale (never below the
    resize target), else in full."""
    return DecodeSpec(pp.channels, max_pixels, pp.resize_to if jpeg_draft else 0, partial(_fit, pp))


def _fit(pp: Preprocess, img: torch.Tensor) -> torch.Tensor:
    """``fit_size(pp)(img)`` as a function that pickles (decode processes run it)."""
    return fit_size(pp)(img)


def _batches(
    url: str,
    spec: DecodeSpec,
    batch_size: int,
    stats: ReadStats,
    timer: dict[str, float],
    decode_workers: int = 1,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    keys: list[str] = []
    images: list[torch.Tensor] = []
    t0 = time.perf_counter()
    decoded: Iterator[tuple[str, torch.Tensor]]
    if decode_workers > 1:
        decoded = decode_in_order(partial(iter_shard, url), stats, spec, decode_workers)
    else:  # in this thread: no processes to start or feed for one decoder
        serial = decoded_samples(
            iter_shard(url, stats),
            stats,
            spec.channels,
            labeled=False,
            transform=spec.transform,
            max_pixels=spec.max_pixels,
            size=spec.size,
        )
        decoded = ((key, img) for key, img, _ in serial)
    for key, img in decoded:
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
    teacher: Teacher,
    url: str,
    batch_size: int = 256,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_workers: int = 1,
) -> ShardResult:
    """Label every readable sample of one shard (bad samples are skipped and counted), decoding
    on ``decode_workers`` processes (1: a thread of this process); the labels and skips do not
    depend on ``decode_workers``."""
    if decode_workers < 1:
        raise ValueError(f"decode_workers must be >= 1, got {decode_workers}")
    stats = ReadStats()
    timer = {"read_decode": 0.0, "forward": 0.0}
    start = time.perf_counter()
    all_keys: list[str] = []
    classes, probs, embs = [], [], []
    spec = decode_spec(teacher.pp, max_pixels, teacher.jpeg_draft)
    batches = _batches(url, spec, batch_size, stats, timer, decode_workers)
    for keys, images in in_background(batches):
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
    decode_workers: int = 1,
) -> dict:
    """Label ``url`` into ``out``: errors file (if any), then the Parquet file; both atomic."""
    result = label_shard(teacher, url, batch_size, max_pixels, decode_workers)
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
