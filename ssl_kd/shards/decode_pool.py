"""Decoding on worker processes: one thread reads a shard, a pool decodes, results in order.

A GPU labeling worker is given several CPUs to keep its accelerator fed; decoding and resizing
are where those CPUs go. :func:`decode_in_order` reads the tar sequentially in one thread, sends
chunks of raw samples round-robin to worker processes (:mod:`ssl_kd.shards.process_pool`) that
run the one guarded decode path (:func:`~ssl_kd.shards.reader.decoded_samples`), and yields the
decoded images in stream order. The skips are those of a serial read, in the same order:
reader-level records (duplicate or unsafe keys, a truncated tar) and each sample's decode record
are replayed into the caller's :class:`ReadStats` at the sample's place in the stream, so labels
and errors files do not depend on the number of processes.

Processes, not threads: per image, opening the header, EXIF, mode conversion and the resize
dispatch hold the GIL about 35-40% of the time, so threads stop scaling after two or three
cores, and any other Python work in the process (the tar reader, Ray's threads) slows them
further. The pool is started once per process and reused by every read (starting interpreters
that import torch takes seconds; each holds ~380 MB of its own memory). At most
:data:`IN_FLIGHT_PER_WORKER` chunks per process are in flight, each of at most :data:`CHUNK`
samples and about :data:`CHUNK_BYTES`: memory stays bounded.

A worker that dies fails the read with :class:`~ssl_kd.shards.process_pool.WorkerDied`; one
that hangs fails it with ``TimeoutError``. Either way the pool is killed and the next read
starts a fresh one; the caller's retry policy decides what happens to the shard. An exception
raised in a worker is raised again in the reader, as a serial read would raise it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ssl_kd.shards import process_pool
from ssl_kd.shards.background import in_background
from ssl_kd.shards.decode import DEFAULT_MAX_PIXELS
from ssl_kd.shards.process_pool import ProcessPool, WorkerDied
from ssl_kd.shards.reader import decoded_samples
from ssl_kd.shards.skips import ReadStats

CHUNK = 32  # samples per task: the per-task cost is small against 32 decodes
CHUNK_BYTES = 16 << 20  # ... or fewer, when the images are large
IN_FLIGHT_PER_WORKER = 2  # chunks sent ahead per process: keeps it busy, bounds memory

Record = tuple[str, str | None, str, str]  # (shard, key, reason, detail) for ReadStats.record


@dataclass(frozen=True)
class DecodeSpec:
    """How a worker decodes: the arguments of ``decoded_samples`` (``transform`` must pickle:
    a module-level function, or a partial of one)."""

    channels: int | None
    max_pixels: int = DEFAULT_MAX_PIXELS
    size: int = 0
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class _Recorder(ReadStats):
    """ReadStats that keeps records in order instead of logging them (replayed later)."""

    pending: list[Record] = field(default_factory=list)

    def record(self, shard: str, key: str | None, reason: str, detail: str = "") -> None:
        self.pending.append((shard, key, reason, detail))

    def take(self) -> list[Record]:
        taken, self.pending = self.pending, []
        return taken


@dataclass
class _Decoded:
    """A decoded chunk: per sample its skip records and whether it decoded, and the decoded
    images, stacked when they share a shape (one buffer to send instead of many)."""

    records: list[list[Record]]
    ok: list[bool]
    images: np.ndarray | list[np.ndarray]


def decode_chunk(samples: list[dict[str, Any]], spec: DecodeSpec) -> _Decoded:
    """Decode raw samples (in a worker process) as :func:`decoded_samples` does."""
    rec = _Recorder()
    records: list[list[Record]] = []
    images: list[np.ndarray] = []
    ok: list[bool] = []
    for sample in samples:
        decoded = decoded_samples(
            [sample],
            rec,
            spec.channels,
            labeled=False,
            transform=spec.transform,
            max_pixels=spec.max_pixels,
            size=spec.size,
        )
        got = next(decoded, None)
        records.append(rec.take())
        ok.append(got is not None)
        if got is not None:
            # numpy, not torch: an array travels out of band (pickle protocol 5), uncopied.
            images.append(got[1].numpy())
    if images and all(i.shape == images[0].shape for i in images):
        return _Decoded(records, ok, np.stack(images))
    return _Decoded(records, ok, images)


@dataclass
class _Sent:
    """A chunk handed to a worker: which, and what the consumer needs to replay it."""

    index: int
    worker: int
    keys: list[str]
    before: list[list[Record]]  # reader records made just before each sample was read


def decode_in_order(
    read: Callable[[ReadStats], Iterable[dict[str, Any]]],
    stats: ReadStats,
    spec: DecodeSpec,
    workers: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, image)`` for the raw samples of ``read(stats)``, decoded by ``workers``
    processes, in stream order; skips are recorded in ``stats`` as a serial read would."""
    pool = _pool(workers, spec)
    with pool.lock:  # one read at a time: a worker's results are matched to chunks by order
        read_id = next(pool.reads)
        rec = _Recorder()
        sent = in_background(
            _send(pool, read_id, read(rec), rec, spec), IN_FLIGHT_PER_WORKER * workers
        )
        try:
            for item in sent:
                if isinstance(item, _Sent):
                    yield from _replay(item, pool.receive(item.worker, read_id, item.index), stats)
                else:  # the end of the stream: what the reader recorded after the last sample
                    _record(stats, item)
            stats.truncated_shards |= rec.truncated_shards
        except (WorkerDied, TimeoutError):
            process_pool.discard(pool)
            raise
        finally:
            sent.close()  # stops the reader thread when the consumer stops early
            process_pool.touch(pool)


