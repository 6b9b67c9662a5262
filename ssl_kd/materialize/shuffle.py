"""The pure steps of materialising (no Ray): output keys, the shuffle plan, and the map and
reduce of the two-pass external shuffle that :mod:`ssl_kd.materialize.run` runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ssl_kd import atomic, storage
from ssl_kd.errors import UserError
from ssl_kd.label.files import fixed_list
from ssl_kd.shards import soft_label
from ssl_kd.shards.reader import ReadStats, image_ext, iter_shard
from ssl_kd.shards.spec import shard_name, shard_stem
from ssl_kd.shards.writer import END_OF_ARCHIVE, tar_member


def sample_key(stem: str, key: str, cls: int, copy: int, repeat: int) -> str:
    """The output key of one copy of a selected row; unique across the output.

    The stem (unique per shard, and without ``/``) ends at the first ``/``, source keys are
    unique within their shard, and the ``_c<int>[_r<int>]`` tail is read back from the right.
    """
    tail = f"_c{cls}" + (f"_r{copy + 1}" if repeat > 1 else "")
    return f"{stem}/{key}{tail}"


def map_source_shard(url: str, rows: pa.Table, bucket: str) -> dict[str, Any]:
    """Spill the selected samples of one source shard into ``bucket``, read once in order.

    ``rows`` are its selection rows (key, class, score, rank, repeat, topk_class, topk_prob,
    weight if the selection has it: then each sample's ``json`` carries it, and embedding if
    the selection has it: then each sample gets an ``emb`` member);
    row ``i`` copy ``c`` is entry ``sum(repeat[:i]) + c``. Returns the entries' ``offset`` and
    ``size`` in the bucket. UserError naming the first key not found in the shard.
    """
    start = time.perf_counter()
    name = shard_name(url)
    stem = shard_stem(name)
    repeat = rows.column("repeat").to_numpy().astype(np.int64)
    first = np.concatenate([[0], np.cumsum(repeat)[:-1]])
    wanted: dict[str, list[int]] = {}
    for i, key in enumerate(rows.column("key").to_pylist()):
        wanted.setdefault(key, []).append(i)  # a key selected for several classes
    cls = rows.column("class").to_pylist()
    score = rows.column("score").to_pylist()
    rank = rows.column("rank").to_pylist()
    topk_class = rows.column("topk_class").to_pylist()
    topk_prob = rows.column("topk_prob").to_pylist()
    weight = [None] * rows.num_rows  # a selection without weights writes none
    if "weight" in rows.column_names:
        weight = rows.column("weight").to_pylist()
    emb = None
    if "embedding" in rows.column_names:
        emb = fixed_list(rows.column("embedding"), rows.num_rows)
    offset = np.zeros(int(repeat.sum()), np.int64)
    size = np.zeros(int(repeat.sum()), np.int64)
    stats = ReadStats()
    written = 0
    with atomic.atomic_path(bucket) as tmp, open(tmp, "wb") as fh:
        for sample in iter_shard(url, stats):
            hits = wanted.pop(sample["__key__"], None)
            if hits is None:
                continue
            ext = image_ext(sample)
            if ext is None:
                raise UserError(f"sample {sample['__key__']} of {url} has no image member")
            for i in hits:
                soft = (cls[i], topk_class[i], topk_prob[i], score[i], rank[i])
                members = soft_label.encode(*soft, name, sample["__key__"], weight=weight[i])
                if emb is not None:
                    members[soft_label.EMBEDDING] = soft_label.encode_embedding(emb[i])
                for c in range(int(repeat[i])):
                    key = sample_key(stem, sample["__key__"], cls[i], c, int(repeat[i]))
                    block = tar_member(f"{key}.{ext}", sample[ext]) + b"".join(
                        tar_member(f"{key}.{m}", data) for m, data in members.items()
                    )
                    fh.write(block)
                    offset[first[i] + c], size[first[i] + c] = written, len(block)
                    written += len(block)
        if wanted:
            missing = sorted(wanted)
            why = f" (read errors: {stats.errors[-1]['reason']})" if stats.errors else ""
            raise UserError(
                f"key {missing[0]!r} of the selection is not in source shard {url} "
                f"({len(missing)} of {rows.num_rows} selected keys missing){why}"
            )
    seconds = time.perf_counter() - start
    return {
        "shard": name,
        "samples": len(offset),
        "bytes": written,
        "offset": offset,
        "size": size,
        "seconds": seconds,
    }


def bucket_path(bucket_dir: str, source: int) -> str:
    """The spill file (or object) of source shard number ``source``."""
    return storage.join(bucket_dir, f"{source:06d}.bin")


def reduce_output_shard(
    path: str, bucket_dir: str, source: np.ndarray, offset: np.ndarray, size: np.ndarray
) -> dict[str, Any]:
    """Write one output shard, atomically: sample ``j`` is ``size[j]`` bytes at ``offset[j]``
    of the spill file of ``source[j]``, in the order given."""
    blocks: list[bytes] = [b""] * len(offset)
    # Spill file by spill file, each opened once and read forwards.
    order = np.lexsort((offset, source))
    sources, starts = np.unique(source[order], return_index=True)
    for s, js in zip(sources, np.split(order, starts[1:]), strict=True):
        data = storage.read_ranges(
            bucket_path(bucket_dir, int(s)), offset[js].tolist(), size[js].tolist()
        )
        for j, block in zip(js, data, strict=True):
            blocks[j] = block
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as out:
        for block in blocks:
            out.write(block)
        out.write(END_OF_ARCHIVE)
    return {"shard": storage.name(path), "samples": len(blocks), "bytes": sum(map(len, blocks))}


@dataclass
class Plan:
    """Where every sample comes from and goes: ``n = sum(repeat)`` entries, integers only."""

    sources: list[str]  # source shard names, sorted; a source's index names its spill file
    source_rows: list[np.ndarray]  # per source: its selection rows, ascending
    source_entries: list[np.ndarray]  # per source: its entries, in map_source_shard's order
    position: np.ndarray  # entry → global position in the output


def make_plan(shard: pa.ChunkedArray, repeat: np.ndarray, seed: int) -> Plan:
    """Group rows by source shard and give every entry (row, copy) a seeded random position."""
    encoded = pc.dictionary_encode(shard.cast(pa.string()).combine_chunks())
    names = encoded.dictionary.to_pylist()
    by_name = np.argsort(np.array(names, dtype=object)) if names else np.zeros(0, np.int64)
    source = np.argsort(by_name)[encoded.indices.to_numpy()]  # index into the sorted names
    counts = np.bincount(source, minlength=len(names))
    rows = np.argsort(source, kind="stable")
    entry_source = np.repeat(source, repeat)
    entries = np.argsort(entry_source, kind="stable")  # row order, then copy order
    entry_counts = np.bincount(entry_source, minlength=len(names))
    n = int(repeat.sum())
    return Plan(
        sources=sorted(names),
        source_rows=np.split(rows, np.cumsum(counts)[:-1]),
        source_entries=np.split(entries, np.cumsum(entry_counts)[:-1]),
        position=np.random.default_rng(seed).permutation(n),
    )
