"""Reading WebDataset shards: raw samples per shard, image decoding, bad samples counted.

Works on any tar in the WebDataset layout (``KEY.png|jpg|jpeg|webp`` plus optional ``KEY.cls``,
``KEY.json``, ``KEY.txt``), whether written by :mod:`ssl_kd.shards.writer`, img2dataset or plain
``tar``. A corrupt sample or a truncated tar is recorded in :class:`ReadStats` and skipped; it
never stops the read.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode_image
except ImportError:  # torchvision's decoders are deprecated (0.29) in favour of torchcodec
    tv_decode_image = None

from ssl_kd.shards.spec import shard_name
from ssl_kd.shards.tario import TarFormatError, TruncatedTarError, iter_members, open_tar, split_key

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
MAX_RECORDED_ERRORS = 1000  # keep memory bounded on a billion-image read with many bad samples
if tv_decode_image is not None:
    _READ_MODES = {None: ImageReadMode.UNCHANGED, 1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}
    # torchvision 0.29 warns on every call that these decoders will move to torchcodec; they
    # still decode small images twice as fast as PIL, and PIL takes over once they are gone.
    warnings.filterwarnings(
        "ignore",
        message="The image decoding and encoding capabilities of TorchVision",
        category=DeprecationWarning,
    )


class SampleError(ValueError):
    """A sample that cannot be used (no image, undecodable image, bad label)."""


@dataclass
class ReadStats:
    """What a read saw: good samples, skipped ones with reasons, truncated shards."""

    samples: int = 0
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, str]] = field(default_factory=list)
    truncated_shards: set[str] = field(default_factory=set)

    def record(self, shard: str, key: str | None, reason: str) -> None:
        """Count one skipped sample (or unreadable part of a shard)."""
        self.skipped += 1
        self.reasons[reason.split(":", 1)[0]] += 1
        if len(self.errors) < MAX_RECORDED_ERRORS:
            self.errors.append({"shard": shard, "key": key or "", "reason": reason})
        log.warning("skipped sample %s in %s: %s", key or "?", shard, reason)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "samples": self.samples,
            "skipped": self.skipped,
            "reasons": dict(self.reasons),
            "truncated_shards": sorted(self.truncated_shards),
        }


def _group(members: Iterator[tuple[str, bytes]], url: str, stats: ReadStats) -> Iterator[dict]:
    """Group consecutive members sharing a key into samples (the WebDataset convention)."""
    name = shard_name(url)
    current: dict[str, Any] | None = None
    for member, data in members:
        parts = split_key(member)
        if parts is None or parts[0].rsplit("/", 1)[-1].startswith("__"):
            continue  # no extension, or webdataset's __meta__ files
        key, ext = parts
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if ext in current:
            stats.record(name, key, f"duplicate member: {member}")
            continue
        current[ext] = data
    if current is not None:
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
        stats.record(name, None, f"truncated tar: {exc}")
    except (TarFormatError, OSError, EOFError) as exc:
        stats.record(name, None, f"unreadable shard: {exc}")


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
    raise SampleError(f"no image member (has: {', '.join(members) or 'nothing'})")


def _decode_with_pil(data: bytes, channels: int | None) -> torch.Tensor:
    img = Image.open(io.BytesIO(data))
    img.load()
    if channels is None:
        channels = 1 if img.mode in ("L", "LA", "1", "I", "I;16", "F") else 3
    arr = np.array(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def decode_image(data: bytes, channels: int | None) -> torch.Tensor:
    """Decode image bytes to a uint8 (C, H, W) tensor with ``channels`` (1 or 3; None: as
    stored, alpha dropped).

    torchvision's libpng/libjpeg decoders run about twice as fast as PIL on small images; PIL
    is the fallback for formats they do not read (GIF, BMP, TIFF, ...).
    """
    try:
        if tv_decode_image is None:
            raise NotImplementedError
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        img = tv_decode_image(buf, mode=_READ_MODES[channels])
    except Exception:
        try:
            return _decode_with_pil(data, channels)
        except Exception as exc:
            raise SampleError(f"corrupt image: {exc}") from None
    if channels is None and img.shape[0] in (2, 4):
        img = img[:-1]  # drop alpha
    return img


def read_label(sample: dict[str, Any], num_classes: int | None = None) -> int:
    """The sample's integer ``.cls`` label; raises SampleError if missing or out of range."""
    raw = sample.get("cls")
    if raw is None:
        raise SampleError("no .cls label")
    try:
        label = int(raw.decode() if isinstance(raw, bytes) else raw)
    except ValueError:
        raise SampleError(f"bad .cls label {raw!r}") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise SampleError(f"label {label} out of range for {num_classes} classes")
    return label


def decoded_samples(
    raw: Iterable[dict[str, Any]],
    stats: ReadStats,
    channels: int | None,
    labeled: bool,
    num_classes: int | None = None,
    targets: Callable[[dict[str, Any]], Any] | None = None,
) -> Iterator[tuple[str, torch.Tensor, Any]]:
    """Decode raw samples to ``(key, image, label)``; label is -1 when ``labeled`` is False,
    and ``targets(sample)`` (e.g. a soft label) when given."""
    for sample in raw:
        key = sample.get("__key__", "")
        try:
            img = decode_image(image_bytes(sample), channels)
            if targets is not None:
                label = targets(sample)
            else:
                label = read_label(sample, num_classes) if labeled else -1
        except SampleError as exc:
            stats.record(shard_name(sample.get("__url__", "")), key, str(exc))
            continue
        stats.samples += 1
        yield key, img, label


def peek_image(urls: list[str]) -> torch.Tensor:
    """The first decodable image of the shards (to infer channels and size)."""
    stats = ReadStats()
    for url in urls:
        for _, img, _ in decoded_samples(iter_shard(url, stats), stats, None, labeled=False):
            return img
    raise SampleError(f"no decodable image in {len(urls)} shard(s)")