def _send(
    pool: ProcessPool,
    read_id: int,
    raw: Iterable[dict[str, Any]],
    rec: _Recorder,
    spec: DecodeSpec,
) -> Iterator[_Sent | list[Record]]:
    """Read samples (the reader thread) and send them in chunks, round-robin; last, yield the
    records made after the last sample."""
    index = itertools.count()
    before: list[list[Record]] = []
    samples: list[dict[str, Any]] = []
    size = 0
    for sample in raw:
        before.append(rec.take())
        samples.append(sample)
        size += sum(len(v) for v in sample.values() if isinstance(v, bytes))
        if len(samples) == CHUNK or size >= CHUNK_BYTES:
            yield _sent(pool, read_id, next(index), before, samples, spec)
            before, samples, size = [], [], 0
    if samples:
        yield _sent(pool, read_id, next(index), before, samples, spec)
    yield rec.take()


def _sent(
    pool: ProcessPool,
    read_id: int,
    index: int,
    before: list[list[Record]],
    samples: list[dict[str, Any]],
    spec: DecodeSpec,
) -> _Sent:
    worker = pool.send(read_id, index, decode_chunk, samples, spec)
    return _Sent(index, worker, [s.get("__key__", "") for s in samples], before)


def _replay(sent: _Sent, decoded: _Decoded, stats: ReadStats) -> Iterator[tuple[str, torch.Tensor]]:
    images = iter(
        torch.from_numpy(decoded.images)
        if isinstance(decoded.images, np.ndarray)
        else [torch.from_numpy(i) for i in decoded.images]
    )
    for key, before, records, ok in zip(
        sent.keys, sent.before, decoded.records, decoded.ok, strict=True
    ):
        _record(stats, before)
        _record(stats, records)
        if ok:
            stats.samples += 1
            yield key, next(images)


def _record(stats: ReadStats, records: list[Record]) -> None:
    for shard, key, reason, detail in records:
        stats.record(shard, key, reason, detail)


def start_pool(workers: int, spec: DecodeSpec | None = None) -> None:
    """Start this process's ``workers`` decode processes now, each loading what decoding with
    ``spec`` needs, and wait until all are ready (seconds, once), so that the first read does
    not pay for it. One worker needs no pool (it is a thread of the reader's process)."""
    if workers < 2:
        return
    pool = _pool(workers, spec)
    with pool.lock:
        read_id = next(pool.reads)
        try:
            for w in range(workers):
                pool.send(read_id, w, decode_chunk, [], spec)
            for w in range(workers):
                pool.receive(w, read_id, w)
        except (WorkerDied, TimeoutError):
            process_pool.discard(pool)
            raise


def _pool(workers: int, spec: DecodeSpec | None) -> ProcessPool:
    if workers < 2:
        raise ValueError(f"a decode pool needs >= 2 workers, got {workers}")
    # The workers import what the transform needs as they start, not in the first chunk.
    transform = getattr(spec, "transform", None)
    transform = getattr(transform, "func", transform)  # a partial's function
    module = getattr(transform, "__module__", None)
    preload = [__name__] + ([module] if module and module != "__main__" else [])
    return process_pool.shared_pool(workers, preload)
