"""Atomic WebDataset shard writing: each shard is written under a temp name and renamed (or,
for an object store, uploaded in one put once complete).

A reader that globs ``*.tar`` therefore never sees a partial shard, and a crash leaves only
``.NAME.tar.*.tmp`` files behind, which a rerun removes.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from ssl_kd import atomic
from ssl_kd.shards.tario import BLOCK


def encode_image(array: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode an HxW (grayscale) or HxWx3 uint8 array as PNG or JPEG bytes."""
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {array.dtype}")
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if fmt == "png":
        # compress_level 6 is PIL's default; pinned so shards are byte-identical across runs.
        img.save(buf, format="PNG", compress_level=6)
    elif fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}; choose png or jpeg")
    return buf.getvalue()


class ShardWriter:
    """Writes samples into shards of ``samples_per_shard`` named by ``pattern % index``.

    Samples are dicts with ``__key__`` and extension → value (bytes, str, int or JSON-able dict).
    Use as a context manager: on an exception the open shard is discarded, not renamed.
    """

    def __init__(self, pattern: str, samples_per_shard: int, start_index: int = 0) -> None:
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        if "%" not in pattern:
            raise ValueError(f"shard pattern {pattern!r} needs a %-format index, e.g. x-%06d.tar")
        self.pattern = pattern
        self.samples_per_shard = samples_per_shard
        self.index = start_index
        self.written: list[str] = []
        self.total = 0
        self._tar: wds.TarWriter | None = None
        self._stream: Any = None
        self._tmp: Path | None = None
        self._final = ""
        self._count = 0

    def _open(self) -> None:
        self._final = self.pattern % self.index
        self._tmp = atomic.staging_path(self._final)
        self._stream = open(self._tmp, "wb")  # noqa: SIM115 - closed in _finish/abort
        # mtime fixed so that the same samples give byte-identical shards.
        self._tar = wds.TarWriter(self._stream, mtime=0.0)
        self._count = 0

    def _finish(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._stream.close()
        assert self._tmp is not None
        atomic.commit(self._tmp, self._final)
        self.written.append(self._final)
        self._tar = None
        self.index += 1

    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample; rolls over to a new shard every ``samples_per_shard`` samples."""
        if "__key__" not in sample:
            raise ValueError("sample needs a '__key__'")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._tar.write(dict(sample))
        self._count += 1
        self.total += 1
        if self._count >= self.samples_per_shard:
            self._finish()

    def close(self) -> list[str]:
        """Finish the open shard; returns every shard written, in order."""
        if self._tar is not None and self._count > 0:
            self._finish()
        return self.written

    def abort(self) -> None:
        """Drop the open shard's temp file (shards already renamed stay)."""
        if self._tar is not None:
            self._tar.close()  # flushes tarfile's buffer, which would otherwise write on GC
            self._stream.close()
            assert self._tmp is not None
            atomic.discard(self._tmp, self._final)
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def array_samples(
    images: np.ndarray,
    labels: np.ndarray | None,
    keys: Sequence[str],
    fmt: str = "png",
    order: Iterable[int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples (``__key__``, encoded image, ``cls`` when labels are given) from uint8 arrays.

    ``order`` picks and orders the rows (default: all, in order); encoding happens lazily.
    """
    ext = "png" if fmt == "png" else "jpg"
    for i in range(len(images)) if order is None else order:
        sample: dict[str, Any] = {"__key__": keys[i], ext: encode_image(images[i], fmt)}
        if labels is not None:
            sample["cls"] = int(labels[i])
        yield sample


def write_shards(
    samples: Iterable[Mapping[str, Any]], pattern: str, samples_per_shard: int
) -> list[str]:
    """Write all ``samples`` into shards; returns the shard paths."""
    with ShardWriter(pattern, samples_per_shard) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.written


END_OF_ARCHIVE = bytes(2 * BLOCK)


def tar_member(name: str, data: bytes) -> bytes:
    """One regular tar member (header, data, padding): fixed owner, mode and mtime."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0
    # GNU format: long names as ././@LongLink members, which every tar reader understands.
    header = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    return header + data + bytes(-len(data) % BLOCK)
