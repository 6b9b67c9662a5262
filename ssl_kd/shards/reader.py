"""Reading WebDataset shards: raw samples per shard, image decoding, bad samples counted.

Works on any tar in the WebDataset layout (``KEY.png|jpg|jpeg|webp`` plus optional ``KEY.cls``,
``KEY.json``, ``KEY.txt``), whether written by :mod:`ssl_kd.shards.writer`, img2dataset or plain
``tar``. A corrupt sample, a repeated or unsafe key, or a truncated tar is recorded in
:class:`ReadStats` and skipped; it never stops the read.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

import torch

from ssl_kd.shards.decode import DEFAULT_MAX_PIXELS, decode_image
from ssl_kd.shards.decoded_cache import DecodedCache
from ssl_kd.shards.skips import ReadStats, SampleError, plain
from ssl_kd.shards.spec import shard_name
from ssl_kd.shards.tario import TarFormatError, TruncatedTarError, iter_members, open_tar, split_key

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ReadStats",
    "SampleError",
    "decode_image",
    "decoded_samples",
    "image_bytes",
    "image_ext",
    "iter_samples",
    "iter_shard",
    "peek_image",
    "read_label",
]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def unsafe_key(key: str) -> bool:
    """A key that could escape a directory if someone extracted it as a path: a ``..``
    component or a leading ``/``."""
    return key.startswith(("/", "\\")) or ".." in key.replace("\\", "/").split("/")


def _refused(key: str, seen: set[str], shard: str, stats: ReadStats) -> bool:
    """Whether a new run of members under ``key`` is dropped (and recorded): a key already
    read in this shard (the first copy wins) or an unsafe one."""
    if key in seen:
        stats.record(shard, key, "duplicate key", "the key appeared earlier in the shard")
        return True
    seen.add(key)
    if unsafe_key(key):
        stats.record(shard, key, "unsafe key", "'..' component or leading '/'")
        return True
    return False


def _group(members: Iterator[tuple[str, bytes]], url: str, stats: ReadStats) -> Iterator[dict]:
    """Group consecutive members sharing a key into samples (the WebDataset convention); a key
    seen before anywhere in the shard, or an unsafe one, is recorded and dropped."""
    name = shard_name(url)
    seen: set[str] = set()
    current: dict[str, Any] | None = None
    dropped = False  # the current run of members belongs to a refused key
    for member, data in members:
        parts = split_key(member)
        if parts is None or parts[0].rsplit("/", 1)[-1].startswith("__"):
            continue  # no extension, or webdataset's __meta__ files
        key, ext = parts
        if current is None or current["__key__"] != key:
            if current is not None and not dropped:
                yield current
            current = {"__key__": key, "__url__": url}
            dropped = _refused(key, seen, name, stats)
        if dropped:
            continue
        if ext in current:
            stats.record(name, key, "duplicate member", member)
            continue
        current[ext] = data
    if current is not None and not dropped:
        yield current


def iter_shard(url: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """Yield raw samples (``__key__``, ``__url__``, extension → bytes) of one shard.

    A truncated or unreadable shard yields the complete samples before the damage; the damage
    is recorded in ``stats`` (truncated shards in ``stats.truncated_shards``).
    """
    name = shard_name(url)
    try:
        with open_tar(url) as stream:
            yield from _group(iter_members(stream), url, stats)
    except TruncatedTarError as exc:
        stats.truncated_shards.add(name)
        stats.record(name, None, "truncated tar", plain(exc))
    except (TarFormatError, OSError, EOFError) as exc:
        stats.record(name, None, "unreadable shard", plain(exc))


def iter_samples(urls: Iterable[str], stats: ReadStats) -> Iterator[dict[str, Any]]:
    """Yield raw samples of every shard in order."""
    for url in urls:
        yield from iter_shard(url, stats)


def image_ext(members: Container[str]) -> str | None:
    """The extension of a sample's image member (the first of IMAGE_EXTENSIONS), or None."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)


def image_bytes(sample: dict[str, Any]) -> bytes:
    """The sample's encoded image; raises SampleError when it has none."""
    ext = image_ext(sample)
    if ext is not None:
        return sample[ext]
    members = sorted(k for k in sample if not k.startswith("__"))
    raise SampleError("no image member", f"has: {', '.join(members) or 'nothing'}")


def read_label(sample: dict[str, Any], num_classes: int | None = None) -> int:
    """The sample's integer ``.cls`` label; raises SampleError if missing or out of range."""
    raw = sample.get("cls")
    if raw is None:
        raise SampleError("no label", "no .cls member")
    try:
        label = int(raw.decode() if isinstance(raw, bytes) else raw)
    except ValueError:
        raise SampleError("bad label", f".cls is {raw[:40]!r}") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise SampleError("label out of range", f"label {label} for {num_classes} classes")
    return label


def decoded_samples(
    raw: Iterable[dict[str, Any]],
    stats: ReadStats,
    channels: int | None,
    labeled: bool,
    num_classes: int | None = None,
    targets: Callable[[dict[str, Any]], Any] | None = None,
    *,
    skip: int = 0,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    size: int = 0,
    cache: DecodedCache | None = None,
) -> Iterator[tuple[str, torch.Tensor, Any]]:
    """Decode raw samples to ``(key, image, label)``; label is -1 when ``labeled`` is False,
    and ``targets(sample)`` (e.g. a soft label) when given; ``transform`` runs on each image.
    ``size`` is the side the transform will resize to (large JPEGs decode at a reduced scale).
    ``cache`` keeps decoded images for later reads of the same samples.

    The first ``skip`` good samples are dropped before ``transform`` (a resumed epoch: the
    dropped samples draw no augmentation randomness). Whatever goes wrong with one sample, in
    decoding, its label or the transform, is that sample's recorded skip, never the shard's.
    """
    for sample in raw:
        key = sample.get("__key__", "")
        try:
            img = cache.get(sample) if cache is not None else None
            if img is None:
                img = decode_image(image_bytes(sample), channels, max_pixels, size)
                if cache is not None:
                    cache.put(sample, img)
            if targets is not None:
                label = targets(sample)
            else:
                label = read_label(sample, num_classes) if labeled else -1
            if skip > 0:
                skip -= 1
                stats.samples += 1
                continue
            if transform is not None:
                img = transform(img)
        except SampleError as exc:
            stats.skip(shard_name(sample.get("__url__", "")), key, exc)
            continue
        except Exception as exc:  # e.g. a transform's MemoryError: still this sample's alone
            stats.record(shard_name(sample.get("__url__", "")), key, "unusable image", plain(exc))
            continue
        stats.samples += 1
        yield key, img, label


def peek_image(urls: list[str]) -> torch.Tensor:
    """The first decodable image of the shards (to infer channels and size)."""
    stats = ReadStats()
    for url in urls:
        for _, img, _ in decoded_samples(iter_shard(url, stats), stats, None, labeled=False):
            return img
    raise SampleError("no image member", f"no decodable image in {len(urls)} shard(s)")
